"""Start a real llama-server for a test and stop it afterwards.

:func:`running_llama_server` yields only once the server answers ``GET /health`` with
200 (so "started" means ready), and always stops it on exit: SIGTERM to its process
group, 5 s grace, then SIGKILL. The server runs in its own session (``setsid``) with
stdin from /dev/null and its output appended to a log file, the way the supervisor
runs engines.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0


class LlamaServerStartError(RuntimeError):
    """Raised when llama-server exits or is not healthy within the timeout.

    The message carries the tail of its log.
    """


def free_port() -> int:
    """A TCP port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def healthy(url: str) -> bool:
    """``GET url/health`` answers 200 (False while refused or loading)."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        # Refused while starting, 503 while loading the model.
        return False


def log_tail(path: Path, n: int = 2000) -> str:
    """The last ``n`` bytes of a log, for error messages."""
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"


@contextmanager
def running_llama_server(
    binary: Path,
    model_path: Path,
    *,
    port: int | None = None,
    parallel: int = 4,
    ctx: int = 4096,
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
) -> Iterator[str]:
    """Run ``binary`` on ``model_path`` and yield its base URL ``http://127.0.0.1:PORT``.

    ``ctx`` is the total context, shared by the ``parallel`` slots. The log goes to
    ``log_path`` (default: a new temporary file, kept after exit for post-mortems).
    """
    port = free_port() if port is None else port
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"llama-server-{port}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    args = [
        str(binary), "--host", "127.0.0.1", "--port", str(port), "-m", str(model_path),
        "-np", str(parallel), "-c", str(ctx), "-t", "1", *extra_args,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not healthy(url):
            if proc.poll() is not None:
                raise LlamaServerStartError(
                    f"llama-server exited with {proc.returncode}; log {log_path}:\n"
                    + log_tail(log_path)
                )
            if time.monotonic() > deadline:
                raise LlamaServerStartError(
                    f"llama-server not healthy after {READY_TIMEOUT_S:.0f} s; log {log_path}:\n"
                    + log_tail(log_path)
                )
            time.sleep(0.05)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, wait the grace period, warn, then SIGKILL it."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            warnings.warn(
                f"llama-server pid {proc.pid} ignored SIGTERM for {STOP_GRACE_S} s; killing it",
                stacklevel=2,
            )
    # Also kills any child left in the group when the leader already exited.
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
