"""The few libbpf calls connection migration needs, through ctypes (``libbpf.so.1``).

Loading an object (``bpf_object__open_file`` + ``bpf_object__load``) gives program and
map file descriptors; attaching them is the caller's business (netlink, through
pyroute2). Map updates are the low-level ``bpf_map_*_elem`` calls on raw key and
value bytes. libbpf 1.x reports failures as a negative errno (int calls) or NULL with
``errno`` set (pointer calls); both become :class:`KernelError` naming the call.

A loaded object owns its fds: :meth:`BpfObject.close` releases them, after which a
program stays alive only as long as something (a TC filter, an XDP hook) holds it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_module
import os
from pathlib import Path
from types import TracebackType

from albatross.netmove.errors import KernelError

__all__ = ["BpfMap", "BpfObject", "prog_name_by_id"]

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_OBJ_NAME_LEN = 16
_PROG_INFO_SIZE = 232  # struct bpf_prog_info in this kernel's UAPI; only a prefix is read
_PROG_INFO_NAME_OFFSET = 64

_lib: ctypes.CDLL | None = None


def _libbpf() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise KernelError(f"loading {name}", errno_module.ENOENT, "install libbpf1") from exc
        vp, cp, i, u32, u64 = (
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_uint32,
            ctypes.c_uint64,
        )
        for fn, res, args in (
            ("bpf_object__open_file", vp, [cp, vp]),
            ("bpf_object__load", i, [vp]),
            ("bpf_object__close", None, [vp]),
            ("bpf_object__find_program_by_name", vp, [vp, cp]),
            ("bpf_object__find_map_by_name", vp, [vp, cp]),
            ("bpf_program__fd", i, [vp]),
            ("bpf_map__fd", i, [vp]),
            ("bpf_map_update_elem", i, [i, vp, vp, u64]),
            ("bpf_map_delete_elem", i, [i, vp]),
            ("bpf_map_lookup_elem", i, [i, vp, vp]),
            ("bpf_map_get_next_key", i, [i, vp, vp]),
            ("bpf_prog_get_fd_by_id", i, [u32]),
            ("bpf_obj_get_info_by_fd", i, [i, vp, ctypes.POINTER(u32)]),
        ):
            func = getattr(lib, fn)
            func.restype = res
            func.argtypes = args
        _lib = lib
    return _lib


def _check(operation: str, result: int, hint: str = "") -> int:
    if result < 0:
        raise KernelError(operation, -result, hint)
    return result


class BpfMap:
    """One map of a loaded object: raw-bytes lookups, updates and deletes."""

    def __init__(self, name: str, fd: int, key_size: int, value_size: int) -> None:
        self.name = name
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: key of {len(key)} bytes, the map wants {self.key_size}")
        return ctypes.create_string_buffer(key, self.key_size)

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self.value_size:
            raise ValueError(
                f"{self.name}: value of {len(value)} bytes, the map wants {self.value_size}"
            )
        val = ctypes.create_string_buffer(value, self.value_size)
        _check(
            f"bpf_map_update_elem({self.name})",
            _libbpf().bpf_map_update_elem(self.fd, self._key(key), val, flags),
            "the map is full" if ctypes.get_errno() == errno_module.E2BIG else "",
        )

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False when it was not there."""
        result = _libbpf().bpf_map_delete_elem(self.fd, self._key(key))
        if result < 0 and ctypes.get_errno() == errno_module.ENOENT:
            return False
        _check(f"bpf_map_delete_elem({self.name})", result)
        return True

    def lookup(self, key: bytes) -> bytes | None:
        val = ctypes.create_string_buffer(self.value_size)
        result = _libbpf().bpf_map_lookup_elem(self.fd, self._key(key), val)
        if result < 0 and ctypes.get_errno() == errno_module.ENOENT:
            return None
        _check(f"bpf_map_lookup_elem({self.name})", result)
        return val.raw

    def keys(self) -> list[bytes]:
        out: list[bytes] = []
        prev: ctypes.Array[ctypes.c_char] | None = None
        while True:
            nxt = ctypes.create_string_buffer(self.key_size)
            result = _libbpf().bpf_map_get_next_key(self.fd, prev, nxt)
            if result < 0:
                if ctypes.get_errno() == errno_module.ENOENT:
                    return out
                _check(f"bpf_map_get_next_key({self.name})", result)
            out.append(nxt.raw)
            prev = nxt


class BpfObject:
    """A loaded BPF object file; a context manager that closes it."""

    def __init__(self, path: Path) -> None:
        lib = _libbpf()
        ctypes.set_errno(0)
        handle = lib.bpf_object__open_file(os.fsencode(path), None)
        if not handle:
            raise KernelError(
                f"bpf_object__open_file({path})", ctypes.get_errno() or errno_module.EINVAL
            )
        self._handle: int | None = handle
        self.path = path
        try:
            _check(
                f"bpf_object__load({path.name})",
                lib.bpf_object__load(handle),
                "loading BPF programs needs CAP_BPF (or root)",
            )
        except BaseException:
            self.close()
            raise

    def _live(self) -> int:
        if self._handle is None:
            raise ValueError(f"{self.path.name}: the BPF object is closed")
        return self._handle

    def program_fd(self, name: str) -> int:
        prog = _libbpf().bpf_object__find_program_by_name(self._live(), name.encode())
        if not prog:
            raise KernelError(f"{self.path.name}: no program {name!r}", errno_module.ENOENT)
        return _check(f"bpf_program__fd({name})", _libbpf().bpf_program__fd(prog))

    def map(self, name: str, key_size: int, value_size: int) -> BpfMap:
        handle = _libbpf().bpf_object__find_map_by_name(self._live(), name.encode())
        if not handle:
            raise KernelError(f"{self.path.name}: no map {name!r}", errno_module.ENOENT)
        fd = _check(f"bpf_map__fd({name})", _libbpf().bpf_map__fd(handle))
        return BpfMap(name, fd, key_size, value_size)

    def close(self) -> None:
        if self._handle is not None:
            _libbpf().bpf_object__close(self._handle)
            self._handle = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def prog_name_by_id(prog_id: int) -> str | None:
    """The name of a loaded program (None when it is gone), to recognise our own."""
    lib = _libbpf()
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
        size = ctypes.c_uint32(_PROG_INFO_SIZE)
        _check("bpf_obj_get_info_by_fd", lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)))
        raw = info.raw[_PROG_INFO_NAME_OFFSET : _PROG_INFO_NAME_OFFSET + BPF_OBJ_NAME_LEN]
        return raw.split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)
