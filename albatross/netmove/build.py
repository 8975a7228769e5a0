"""Compile the eBPF programs of connection migration, once per source version.

``python -m albatross.netmove.build`` compiles every ``bpf/*.c`` with clang into
``<root>/bpf/<key>/NAME.o`` and prints one path per line, where ``<root>`` is
``$ALBATROSS_CACHE`` or ``~/.cache/albatross`` and ``<key>`` is a hash of the sources,
the headers and the compiler flags. A second run finds the objects and compiles
nothing, so the set-up script can call it every time.

The multiarch include directory (``/usr/include/x86_64-linux-gnu``) must be on the
include path: ``linux/types.h`` pulls ``asm/types.h`` from there, and clang's BPF target
does not look for it by itself. Objects are written to a temporary name and renamed,
so a concurrent or interrupted build never leaves half a file under the final name.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from albatross.netmove.errors import BuildError

__all__ = ["BPF_SOURCE_DIR", "bpf_object", "build_all", "build_key", "cache_dir", "main"]

BPF_SOURCE_DIR = Path(__file__).parent / "bpf"
PROGRAMS = ("hold_egress", "guard_xdp")
"""The programs, by source file stem; each is one object file."""


def _multiarch_include() -> str:
    arch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    return f"/usr/include/{arch}"


def _flags() -> list[str]:
    return ["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-I", _multiarch_include()]


def build_key() -> str:
    """Hash of every source and header plus the flags: a new key means a new build."""
    digest = hashlib.sha256(" ".join(_flags()).encode())
    for path in sorted(BPF_SOURCE_DIR.iterdir()):
        if path.suffix in (".c", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where this version's objects live (not created here)."""
    env = os.environ.get("ALBATROSS_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "albatross"
    return root / "bpf" / build_key()


def _compile(name: str, target: Path) -> None:
    clang = shutil.which("clang")
    if clang is None:
        raise BuildError(
            "clang is not installed; run scripts/setup.sh as root, or "
            "apt-get install -y --no-install-recommends clang llvm libbpf-dev"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".o")
    os.close(fd)
    tmp = Path(tmp_name)
    source = BPF_SOURCE_DIR / f"{name}.c"
    try:
        done = subprocess.run(
            [clang, *_flags(), "-c", str(source), "-o", str(tmp)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise BuildError(
                f"clang failed on {source} (exit {done.returncode}); is libbpf-dev "
                f"installed (bpf/bpf_helpers.h)?\n{done.stderr.strip()}"
            )
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def bpf_object(name: str) -> Path:
    """The compiled object for program ``name`` (a ``bpf/*.c`` stem), built if missing."""
    if name not in PROGRAMS:
        raise BuildError(f"program: {name!r} is not one of {', '.join(PROGRAMS)}")
    target = cache_dir() / f"{name}.o"
    if not target.is_file():
        _compile(name, target)
    return target


def build_all() -> list[Path]:
    """Every program's object, compiling the missing ones."""
    return [bpf_object(name) for name in PROGRAMS]


def main() -> int:
    try:
        paths = build_all()
    except BuildError as exc:
        print(f"albatross.netmove.build: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
