"""A raw-socket SSE client for connection-migration tests and benchmarks.

Opens ``--conns`` connections to a gateway, sends the same streaming request on each,
and reads the chunked SSE bodies with one selector: no HTTP library between the
socket and the clock, so each event's arrival time is what the kernel delivered.
Prints one JSON report: per connection the event ids, the text (concatenated deltas),
the largest and median gap between text events, whether ``[DONE]`` came, and errors.

Run inside the client's network namespace::

    ip netns exec NS python -m albatross.testing.sseclient --host VIP --port 8000 \\
        --conns 100 --body '{"model": ..., "stream": true, ...}'
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Stream", "main", "run"]


@dataclass
class Stream:
    """One connection's response as it arrived."""

    sock: socket.socket
    raw: bytearray = field(default_factory=bytearray)
    body: bytearray = field(default_factory=bytearray)
    head_done: bool = False
    status: int = 0
    ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    done: bool = False
    ended: bool = False
    errors: list[str] = field(default_factory=list)
    _events: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes, now: float) -> None:
        self.raw += data
        if not self.head_done:
            head, sep, rest = bytes(self.raw).partition(b"\r\n\r\n")
            if not sep:
                return
            self.head_done = True
            self.status = int(head.split(b" ", 2)[1])
            self.raw = bytearray(rest)
        self._dechunk(now)

    def _dechunk(self, now: float) -> None:
        while True:
            line_end = self.raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.raw[:line_end]).split(b";")[0], 16)
            if size == 0:
                if len(self.raw) >= line_end + 4:
                    self.ended = True
                    self.raw.clear()
                return
            if len(self.raw) < line_end + 2 + size + 2:
                return
            self._events += self.raw[line_end + 2 : line_end + 2 + size]
            del self.raw[: line_end + 2 + size + 2]
            self._parse_events(now)

    def _parse_events(self, now: float) -> None:
        while b"\n\n" in self._events:
            block, _, rest = bytes(self._events).partition(b"\n\n")
            self._events = bytearray(rest)
            ev_id: int | None = None
            data = b""
            for line in block.split(b"\n"):
                if line.startswith(b"id:"):
                    ev_id = int(line[3:])
                elif line.startswith(b"data:"):
                    data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                continue
            if ev_id is not None:
                self.ids.append(ev_id)
            try:
                obj = json.loads(data)
            except ValueError:
                self.errors.append(f"not JSON: {data[:80]!r}")
                continue
            if "error" in obj:
                self.errors.append(str(obj["error"]))
            for choice in obj.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                if piece:
                    self.text.append(piece)
                    self.times.append(now)

    def report(self) -> dict[str, Any]:
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return {
            "status": self.status,
            "ids": self.ids,
            "text": "".join(self.text),
            "events": len(self.text),
            "done": self.done,
            "ended": self.ended,
            "errors": self.errors,
            "max_gap_ms": 1000 * max(gaps) if gaps else 0.0,
            "median_gap_ms": 1000 * statistics.median(gaps) if gaps else 0.0,
            "max_gap_at": gaps.index(max(gaps)) + 1 if gaps else 0,
        }


def run(host: str, port: int, path: str, body: bytes, conns: int, timeout_s: float) -> list[Stream]:
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sel = selectors.DefaultSelector()
    streams = []
    for _ in range(conns):
        sock = socket.create_connection((host, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert sock.family == family
        sock.sendall(request)
        sock.setblocking(False)
        s = Stream(sock)
        streams.append(s)
        sel.register(sock, selectors.EVENT_READ, s)
    deadline = time.monotonic() + timeout_s
    open_ = conns
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            s = key.data
            try:
                data = s.sock.recv(65536)
            except ConnectionError as exc:
                data = b""
                s.errors.append(f"{type(exc).__name__}: {exc}")
            now = time.perf_counter()
            if data:
                s.feed(data, now)
                if not s.ended:
                    continue
            sel.unregister(s.sock)
            s.sock.close()
            open_ -= 1
    for s in streams:
        if not s.ended:
            s.errors.append("timed out" if not s.sock._closed else "closed before the end")  # type: ignore[attr-defined]
            s.sock.close()
    return streams


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--body", required=True, help="the JSON request body")
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    streams = run(args.host, args.port, args.path, args.body.encode(), args.conns, args.timeout)
    json.dump({"conns": [s.report() for s in streams]}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
