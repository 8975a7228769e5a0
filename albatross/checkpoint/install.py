"""Install CRIU 4.1.1 into a private root: ``python -m albatross.checkpoint.install``.

Why a private root: Debian 12's criu 3.17.1 fails on current kernels (vDSO handling),
and CRIU 4.1.1 from Debian 13 (trixie) needs trixie's glibc. Installing trixie's libc
system-wide would upgrade the host under every other program, so instead the trixie
packages are unpacked (``dpkg -x``, no maintainer scripts) into
``<cache>/criu-4.1.1/root`` and criu is run through that root's own dynamic loader with
that root's libraries first on the search path. Nothing outside the cache directory
changes: apt runs with a private sources list, package lists and archive cache, so the
host's apt configuration never sees trixie.

A small ``LD_PRELOAD`` shim (``shim/passcred_shim.c``, compiled here with gcc) makes
``--tcp-established`` work with 4.1.1 on kernels >= 6.16; see the C file for why.

Contract:

- the result is ``<cache>/criu-4.1.1/bin/criu``, an executable wrapper that runs criu
  through the private loader with the shim preloaded (plus ``bin/nft``, the matching
  nftables CLI, used to remove network locks that a dump left behind);
- the install is idempotent: a complete install is recognised by a stamp file (which
  covers the shim's source, so an edited shim is rebuilt) and returned at once without
  touching the network; concurrent installers serialise on a file lock;
- every step says what it does on ``progress``; a failing step raises
  :class:`CriuInstallError` naming the step, the command and the log file.

Running criu needs root (CAP_SYS_ADMIN and friends); installing does not.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from albatross.engines.llama_build import cache_root, file_lock

CRIU_VERSION = "4.1.1"
SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
ROOT_PACKAGES = ("criu", "nftables")
"""Installed with their whole ``Depends`` closure from trixie (about 30 packages, 9 MB)."""
SHIM_SOURCE = Path(__file__).with_name("shim") / "passcred_shim.c"
LOADER = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
LIB_DIR = "usr/lib/x86_64-linux-gnu"
SYSTEM_LIB_DIR = "/usr/lib/x86_64-linux-gnu"
REQUIRED_TOOLS = {"apt-get": "apt", "apt-cache": "apt", "dpkg": "dpkg", "gcc": "gcc"}

Progress = Callable[[str], None]


class CriuInstallError(Exception):
    """Raised when CRIU cannot be installed: a tool is missing, the Debian mirror is not
    reachable, or a step failed. The message names the step and the log with details;
    fix the cause and run the installer again (it starts the failed step over)."""


def install_dir(cache: Path | None = None) -> Path:
    """``<cache>/criu-4.1.1``; ``cache`` defaults as for the llama-server build."""
    return cache_root(cache) / f"criu-{CRIU_VERSION}"


def wrapper_path(cache: Path | None = None) -> Path:
    """Where the criu wrapper of a complete install lives (it may not exist yet)."""
    return install_dir(cache) / "bin" / "criu"


def _stamp() -> str:
    digest = hashlib.sha256(SHIM_SOURCE.read_bytes())
    digest.update(f"{CRIU_VERSION} {SUITE} {' '.join(ROOT_PACKAGES)}".encode())
    return digest.hexdigest()


def installed_criu(cache: Path | None = None) -> Path | None:
    """The wrapper if a complete, current install exists, else None. No side effects."""
    base = install_dir(cache)
    try:
        complete = (base / ".complete").read_text().strip() == _stamp()
    except OSError:
        return None
    wrapper = base / "bin" / "criu"
    return wrapper if complete and os.access(wrapper, os.X_OK) else None


def install_criu(cache: Path | None = None, progress: Progress = print) -> Path:
    """Install (once) and return the criu wrapper; see the module docstring."""
    done = installed_criu(cache)
    if done is not None:
        return done
    base = install_dir(cache)
    base.mkdir(parents=True, exist_ok=True)
    with file_lock(base / ".lock", progress):
        done = installed_criu(cache)  # another installer may have finished meanwhile
        if done is not None:
            return done
        return _install(base, progress)


def _install(base: Path, progress: Progress) -> Path:
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise CriuInstallError(
            f"installing CRIU needs tools that are not installed; run: apt-get install -y "
            f"{' '.join(missing)}"
        )
    started = time.monotonic()
    (base / ".complete").unlink(missing_ok=True)
    log_path = base / "install.log"
    with open(log_path, "w") as log:

        def run(step: str, argv: list[str], cwd: Path | None = None) -> str:
            log.write(f"\n$ {shlex.join(argv)}\n")
            log.flush()
            try:
                done = subprocess.run(
                    argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True
                )
            except OSError as exc:
                raise CriuInstallError(
                    f"CRIU install, {step}: cannot run {argv[0]}: {exc}"
                ) from exc
            log.write(done.stdout + done.stderr)
            log.flush()
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise CriuInstallError(
                    f"CRIU install, {step}: {shlex.join(argv[:3])}... exited with "
                    f"{done.returncode}: {' / '.join(tail)} (full log: {log_path})"
                )
            return done.stdout

        apt = _apt_options(base / "apt")
        progress(f"criu: reading the Debian {SUITE} package list from {MIRROR}")
        run("apt-get update", ["apt-get", *apt, "update"])
        packages = _closure(
            run("apt-cache depends", ["apt-cache", *apt, *_DEPENDS, *ROOT_PACKAGES])
        )
        version = _candidate(run("apt-cache policy", ["apt-cache", *apt, "policy", "criu"]))
        if not version.startswith(f"{CRIU_VERSION}-"):
            raise CriuInstallError(
                f"Debian {SUITE} offers criu {version}, but {CRIU_VERSION} is the version this "
                "installer knows to work; set checkpoint.criu to a CRIU you installed yourself"
            )
        with tempfile.TemporaryDirectory(prefix=".install-", dir=base) as tmp_name:
            tmp = Path(tmp_name)
            debs, root = tmp / "debs", tmp / "root"
            debs.mkdir()
            progress(f"criu: downloading criu {version} and {len(packages) - 1} packages it needs")
            run("apt-get download", ["apt-get", *apt, "download", *packages], cwd=debs)
            progress(f"criu: unpacking into {base / 'root'}")
            for deb in sorted(debs.glob("*.deb")):
                run(f"dpkg -x {deb.name}", ["dpkg", "-x", str(deb), str(root)])
            progress("criu: compiling the SO_PASSCRED shim")
            shim = root / "passcred_shim.so"
            run(
                "gcc",
                ["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(shim), str(SHIM_SOURCE)],
            )
            # Replace the previous root in one rename, so a running criu never sees a
            # half-unpacked tree.
            old = base / "root"
            if old.exists():
                shutil.rmtree(old)
            root.replace(old)
        bindir = base / "bin"
        bindir.mkdir(exist_ok=True)
        root = base / "root"
        _write_wrapper(bindir / "criu", root, root / "usr/sbin/criu", root / "passcred_shim.so")
        _write_wrapper(bindir / "nft", root, root / "usr/sbin/nft", None)
        wrapper = bindir / "criu"
        out = run("criu --version", [str(wrapper), "--version"])
        if CRIU_VERSION not in out:
            raise CriuInstallError(f"{wrapper} --version printed {out.strip()!r}; see {log_path}")
        if os.geteuid() == 0:
            out = run("criu check", [str(wrapper), "check"])
            progress(f"criu: criu check: {out.strip().splitlines()[-1] if out.strip() else 'ok'}")
        else:
            progress("criu: not root, skipped `criu check` (running criu needs root)")
    (base / ".complete").write_text(_stamp() + "\n")
    progress(f"criu: installed {wrapper} in {time.monotonic() - started:.0f} s")
    return wrapper


_DEPENDS = (
    "depends",
    "--recurse",
    "--no-recommends",
    "--no-suggests",
    "--no-conflicts",
    "--no-breaks",
    "--no-replaces",
    "--no-enhances",
)


def _apt_options(state: Path) -> list[str]:
    """apt options for a private view of trixie: own sources, lists, cache, no pinning.

    The host's sources and preferences are ignored (``/dev/null``), so neither does
    this see the host's other repositories nor does the host ever see trixie.
    """
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    sources = state / "sources.list"
    sources.write_text(f"deb {MIRROR} {SUITE} main\n")
    return [
        "-o", f"Dir::Etc::SourceList={sources}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", "Dir::Etc::Preferences=/dev/null",
        "-o", "Dir::Etc::PreferencesParts=/dev/null",
        "-o", f"Dir::State::Lists={state / 'lists'}",
        "-o", f"Dir::Cache={state / 'cache'}",
        "-o", "APT::Architectures=amd64",
        "-o", "APT::Sandbox::User=root",
        "-q",
    ]  # fmt: skip


def _closure(depends_output: str) -> list[str]:
    """Package names from ``apt-cache depends --recurse`` (virtual ``<names>`` dropped)."""
    names = {
        line.strip()
        for line in depends_output.splitlines()
        if line and not line.startswith((" ", "<"))
    }
    return sorted(names)


def _candidate(policy_output: str) -> str:
    for line in policy_output.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Candidate":
            return value.strip()
    raise CriuInstallError(f"apt-cache policy criu gave no candidate version:\n{policy_output}")


def _write_wrapper(path: Path, root: Path, program: Path, preload: Path | None) -> None:
    """A two-line sh script that execs ``program`` through the private loader.

    ``exec`` keeps the wrapper's pid, which matters for ``criu restore
    --restore-sibling``: the restored tree becomes a child of whoever ran the wrapper.
    The host's library directory comes after the private one only as a fallback.
    """
    argv = [str(root / LOADER)]
    if preload is not None:
        argv += ["--preload", str(preload)]
    argv += ["--library-path", f"{root / LIB_DIR}:{SYSTEM_LIB_DIR}", str(program)]
    text = (
        "#!/bin/sh\n"
        f"# {program.name} {CRIU_VERSION} from Debian {SUITE}, run through its private root; "
        "written by python -m albatross.checkpoint.install\n"
        f'exec {shlex.join(argv)} "$@"\n'
    )
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text)
    partial.chmod(0o755)
    partial.replace(path)


def main() -> int:
    """Print the wrapper's path on stdout (installing if needed); progress goes to stderr."""
    try:
        path = install_criu(progress=lambda line: print(line, file=sys.stderr, flush=True))
    except CriuInstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
