"""Errors of connection migration, grouped by who is at fault.

- :class:`KernelError`: a socket option, ioctl, netlink or bpf call failed; it keeps
  the errno and names the operation, so "EPERM on TCP_REPAIR" reads as "needs
  CAP_NET_ADMIN", not as a mystery.
- :class:`StateFormatError`: bytes that claim to be a socket state or a handoff
  message break a rule of the format (field, value, rule).
- :class:`HandoffRefused` and its subclasses: a handoff message is authentic-looking
  bytes that must not be acted on (forged, expired, replayed). A refused handoff is
  never partly applied.
- :class:`VipError`: the service address could not be moved (a cloud API refused, or
  the address is held by someone else).
- :class:`BuildError`: the eBPF programs could not be compiled (clang or headers
  missing).

None of these reach an HTTP client: the control plane reports them, and a failed move
leaves the connections where they were whenever that is still possible.
"""

from __future__ import annotations

import errno as errno_module
import os


class NetmoveError(Exception):
    """Base of every error raised by :mod:`albatross.netmove`."""


class KernelError(NetmoveError):
    """A kernel call failed; ``errno`` is kept and the operation is named."""

    def __init__(self, operation: str, errno: int, hint: str = "") -> None:
        name = errno_module.errorcode.get(errno, str(errno))
        message = f"{operation} failed: {name} ({os.strerror(errno)})"
        if hint:
            message += f"; {hint}"
        super().__init__(message)
        self.operation = operation
        self.errno = errno


class StateFormatError(NetmoveError):
    """Encoded bytes break a rule of the format; ``field`` names the part at fault."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        super().__init__(f"{field}: {shown} {rule}")
        self.field = field
        self.value = value
        self.rule = rule


class ConnectionNotMovable(NetmoveError):
    """The socket is not in a state that can be exported (not an established TCP
    connection, or the peer already closed its side)."""


class HandoffRefused(NetmoveError):
    """A handoff message must not be acted on; nothing of it was applied."""


class ForgedHandoff(HandoffRefused):
    """The message's HMAC does not match: wrong key, corrupted or tampered with."""


class ExpiredHandoff(HandoffRefused):
    """The message is past its expiry time (or issued too far in the future)."""


class ReplayedHandoff(HandoffRefused):
    """The message's nonce was already accepted once."""


class VipError(NetmoveError):
    """The service address could not be claimed or released."""


class BuildError(NetmoveError):
    """The eBPF objects could not be built."""
