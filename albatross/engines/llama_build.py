"""Locate or build the ``llama-server`` binary: once per version and patch set, cached.

There is no Debian package or prebuilt wheel of llama-server, so it is built from the
llama.cpp sources vendored in the PyPI sdist of ``llama-cpp-python`` (pinned below),
with our patches applied. Contract of :func:`llama_server_binary`:

- ``cfg.binary`` set: that file is returned if it is an executable file, otherwise
  :class:`EngineSetupError` names the path. Nothing is built.
- otherwise the binary lives at ``<root>/llama-server/<version>-<patchhash>/llama-server``
  where ``<root>`` is ``cfg.cache_dir``, ``$ALBATROSS_CACHE`` or ``~/.cache/albatross``
  and ``<patchhash>`` is the first 8 hex digits of the sha256 of the patch files' bytes
  (sorted by name). A changed patch therefore means a new build, never a stale binary.
- a missing binary is built (about 7 min on 2 cores). The whole build runs under an
  ``fcntl`` lock, so concurrent callers build once and the others wait and reuse it;
  the binary is copied under a temporary name and renamed, so the final path exists
  only when complete. Build output goes to a log file whose path is reported; any
  failure raises :class:`EngineSetupError` naming the log.

No command is run through a shell.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from albatross.config import LlamaServerConfig

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
PATCH_DIR = Path(__file__).with_name("patches")
BINARY_NAME = "llama-server"

# Exactly the configuration measured in RECIPES.md. LLAMA_USE_PREBUILT_UI=OFF is
# required: otherwise the build downloads a web UI, and only PyPI is reachable.
CMAKE_OPTIONS = (
    "-G",
    "Ninja",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
)
REQUIRED_TOOLS = {"cmake": "cmake", "ninja": "ninja-build", "c++": "g++", "patch": "patch"}


class EngineSetupError(Exception):
    """Raised when an engine binary or model cannot be found or built.

    The message says what was missing or which step failed and, for build failures,
    which log file holds the details. Fix the cause (install the named tool, correct
    the configured path) and run again; completed steps are cached.
    """


def patch_files() -> list[Path]:
    """Our llama.cpp patches, in the order they are applied."""
    return sorted(PATCH_DIR.glob("*.patch"))


def build_key(patches: Sequence[Path] | None = None) -> str:
    """``<version>-<first 8 hex of sha256 over the patches' bytes, in order>``."""
    digest = hashlib.sha256()
    for p in patch_files() if patches is None else patches:
        digest.update(p.read_bytes())
    return f"{LLAMA_CPP_PYTHON_VERSION}-{digest.hexdigest()[:8]}"


def cache_root(configured: Path | None = None) -> Path:
    """``configured``, else ``$ALBATROSS_CACHE``, else ``~/.cache/albatross``."""
    if configured is not None:
        return configured.expanduser()
    env = os.environ.get("ALBATROSS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "albatross"


def cached_binary_path(cfg: LlamaServerConfig, patches: Sequence[Path] | None = None) -> Path:
    """Where the built binary for this version and patch set lives (it may not exist)."""
    return cache_root(cfg.cache_dir) / "llama-server" / build_key(patches) / BINARY_NAME


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def llama_server_binary(cfg: LlamaServerConfig, progress: Callable[[str], None] = print) -> Path:
    """Return a runnable llama-server: the configured one, the cached one, or a new build.

    Raises :class:`EngineSetupError` when the configured binary is unusable, a build
    tool is missing, or a build step fails.
    """
    if cfg.binary is not None:
        path = cfg.binary.expanduser()
        if not path.exists():
            raise EngineSetupError(f"llama_server.binary = {str(path)!r}: no such file")
        if not _is_executable(path):
            raise EngineSetupError(f"llama_server.binary = {str(path)!r}: not an executable file")
        return path
    target = cached_binary_path(cfg)
    if _is_executable(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / ".lock", progress):
        # Another process may have finished the build while we waited for the lock.
        if not _is_executable(target):
            _build(target, progress)
    return target


@contextmanager
def file_lock(lock_path: Path, progress: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``lock_path`` (created if needed).

    Says so through ``progress`` when another process holds it and we wait. The
    kernel drops the lock if the holder dies, so a crashed build never blocks forever.
    """
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process to finish ({lock_path} is locked)")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_tools() -> None:
    missing = [pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise EngineSetupError(
            "building llama-server needs tools that are not installed; "
            f"install them with: apt-get install -y {' '.join(missing)}"
        )


def _build(target: Path, progress: Callable[[str], None]) -> None:
    _check_tools()
    log_path = target.parent / "build.log"
    started = time.monotonic()
    progress(f"llama-server: building {target.parent.name} (log: {log_path})")
    with (
        open(log_path, "w") as log,
        tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as tmp_name,
    ):
        tmp = Path(tmp_name)

        def run(phase: str, args: list[str], cwd: Path | None = None) -> None:
            _run_logged(phase, args, log, log_path, cwd)

        progress(f"llama-server: downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sources")
        run(
            "download",
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                "-d",
                str(tmp / "dl"),
            ],
        )
        progress("llama-server: extracting")
        src = _extract_sdist(tmp / "dl", tmp / "src", log_path)
        for p in patch_files():
            progress(f"llama-server: applying {p.name}")
            run(f"patch {p.name}", ["patch", "-p1", "--batch", "--forward", "-i", str(p)], src)
        progress("llama-server: configuring (cmake)")
        build_dir = tmp / "build"
        run("cmake configure", ["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_OPTIONS])
        jobs = len(os.sched_getaffinity(0))
        progress(f"llama-server: compiling with {jobs} jobs (about 7 min on 2 cores)")
        run(
            "cmake build",
            ["cmake", "--build", str(build_dir), "--target", BINARY_NAME, f"-j{jobs}"],
        )
        built = build_dir / "bin" / BINARY_NAME
        if not _is_executable(built):
            raise EngineSetupError(f"the build finished but {built} is missing; see {log_path}")
        # Copy then rename: the final path only ever holds a complete binary.
        partial = target.with_name(f".{BINARY_NAME}.{os.getpid()}.tmp")
        shutil.copy2(built, partial)
        partial.chmod(0o755)
        partial.replace(target)
    progress(f"llama-server: built {target} in {time.monotonic() - started:.0f} s")


def _run_logged(
    phase: str, args: list[str], log: IO[str], log_path: Path, cwd: Path | None
) -> None:
    log.write(f"\n$ {' '.join(args)}\n")
    log.flush()
    try:
        done = subprocess.run(
            args,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    except OSError as exc:
        raise EngineSetupError(f"llama-server {phase}: cannot run {args[0]}: {exc}") from exc
    if done.returncode != 0:
        raise EngineSetupError(
            f"llama-server {phase} failed (exit {done.returncode}); see {log_path}"
        )


def _extract_sdist(dl: Path, dest: Path, log_path: Path) -> Path:
    """Extract the one downloaded sdist; return its ``vendor/llama.cpp`` directory."""
    archives = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    if len(archives) != 1:
        raise EngineSetupError(f"expected one llama-cpp-python sdist in {dl}; see {log_path}")
    try:
        with tarfile.open(archives[0]) as tar:
            tar.extractall(dest, filter="data")  # "data": refuse paths outside dest
    except (tarfile.TarError, OSError) as exc:
        raise EngineSetupError(f"cannot extract {archives[0].name}: {exc}") from exc
    src = dest / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        raise EngineSetupError(f"{archives[0].name} has no vendor/llama.cpp/CMakeLists.txt")
    return src


def main() -> int:
    """Print the binary's path on stdout (building it if needed); progress goes to stderr."""
    try:
        path = llama_server_binary(
            LlamaServerConfig(), progress=lambda line: print(line, file=sys.stderr, flush=True)
        )
    except EngineSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
