"""The criu binary as a few typed verbs: dump a process tree, restore it, undo leftovers.

What stays true (each rule learnt on a real engine, see RECIPES.md: CRIU):

- criu is run with an argv list, never a shell; its log goes into the image directory
  (``dump.log`` / ``restore.log``) and a failure raises :class:`CriuError` quoting
  criu's own error lines, the image directory and the log's path;
- images and logs are created owner-only (criu runs with umask 077);
- a dump records what a restore must repeat in ``albatross-dump.json`` next to the
  images: the root pid and the other pids of the tree, whether ``--shell-job`` and
  ``--tcp-established`` were used, the unix sockets marked external, the nftables
  table of the network lock and the ``link_remap.*`` files criu created. A restore
  reads it, so callers cannot pass options that disagree with the dump;
- a restore waits until every dumped pid is gone from /proc (a zombie still holds its
  pid; restoring then fails with ``Can't fork for PID: File exists``), runs criu with
  ``--restore-detached --restore-sibling`` so the restored root becomes *our* child
  (its ``PR_SET_PDEATHSIG`` would otherwise fire the moment criu exits) and returns
  the restored pid;
- unix sockets connected to peers outside the tree cannot be dumped as they are;
  they are marked ``--external unix[INODE]`` and handed back at restore as dead
  placeholders (``--inherit-fd``), which the engine sees as a closed connection and
  reconnects by path — which only works where that path is shared;
- leftovers of a dump that is never restored are removed by :meth:`Criu.discard`: the
  ``CRIU-*`` nftables table that still drops the dumped connections' packets, and the
  ``link_remap.*`` hard links criu left next to deleted-but-open files.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

DUMP_INFO = "albatross-dump.json"
DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
RESTORED_PIDFILE = "restored.pid"
REQUIRED_IMAGES = ("inventory.img", "pstree.img")
"""Files every criu image has; a directory without them is not an image."""

# Printed by criu on every call when it cannot raise its own RLIMIT_NOFILE; harmless.
_HARMLESS = ("Can't setup RLIMIT_NOFILE",)
_ERROR_LINE = re.compile(r"^\([0-9. ]+\)\s+(Error \(.*)$")
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# criu names its lock table "CRIU-<dump uuid>", cut to fit a 32-byte "inet <name>" buffer.
_NFT_TABLE_LEN = 31 - len("inet ")
_REMAP_PATH = re.compile(rb"/[^\x00]*/link_remap\.[0-9]+")


def _owner_only() -> None:
    """In criu's child process before exec: everything it creates is owner-only."""
    os.umask(0o077)


class CriuError(Exception):
    """Raised when criu fails, or an image cannot be used.

    ``action`` is ``dump`` or ``restore``, ``image_dir`` the image, ``errors`` criu's
    own error lines (most relevant last) and ``log_path`` its full log. After a failed
    dump the process keeps running (criu resumes it); after a failed restore nothing
    of the image was started. Either way the caller decides what next: retry, or
    start the engine cold.
    """

    def __init__(
        self,
        action: str,
        image_dir: Path,
        message: str,
        *,
        errors: Sequence[str] = (),
        log_path: Path | None = None,
    ) -> None:
        self.action = action
        self.image_dir = image_dir
        self.errors = list(errors)
        self.log_path = log_path
        text = f"criu {action} of image {image_dir}: {message}"
        if self.errors:
            text += "; criu said: " + " | ".join(self.errors[-4:])
        if log_path is not None:
            text += f" (log: {log_path})"
        super().__init__(text)


class ImageMissingError(CriuError):
    """Raised by a restore when the image directory or one of its required files is
    absent (never dumped, deleted, or a partial copy): start the engine cold."""


@dataclass(frozen=True)
class DumpOptions:
    """What to ask of criu at dump time (and so, through the dump record, at restore)."""

    tcp_established: bool = False
    """Dump open TCP connections (``--tcp-established``) and lock them with nftables
    until the restore: a client connection survives, as long as the restored process
    gets the same IP address."""
    leave_running: bool = False
    """Keep the process running after the dump (default: criu kills it)."""
    link_remap: bool = True
    """``--link-remap``: hard-link deleted-but-open files back instead of failing."""
    external_unix: tuple[int, ...] | None = None
    """Inodes of unix sockets to mark external; None = every connected unix socket of
    the tree whose peer is outside it (found with ``ss``)."""


@dataclass(frozen=True)
class DumpRecord:
    """What a dump wrote into ``albatross-dump.json``; read back by every restore."""

    pid: int
    pids: tuple[int, ...]
    shell_job: bool
    tcp_established: bool
    external_unix: tuple[int, ...]
    nft_table: str | None
    link_remaps: tuple[str, ...] = field(default=())

    @classmethod
    def read(cls, image_dir: Path) -> DumpRecord:
        try:
            raw = json.loads((image_dir / DUMP_INFO).read_text())
            return cls(
                pid=int(raw["pid"]),
                pids=tuple(int(p) for p in raw["pids"]),
                shell_job=bool(raw["shell_job"]),
                tcp_established=bool(raw["tcp_established"]),
                external_unix=tuple(int(i) for i in raw["external_unix"]),
                nft_table=raw["nft_table"],
                link_remaps=tuple(raw.get("link_remaps", ())),
            )
        except FileNotFoundError as exc:
            raise ImageMissingError(
                "restore", image_dir, f"{DUMP_INFO} is missing: not a complete image"
            ) from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CriuError("restore", image_dir, f"{DUMP_INFO} is unreadable: {exc!r}") from exc


@dataclass(frozen=True)
class DumpResult:
    record: DumpRecord
    seconds: float


class Criu:
    """One criu executable (and optionally an ``nft`` CLI for lock clean-up)."""

    def __init__(self, binary: Path, *, nft: Path | None = None, timeout_s: float = 300.0) -> None:
        """``nft`` defaults to an ``nft`` next to ``binary`` (the private install has
        one), else the host's. ``timeout_s`` bounds one criu run."""
        self.binary = binary
        sibling = binary.with_name("nft")
        found = shutil.which("nft")
        self.nft = (
            nft
            or (sibling if os.access(sibling, os.X_OK) else None)
            or (Path(found) if found else None)
        )
        self.timeout_s = timeout_s

    # --- verbs ---------------------------------------------------------------------

    async def dump(
        self, pid: int, image_dir: Path, options: DumpOptions = DumpOptions()
    ) -> DumpResult:
        """Dump the tree rooted at ``pid`` into ``image_dir`` (created 0700; must be empty).

        Raises :class:`CriuError` when the process is gone or criu fails; the process
        then keeps running.
        """
        _prepare_dump(pid, image_dir)
        pids = tree_pids(pid)
        shell_job = os.getsid(pid) != pid  # only a session leader restores without a tty dance
        external = (
            tuple(options.external_unix)
            if options.external_unix is not None
            else outside_unix_peers(pids)
        )
        argv = [str(self.binary), "dump", "-t", str(pid), "-D", str(image_dir), "-o", DUMP_LOG]
        argv += ["-v4"]
        if shell_job:
            argv.append("--shell-job")
        if options.tcp_established:
            argv += ["--tcp-established", "--network-lock", "nftables"]
        if options.leave_running:
            argv.append("--leave-running")
        if options.link_remap:
            argv.append("--link-remap")
        for inode in external:
            argv += ["--external", f"unix[{inode}]"]
        started = time.monotonic()
        await self._run("dump", argv, image_dir, image_dir / DUMP_LOG)
        seconds = time.monotonic() - started
        record = DumpRecord(
            pid=pid,
            pids=tuple(pids),
            shell_job=shell_job,
            tcp_established=options.tcp_established,
            external_unix=external,
            nft_table=_nft_table(image_dir) if options.tcp_established else None,
            link_remaps=tuple(_link_remaps(image_dir)),
        )
        info = image_dir / DUMP_INFO
        fd = os.open(info, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(record), f)
        return DumpResult(record, seconds)

    async def restore(
        self, image_dir: Path, *, mount_ns: Path | None = None, wait_gone_s: float = 10.0
    ) -> int:
        """Restore the image, detached, as a child of this process; return its pid.

        ``mount_ns`` (e.g. ``/proc/PID/ns/mnt`` of a process in the target container)
        restores into that mount namespace; there the engine's files, the image and
        this criu install must exist at the same paths. Raises
        :class:`ImageMissingError` for a missing image and :class:`CriuError` when a
        dumped pid is still taken after ``wait_gone_s`` or criu fails.
        """
        record = _read_image(image_dir)
        await wait_gone(record.pids, wait_gone_s, image_dir)
        pidfile = image_dir / RESTORED_PIDFILE
        pidfile.unlink(missing_ok=True)
        argv = [str(self.binary), "restore", "-D", str(image_dir), "-o", RESTORE_LOG, "-v4"]
        argv += ["--restore-detached", "--restore-sibling", "--pidfile", RESTORED_PIDFILE]
        if record.shell_job:
            argv.append("--shell-job")
        if record.tcp_established:
            argv.append("--tcp-established")
        placeholders: list[socket.socket] = []
        try:
            for inode in record.external_unix:
                # A dead placeholder: its peer is closed at once, so the engine reads EOF
                # and reconnects by path, as it would after its peer restarted.
                mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                peer.close()
                placeholders.append(mine)
                argv += ["--inherit-fd", f"fd[{mine.fileno()}]:socket:[{inode}]"]
            if mount_ns is not None:
                argv = ["nsenter", f"--mount={mount_ns}", "--", *argv]
            pass_fds = tuple(s.fileno() for s in placeholders)
            try:
                await self._run("restore", argv, image_dir, image_dir / RESTORE_LOG, pass_fds)
            except CriuError:
                # With --restore-sibling the half-restored root was our child: criu
                # killed it, we must reap it, or its zombie keeps the pid taken.
                await _reap(record.pid)
                raise
        finally:
            for s in placeholders:
                s.close()
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError) as exc:
            raise CriuError(
                "restore", image_dir, f"criu succeeded but wrote no usable {RESTORED_PIDFILE}"
            ) from exc

    def discard(self, image_dir: Path) -> list[str]:
        """Undo what a dump left outside its image when it will not be restored.

        Removes the dump's nftables lock table (it drops the dumped connections'
        packets until deleted) and its ``link_remap.*`` files. Returns what was
        removed; a missing dump record means nothing to undo.
        """
        try:
            record = DumpRecord.read(image_dir)
        except CriuError:
            return []
        removed = []
        if record.nft_table and self.remove_nft_table(record.nft_table):
            removed.append(f"nft table inet {record.nft_table}")
        for path in record.link_remaps:
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
        return removed

    def remove_nft_table(self, name: str) -> bool:
        """Delete ``inet NAME`` if present; True if it was. Needs an ``nft`` CLI."""
        if not name.startswith("CRIU-"):
            raise ValueError(f"refusing to delete nft table {name!r}: not a CRIU lock table")
        if self.nft is None:
            raise CriuError(
                "discard", Path("."), f"cannot remove nft table {name}: no nft command found"
            )
        listed = subprocess.run(
            [str(self.nft), "list", "tables"], capture_output=True, text=True, check=False
        )
        if f"table inet {name}" not in listed.stdout.split("\n"):
            return False
        done = subprocess.run(
            [str(self.nft), "delete", "table", "inet", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise CriuError(
                "discard", Path("."), f"nft delete table inet {name}: {done.stderr.strip()}"
            )
        return True

    async def check(self) -> None:
        """Run ``criu check``; raises :class:`CriuError` unless it says "Looks good"."""
        proc = await asyncio.create_subprocess_exec(
            str(self.binary),
            "check",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        text = out.decode("utf-8", "replace")
        if proc.returncode != 0 or "Looks good" not in text:
            lines = [ln for ln in text.splitlines() if ln and not _harmless(ln)]
            raise CriuError("check", Path("."), "criu check failed", errors=lines)

    # --- plumbing ------------------------------------------------------------------

    async def _run(
        self,
        action: str,
        argv: list[str],
        image_dir: Path,
        log_path: Path,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=pass_fds,
                # Not ``umask=``: uvloop's subprocess support does not take it.
                preexec_fn=_owner_only,
            )
        except OSError as exc:
            raise CriuError(action, image_dir, f"cannot run {argv[0]}: {exc}") from exc
        try:
            async with asyncio.timeout(self.timeout_s):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise CriuError(
                action, image_dir, f"criu did not finish in {self.timeout_s:g} s", log_path=log_path
            ) from None
        if proc.returncode != 0:
            errors = log_errors(log_path)
            if not errors:
                text = out.decode("utf-8", "replace")
                errors = [ln for ln in text.splitlines() if ln.strip() and not _harmless(ln)]
            raise CriuError(
                action,
                image_dir,
                f"criu exited with {proc.returncode}",
                errors=errors,
                log_path=log_path,
            )


# Local, instant file-system checks, kept out of the async verbs.
def _prepare_dump(pid: int, image_dir: Path) -> None:
    if not os.path.exists(f"/proc/{pid}"):
        raise CriuError("dump", image_dir, f"no process {pid}")
    image_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(image_dir.iterdir()):
        raise CriuError("dump", image_dir, "the image directory is not empty")


def _read_image(image_dir: Path) -> DumpRecord:
    if not image_dir.is_dir():
        raise ImageMissingError("restore", image_dir, "no such image directory")
    missing = [name for name in REQUIRED_IMAGES if not (image_dir / name).is_file()]
    if missing:
        raise ImageMissingError("restore", image_dir, f"missing {', '.join(missing)}")
    return DumpRecord.read(image_dir)


def _still_there(pids: Sequence[int]) -> list[int]:
    return [p for p in pids if os.path.exists(f"/proc/{p}")]


async def _reap(pid: int, limit_s: float = 2.0) -> None:
    """Reap our child ``pid`` once it has exited; no-op if it is not our child."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        if _reaped(pid):
            return
        await asyncio.sleep(0.02)


def _reaped(pid: int) -> bool:
    """Reap ``pid`` if it has exited; True when there is nothing (more) to wait for."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done != 0


def _harmless(line: str) -> bool:
    return any(h in line for h in _HARMLESS)


def log_errors(log_path: Path) -> list[str]:
    """criu's ``Error (...)`` lines from ``log_path``, timestamps cut, harmless ones out."""
    try:
        text = log_path.read_text("utf-8", "replace")
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        m = _ERROR_LINE.match(line)
        if m and not _harmless(line):
            found.append(m.group(1).strip())
    return found


def tree_pids(pid: int) -> list[int]:
    """``pid``, its threads and all its descendants (and theirs), from /proc."""
    seen: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            if int(tid) not in seen and int(tid) != p:
                seen.append(int(tid))
            try:
                children = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(c) for c in children)
    return seen


def socket_inodes(pids: Iterable[int]) -> set[int]:
    """Inodes of every socket the given processes hold open."""
    inodes = set()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def outside_unix_peers(pids: Iterable[int]) -> tuple[int, ...]:
    """Connected unix sockets of ``pids`` whose peer is not in ``pids`` (from ``ss -xan``)."""
    mine = socket_inodes(pids)
    if not mine:
        return ()
    out = subprocess.run(["ss", "-xan"], capture_output=True, text=True, check=False).stdout
    external = []
    for line in out.splitlines()[1:]:
        cols = line.split()
        # "u_str ESTAB 0 0 <path or *> <inode> <peer path or *> <peer inode>"
        if len(cols) < 8 or not (cols[-1].isdigit() and cols[-3].isdigit()):
            continue
        local, peer = int(cols[-3]), int(cols[-1])
        if local in mine and peer != 0 and peer not in mine:
            external.append(local)
    return tuple(sorted(set(external)))


async def wait_gone(pids: Iterable[int], limit_s: float, image_dir: Path) -> None:
    """Wait until no ``/proc/PID`` of ``pids`` exists (reaped, not just dead)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    pids = list(pids)
    while taken := _still_there(pids):
        if loop.time() > deadline:
            raise CriuError(
                "restore",
                image_dir,
                f"pids {taken} of the dumped tree are still in use after {limit_s:g} s "
                "(the old process is not reaped, or another process took the pid)",
            )
        await asyncio.sleep(0.02)


def _nft_table(image_dir: Path) -> str | None:
    """The lock table criu named after the dump's uuid (stored in inventory.img)."""
    try:
        m = _UUID.search((image_dir / "inventory.img").read_bytes())
    except OSError:
        return None
    return ("CRIU-" + m.group().decode())[:_NFT_TABLE_LEN] if m else None


def _link_remaps(image_dir: Path) -> list[str]:
    """Paths of ``link_remap.N`` files named in the image's file table.

    Paths are length-prefixed protobuf strings (a one- or two-byte varint, then the
    bytes); a candidate counts only where the prefix is exactly its own length, so no
    neighbouring bytes leak into a path. A byte inside the path can also happen to
    equal the length of the rest (``.../pytest-284/x`` with ``"4"`` = 52): of the
    candidates ending at one occurrence, the longest is the path (it is absolute).
    """
    try:
        data = (image_dir / "files.img").read_bytes()
    except OSError:
        return []
    found = set()
    for m in re.finditer(rb"/link_remap\.", data):
        best: bytes | None = None
        for start in range(m.start(), max(1, m.start() - 4096), -1):
            if data[start] != ord("/"):
                continue
            lengths = [data[start - 1]]
            if start >= 2 and data[start - 2] & 0x80:
                lengths.append((data[start - 2] & 0x7F) | (data[start - 1] << 7))
            for length in lengths:
                text = data[start : start + length]
                if (
                    len(text) == length
                    and _REMAP_PATH.fullmatch(text)
                    and (best is None or len(text) > len(best))
                ):
                    best = text
        if best is not None:
            found.add(best.decode("utf-8", "replace"))
    return sorted(found)
