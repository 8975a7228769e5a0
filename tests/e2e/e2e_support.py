"""Running ``albatross serve`` as a user would, and looking at what it left behind.

Plain functions and one class, shared by the end-to-end fixtures and tests. Nothing here
knows the product's internals: it speaks HTTP, reads the serve log and walks ``/proc``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ALBATROSS = str(Path(sys.executable).with_name("albatross"))
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
MODEL = "tiny"

_SERVING = re.compile(r"albatross: serving .* on (http://\S+)")
# supervisor.py: "replica %s ready at %s after %.2f s (pid %d)" and
# "replica %s: started pid %d for %s (log: %s)"
_READY = re.compile(r"replica (\S+) ready at (http://\S+) after \S+ s \(pid (\d+)\)")
_STARTED = re.compile(r"replica (\S+): started pid \d+ for \S+ \(log: (.*)\)$", re.M)


def toml_str(v: object) -> str:
    """A TOML value for a str, Path, int, float or bool (json quoting is valid TOML)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def write_config(
    path: Path,
    *,
    binary: Path,
    model_path: Path,
    log_dir: Path,
    port: int,
    replicas: int = 2,
    ctx_size: int = 1024,
    gateway: dict[str, object] | None = None,
    supervisor: dict[str, object] | None = None,
) -> Path:
    """Write the e2e TOML config (parallel 4, 1 thread, ``ctx_size`` per slot) to ``path``."""
    gw = {"host": "127.0.0.1", "port": port, **(gateway or {})}
    sup = {"log_dir": log_dir, **(supervisor or {})}
    lines = ["[gateway]"]
    lines += [f"{k} = {toml_str(v)}" for k, v in gw.items()]
    lines += ["", "[supervisor]"]
    lines += [f"{k} = {toml_str(v)}" for k, v in sup.items()]
    lines += ["", "[llama_server]", f"binary = {toml_str(binary)}", ""]
    lines += [
        "[[models]]",
        f"name = {toml_str(MODEL)}",
        f"path = {toml_str(model_path)}",
        f"replicas = {replicas}",
        "parallel = 4",
        f"ctx_size = {ctx_size}",
        "threads = 1",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class ReplicaInfo:
    replica_id: str
    url: str
    pid: int
    log_path: Path
    """The engine's own log (llama-server's output), from the supervisor's log line."""


@dataclass
class Served:
    """One ``albatross serve`` process started by :func:`start_serve`."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    url: str = ""
    model: str = MODEL
    _stopped: bool = field(default=False, repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def replicas(self) -> dict[str, ReplicaInfo]:
        """The latest ``ready at`` line per replica id in the serve log."""
        text = self.log()
        logs = {m[1]: Path(m[2]) for m in _STARTED.finditer(text)}
        found: dict[str, ReplicaInfo] = {}
        for m in _READY.finditer(text):
            found[m[1]] = ReplicaInfo(m[1], m[2], int(m[3]), logs[m[1]])
        return found

    def stop(self, sig: int = signal.SIGINT, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send ``sig`` and wait; SIGKILL the group if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._stopped = True
        return self.proc.returncode


def start_serve(config_path: Path, log_path: Path, timeout: float = READY_TIMEOUT_S) -> Served:
    """Start ``albatross serve --config`` in its own process group; return once it serves.

    "Serves" is the ``albatross: serving ... on URL`` line on stdout; stdout and stderr
    both go to ``log_path``. Raises RuntimeError (with the log) if it exits or times out.
    """
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [ALBATROSS, "serve", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    served = Served(proc, log_path, config_path)
    deadline = time.monotonic() + timeout
    while True:
        m = _SERVING.search(served.log())
        if m:
            served.url = m[1]
            return served
        if proc.poll() is not None:
            raise RuntimeError(f"albatross serve exited with {proc.returncode}:\n{served.log()}")
        if time.monotonic() > deadline:
            served.stop()
            raise RuntimeError(
                f"albatross serve not serving after {timeout:.0f} s:\n{served.log()}"
            )
        time.sleep(0.05)


# ---- processes ---------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    f = _stat(pid)
    return f is not None and f[0] not in ("Z", "X")


def descendants(root: int) -> set[int]:
    """Every process whose ppid chain leads to ``root`` (threads are not processes here)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (f := _stat(int(entry.name))) is not None:
            parent[int(entry.name)] = int(f[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``cond`` until it is true (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# ---- HTTP --------------------------------------------------------------------------


@dataclass(frozen=True)
class SSEEvent:
    id: int | None
    data: str

    def json(self) -> dict[str, object]:
        obj: dict[str, object] = json.loads(self.data)
        return obj


def sse_events(chunks: Iterable[str]) -> Iterator[SSEEvent]:
    """Parse an SSE body (text chunks) into events; ``id`` is parsed as an int."""
    buf = ""
    for chunk in chunks:
        buf += chunk.replace("\r\n", "\n")
        while "\n\n" in buf:
            block, buf = buf.split("\n\n", 1)
            ev_id: int | None = None
            data: list[str] = []
            for line in block.split("\n"):
                if line.startswith("id:"):
                    ev_id = int(line[3:].strip())
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
            if data or ev_id is not None:
                yield SSEEvent(ev_id, "\n".join(data))
    if buf.strip():
        raise AssertionError(f"stream ended in the middle of an event: {buf!r}")


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0.0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not m or m[1] != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m[3])
    return total


def health(client: httpx.Client, url: str) -> tuple[int, dict[str, object]]:
    r = client.get(url + "/health")
    return r.status_code, r.json()


def ready_count(body: dict[str, object], model: str = MODEL) -> int:
    models = body.get("models")
    assert isinstance(models, dict)
    return int(models[model]["ready"])
