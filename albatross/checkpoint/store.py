"""Checkpoint images on disk: one directory per replica and version, with metadata.

Layout: ``<root>/<model>/<replica>/<version>/`` holds criu's files plus
``metadata.json`` (engine, arguments, kernel, driver and CUDA versions, size, time,
dump and restore pids, and a sha256 per file). ``<version>`` is a sortable UTC time
stamp, so the newest image is the last name.

What stays true:

- everything is owner-only: directories 0700, files 0600 (an image holds the engine's
  whole memory: prompts, keys, KV caches);
- an image counts only once its ``metadata.json`` exists, which is written last
  (under a temporary name, then renamed); a directory without it is an unfinished
  dump and is never restored;
- :meth:`ImageStore.verify` recomputes every file's sha256 before a restore, so a
  damaged image is refused with the name of the damaged file instead of being
  restored into a process with silently wrong memory;
- the disk budget covers every image under the root. :meth:`ImageStore.admit` is
  asked before a dump (with an estimate) and :meth:`ImageStore.finish` checks again
  with the real size; either refuses with :class:`BudgetError`, whose message says
  how much is needed, used and allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METADATA = "metadata.json"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ImageCorruptError(Exception):
    """Raised by :meth:`ImageStore.verify` when a file of an image is missing, has
    changed size or content, or the metadata is unreadable. The image must not be
    restored; delete it and start the engine cold."""


class BudgetError(Exception):
    """Raised when an image would not fit the disk budget. The message gives the
    image's size, what the store already uses and the budget; raise
    ``checkpoint.disk_budget_bytes``, delete images, or let the policy stop the engine
    without an image."""


@dataclass(frozen=True)
class Image:
    """One image directory (complete or not)."""

    key: str
    version: str
    path: Path

    @property
    def metadata_path(self) -> Path:
        return self.path / METADATA

    def metadata(self) -> dict[str, Any]:
        """The metadata; raises ImageCorruptError when absent or unreadable."""
        try:
            data: dict[str, Any] = json.loads(self.metadata_path.read_text())
        except (OSError, ValueError) as exc:
            raise ImageCorruptError(f"image {self.path}: {METADATA} unreadable: {exc}") from exc
        return data


def host_versions() -> dict[str, str | None]:
    """Kernel, NVIDIA driver and CUDA versions of this host (None where absent).

    An image restores only on a compatible host; these are recorded so that a refusal
    can say why. The driver version comes from the kernel module, CUDA's from
    ``$CUDA_VERSION`` (set in NVIDIA's container images).
    """
    driver = None
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        m = re.search(r"Kernel Module\s+([0-9.]+)", text)
        driver = m.group(1) if m else None
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "nvidia_driver": driver,
        "cuda": os.environ.get("CUDA_VERSION"),
    }


def _slug(part: str) -> str:
    slug = _SAFE.sub("_", part).strip("._")
    if not slug:
        raise ValueError(f"image key part {part!r} has no usable characters")
    return slug


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def lock_down(path: Path) -> None:
    """Make ``path`` and everything under it owner-only (0700 dirs, 0600 files)."""
    path.chmod(0o700)
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o700)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o600)


class ImageStore:
    """Images under ``root`` with a disk budget (None = unlimited)."""

    def __init__(self, root: Path, *, budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes = {budget_bytes}: must be >= 0")
        self.root = root
        self.budget_bytes = budget_bytes

    # --- naming --------------------------------------------------------------------

    def key_dir(self, key: str) -> Path:
        """``<root>/<model>/<replica>`` for a key like ``"model/0"`` (each part slugged)."""
        parts = [_slug(p) for p in key.split("/") if p]
        if not parts:
            raise ValueError(f"image key {key!r} is empty")
        return self.root.joinpath(*parts)

    def images(self, key: str) -> list[Image]:
        """Complete images of ``key``, oldest first."""
        base = self.key_dir(key)
        try:
            names = sorted(p.name for p in base.iterdir() if (p / METADATA).is_file())
        except FileNotFoundError:
            return []
        return [Image(key, n, base / n) for n in names]

    def latest(self, key: str) -> Image | None:
        found = self.images(key)
        return found[-1] if found else None

    def new_image(self, key: str) -> Image:
        """Create an empty owner-only directory for a new version of ``key``."""
        base = self.key_dir(key)
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        for parent in [base, *base.parents]:
            if parent == self.root.parent:
                break
            parent.chmod(0o700)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for n in range(1000):
            version = f"{stamp}-{n:03d}"
            try:
                (base / version).mkdir(mode=0o700)
            except FileExistsError:
                continue
            return Image(key, version, base / version)
        raise RuntimeError(f"cannot create a new version directory under {base}")

    # --- budget --------------------------------------------------------------------

    def used_bytes(self, exclude: Path | None = None) -> int:
        """Bytes of all files under the root (optionally not counting one image)."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            if exclude is not None and Path(dirpath).is_relative_to(exclude):
                continue
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total

    def admit(self, size_bytes: int, *, what: str) -> None:
        """Raise BudgetError unless ``size_bytes`` more fits the budget."""
        if self.budget_bytes is None:
            return
        used = self.used_bytes()
        if used + size_bytes > self.budget_bytes:
            raise BudgetError(
                f"{what} needs about {_mib(size_bytes)} but the image store {self.root} "
                f"already uses {_mib(used)} of its {_mib(self.budget_bytes)} budget "
                "(checkpoint.disk_budget_bytes)"
            )

    # --- lifecycle -----------------------------------------------------------------

    def finish(self, image: Image, info: Mapping[str, Any]) -> dict[str, Any]:
        """Seal a dumped image: owner-only files, checksums, metadata (written last).

        Raises BudgetError (after deleting the image) when the real size is over budget.
        """
        lock_down(image.path)
        files: dict[str, dict[str, Any]] = {
            p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(image.path.iterdir())
            if p.is_file() and p.name != METADATA
        }
        size = sum(int(f["bytes"]) for f in files.values())
        if self.budget_bytes is not None:
            used = self.used_bytes(exclude=image.path)
            if used + size > self.budget_bytes:
                self.delete(image)
                raise BudgetError(
                    f"image of {image.key} is {_mib(size)}; with the {_mib(used)} already "
                    f"stored that exceeds the {_mib(self.budget_bytes)} budget of "
                    f"{self.root} (checkpoint.disk_budget_bytes); the image was deleted"
                )
        meta = {
            **info,
            "key": image.key,
            "version": image.version,
            "created": time.time(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "size_bytes": size,
            "files": files,
            **host_versions(),
        }
        self._write_metadata(image, meta)
        return meta

    def verify(self, image: Image) -> dict[str, Any]:
        """Check every file against the metadata; return the metadata.

        Raises ImageCorruptError naming the first file that is missing, of the wrong
        size or with the wrong sha256.
        """
        meta = image.metadata()
        files: Mapping[str, Mapping[str, Any]] = meta.get("files", {})
        if not files:
            raise ImageCorruptError(f"image {image.path}: metadata lists no files")
        for name, want in files.items():
            path = image.path / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise ImageCorruptError(f"image {image.path}: {name} is missing") from None
            if size != want["bytes"]:
                raise ImageCorruptError(
                    f"image {image.path}: {name} has {size} bytes, {want['bytes']} were written"
                )
            if _sha256(path) != want["sha256"]:
                raise ImageCorruptError(f"image {image.path}: {name} does not match its sha256")
        return meta

    def record_restore(self, image: Image, pid: int) -> None:
        """Note a restore (its pid: the pid the next dump of this engine will name)."""
        meta = image.metadata()
        meta["restored"] = [*meta.get("restored", []), {"pid": pid, "time": time.time()}]
        self._write_metadata(image, meta)

    def delete(self, image: Image) -> None:
        """Remove the image directory (and the replica's directory once empty)."""
        shutil.rmtree(image.path, ignore_errors=True)
        for parent in image.path.parents:
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def all_images(self) -> Iterator[Image]:
        """Every complete image under the root."""
        for meta in sorted(self.root.rglob(METADATA)):
            path = meta.parent
            rel = path.parent.relative_to(self.root)
            yield Image("/".join(rel.parts), path.name, path)

    def _write_metadata(self, image: Image, meta: Mapping[str, Any]) -> None:
        tmp = image.path / f".{METADATA}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        tmp.replace(image.metadata_path)


def _mib(n: int) -> str:
    return f"{n} bytes" if n < (1 << 20) else f"{n / (1 << 20):.1f} MiB"


def files_in(image: Image) -> Sequence[Path]:
    """The image's files, metadata last (upload order: a partial upload is incomplete)."""
    files = sorted(p for p in image.path.iterdir() if p.is_file() and p.name != METADATA)
    return [*files, image.metadata_path]
