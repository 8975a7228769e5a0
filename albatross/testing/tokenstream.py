"""A token-streaming server and client for connection-migration tests and benchmarks.

The protocol is the smallest that shows a gap, a duplicate or a lost byte:

- the client opens a connection and sends ``HELLO <conn_id> <tokens> <upload_bytes>\\n``,
  then (if ``upload_bytes``) a paced upload of the pattern ``byte[k] = k % 251``;
- the server writes ``tokens`` fixed-size tokens ``b"%04d:%06d\\n" % (conn_id, i)``,
  one per tick, checks every uploaded byte against the pattern, and once it wrote
  the last token and received the whole upload it shuts its side down;
- the client compares everything it received with the exact expected bytes, and
  records the arrival time of each token.

:class:`Streamer` is the server: one thread that ticks every ``interval_s`` over all
its connections. :meth:`Streamer.pause` stops it writing and hands the sockets and
each connection's position over (as the opaque application state a handoff carries);
:meth:`Streamer.adopt` continues a connection from such a state on another host.
:func:`run_client` is the client, run as ``python -m albatross.testing.tokenstream``
inside the client's namespace; it prints a JSON report.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import selectors
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AppState", "Streamer", "expected_stream", "pattern", "run_client", "token"]

TOKEN_BYTES = 12
_APP = struct.Struct(">IIIQQB")


def token(conn_id: int, i: int) -> bytes:
    return b"%04d:%06d\n" % (conn_id % 10000, i)


def expected_stream(conn_id: int, tokens: int) -> bytes:
    return b"".join(token(conn_id, i) for i in range(tokens))


_PERIOD = bytes(range(251))


def pattern(offset: int, size: int) -> bytes:
    """The upload bytes at ``offset``: ``byte[k] = k % 251``."""
    start = offset % 251
    return (_PERIOD * ((start + size) // 251 + 1))[start : start + size]


@dataclass
class AppState:
    """What the application must hand over with a socket: its position in the stream."""

    conn_id: int
    tokens: int
    next_token: int = 0
    upload_expected: int = 0
    upload_received: int = 0
    shut: bool = False
    pending: bytes = b""

    def encode(self) -> bytes:
        head = _APP.pack(
            self.conn_id,
            self.tokens,
            self.next_token,
            self.upload_expected,
            self.upload_received,
            self.shut,
        )
        return head + self.pending

    @classmethod
    def decode(cls, data: bytes) -> AppState:
        conn_id, tokens, nxt, up_exp, up_rcv, shut = _APP.unpack_from(data)
        return cls(conn_id, tokens, nxt, up_exp, up_rcv, bool(shut), data[_APP.size :])


@dataclass
class _Conn:
    sock: socket.socket
    state: AppState | None = None
    hello: bytes = b""
    bad_upload: int = 0


@dataclass
class Streamer:
    """The server side: see the module docstring. Sockets it owns are non-blocking."""

    interval_s: float = 0.01
    name: str = "streamer"
    finished: list[AppState] = field(default_factory=list)
    upload_errors: list[str] = field(default_factory=list)
    _conns: list[_Conn] = field(default_factory=list)
    _listeners: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def listen(self, sock: socket.socket) -> None:
        """Accept connections on the (bound, listening) socket."""
        sock.setblocking(False)
        with self._lock:
            self._listeners.append(sock)

    def streaming(self) -> int:
        """Connections that sent their hello and are being served."""
        with self._lock:
            return sum(1 for c in self._conns if c.state is not None)

    def sockets(self) -> list[socket.socket]:
        """The sockets of the connections being served (still owned by the streamer)."""
        with self._lock:
            return [c.sock for c in self._conns if c.state is not None]

    def pause(self) -> list[tuple[socket.socket, AppState]]:
        """Stop writing and hand over every connection (blocking sockets, positions).

        Runs under the loop's lock, so no write is half done; the caller owns the
        sockets afterwards."""
        with self._lock:
            out = []
            for c in self._conns:
                if c.state is None:
                    raise RuntimeError("a connection has not sent its hello yet")
                c.sock.setblocking(True)
                out.append((c.sock, c.state))
            self._conns = []
            return out

    def adopt(self, sock: socket.socket, state: AppState) -> None:
        sock.setblocking(False)
        with self._lock:
            self._conns.append(_Conn(sock, state))
            self._tick_one(self._conns[-1])

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for c in self._conns:
                c.sock.close()
            for s in self._listeners:
                s.close()
            self._conns = []
            self._listeners = []

    def _run(self) -> None:
        next_tick = time.perf_counter()
        while not self._stop.is_set():
            with self._lock:
                for listener in self._listeners:
                    self._accept(listener)
                for c in list(self._conns):
                    self._tick_one(c)
            next_tick += self.interval_s
            delay = next_tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                next_tick = time.perf_counter()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, OSError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.append(_Conn(sock))

    def _read(self, c: _Conn) -> bool:
        """Read what arrived; False once the peer closed."""
        while True:
            try:
                data = c.sock.recv(256 * 1024)
            except BlockingIOError:
                return True
            except OSError as exc:
                self.upload_errors.append(f"recv: {exc!r}")
                return False
            if not data:
                return False
            if c.state is None:
                c.hello += data
                if b"\n" not in c.hello:
                    continue
                line, _, rest = c.hello.partition(b"\n")
                _, conn_id, tokens, upload = line.split()
                c.state = AppState(int(conn_id), int(tokens), upload_expected=int(upload))
                data = rest
            st = c.state
            if data != pattern(st.upload_received, len(data)):
                self.upload_errors.append(
                    f"conn {st.conn_id}: upload bytes at offset {st.upload_received} do not match"
                )
            st.upload_received += len(data)

    def _tick_one(self, c: _Conn) -> None:
        alive = self._read(c)
        st = c.state
        if st is None:
            if not alive:
                self._drop(c)
            return
        if not st.pending and st.next_token < st.tokens:
            st.pending = token(st.conn_id, st.next_token)
            st.next_token += 1
        if st.pending:
            try:
                sent = c.sock.send(st.pending)
                st.pending = st.pending[sent:]
            except BlockingIOError:
                pass
            except OSError as exc:
                self.upload_errors.append(f"conn {st.conn_id}: send: {exc!r}")
                self._drop(c)
                return
        done_writing = not st.pending and st.next_token >= st.tokens
        if done_writing and st.upload_received >= st.upload_expected and not st.shut:
            c.sock.shutdown(socket.SHUT_WR)
            st.shut = True
        if not alive:
            self._drop(c)

    def _drop(self, c: _Conn) -> None:
        if c.state is not None:
            self.finished.append(c.state)
        c.sock.close()
        self._conns.remove(c)


# ---- client -------------------------------------------------------------------------
@dataclass
class _ClientConn:
    conn_id: int
    sock: socket.socket
    expected: bytes
    upload_bytes: int
    received: bytearray = field(default_factory=bytearray)
    arrivals: list[float] = field(default_factory=list)
    uploaded: int = 0
    eof: bool = False
    error: str | None = None


def _report(c: _ClientConn) -> dict[str, Any]:
    got = bytes(c.received)
    mismatch = next(
        (i for i, (a, b) in enumerate(zip(got, c.expected, strict=False)) if a != b), None
    )
    gaps = [b - a for a, b in itertools.pairwise(c.arrivals)]
    worst = max(range(len(gaps)), key=gaps.__getitem__) if gaps else None
    return {
        "conn_id": c.conn_id,
        "exact": got == c.expected,
        "received": len(got),
        "expected": len(c.expected),
        "first_mismatch": mismatch,
        "uploaded": c.uploaded,
        "error": c.error,
        "max_gap_ms": 1000 * gaps[worst] if worst is not None else None,
        "max_gap_after_token": worst,
        "median_gap_ms": 1000 * statistics.median(gaps) if gaps else None,
    }


def run_client(
    host: str,
    port: int,
    conns: int,
    tokens: int,
    upload_bytes: int = 0,
    upload_rate: float = 200_000.0,
    timeout_s: float = 120.0,
    first_id: int = 0,
) -> dict[str, Any]:
    """Open ``conns`` streams, read them to the end, and report (see the module doc)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sel = selectors.DefaultSelector()
    clients = []
    for i in range(conns):
        conn_id = first_id + i
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect((host, port))
        sock.sendall(b"HELLO %d %d %d\n" % (conn_id, tokens, upload_bytes))
        sock.setblocking(False)
        c = _ClientConn(conn_id, sock, expected_stream(conn_id, tokens), upload_bytes)
        clients.append(c)
        sel.register(sock, selectors.EVENT_READ, c)
    start = time.perf_counter()
    deadline = start + timeout_s
    chunk = pattern(0, 251 * 64)
    while any(not c.eof for c in clients) and time.perf_counter() < deadline:
        now = time.perf_counter()
        for c in clients:
            allowed = min(c.upload_bytes, int(upload_rate * (now - start)))
            while c.uploaded < allowed and not c.eof:
                off = c.uploaded % 251
                size = min(allowed - c.uploaded, len(chunk) - off)
                try:
                    c.uploaded += c.sock.send(chunk[off : off + size])
                except BlockingIOError:
                    break
                except OSError as exc:
                    c.error = f"send: {exc!r}"
                    break
        for key, _ in sel.select(timeout=0.002):
            c = key.data
            stamp = time.perf_counter()
            try:
                data = c.sock.recv(256 * 1024)
            except BlockingIOError:
                continue
            except OSError as exc:
                c.error, c.eof = f"recv: {exc!r}", True
                sel.unregister(c.sock)
                continue
            if not data:
                c.eof = True
                sel.unregister(c.sock)
                continue
            before = len(c.received) // TOKEN_BYTES
            c.received += data
            c.arrivals += [stamp] * (len(c.received) // TOKEN_BYTES - before)
    for c in clients:
        if not c.eof and c.error is None:
            c.error = "timed out"
        with contextlib.suppress(OSError):
            c.sock.close()
    reports = [_report(c) for c in clients]
    gaps = [r["max_gap_ms"] for r in reports if r["max_gap_ms"] is not None]
    medians = [r["median_gap_ms"] for r in reports if r["median_gap_ms"] is not None]
    return {
        "all_exact": all(r["exact"] for r in reports),
        "errors": [r["error"] for r in reports if r["error"]],
        "max_gap_ms": max(gaps) if gaps else None,
        "median_gap_ms": statistics.median(medians) if medians else None,
        "conns": reports,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--upload-bytes", type=int, default=0)
    p.add_argument("--upload-rate", type=float, default=200_000.0)
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    report = run_client(
        args.host,
        args.port,
        args.conns,
        args.tokens,
        args.upload_bytes,
        args.upload_rate,
        args.timeout,
    )
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
