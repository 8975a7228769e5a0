"""Copies of images in S3-compatible storage, so another host can restore them.

Objects live under ``<prefix>/<key>/<version>/<file>``. Upload order makes a partial
copy harmless: ``metadata.json`` goes last and a download requires it, so an
interrupted upload is never mistaken for an image. A download lands in a temporary
directory next to its target and is renamed into place only when complete, then made
owner-only; the store's :meth:`~albatross.checkpoint.store.ImageStore.verify` checks
its checksums before any restore.

boto3 is blocking: call these from a worker thread (``asyncio.to_thread``) in async code.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from albatross.checkpoint.store import METADATA, Image, ImageStore, files_in, lock_down


class S3Error(Exception):
    """Raised when an upload or download fails; names the bucket, key and cause."""


class S3Images:
    """An image mirror in ``bucket`` under ``prefix``, through a boto3 S3 client."""

    def __init__(self, client: Any, bucket: str, prefix: str = "albatross/images") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    @classmethod
    def connect(cls, bucket: str, prefix: str, endpoint_url: str | None = None) -> S3Images:
        """A mirror with boto3's default credentials chain (env, profile, instance role)."""
        import boto3

        return cls(boto3.client("s3", endpoint_url=endpoint_url), bucket, prefix)

    def _object(self, key: str, version: str, name: str) -> str:
        return f"{self.prefix}/{key.strip('/')}/{version}/{name}"

    def upload(self, image: Image) -> int:
        """Upload every file of ``image``, metadata last; return the bytes sent."""
        sent = 0
        for path in files_in(image):
            obj = self._object(image.key, image.version, path.name)
            try:
                self.client.upload_file(str(path), self.bucket, obj)
            except Exception as exc:  # boto3 raises several unrelated error types
                raise S3Error(f"upload of s3://{self.bucket}/{obj} failed: {exc}") from exc
            sent += path.stat().st_size
        return sent

    def versions(self, key: str) -> list[str]:
        """Versions of ``key`` with complete uploads (metadata present), oldest first."""
        base = f"{self.prefix}/{key.strip('/')}/"
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    rest = obj["Key"][len(base) :]
                    version, _, name = rest.partition("/")
                    if name == METADATA:
                        found.append(version)
        except Exception as exc:
            raise S3Error(f"listing s3://{self.bucket}/{base} failed: {exc}") from exc
        return sorted(found)

    def download(self, store: ImageStore, key: str, version: str | None = None) -> Image | None:
        """Fetch ``version`` (default: the newest) of ``key`` into ``store``.

        Returns the local image, or None when the bucket has none for ``key``.
        """
        versions = self.versions(key)
        if version is None:
            if not versions:
                return None
            version = versions[-1]
        elif version not in versions:
            return None
        target = store.key_dir(key) / version
        if (target / METADATA).is_file():
            return Image(key, version, target)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        base = f"{self.prefix}/{key.strip('/')}/{version}/"
        with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp_name:
            tmp = Path(tmp_name)
            try:
                pages = self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=base
                )
                names = [o["Key"][len(base) :] for p in pages for o in p.get("Contents", [])]
                for name in names:
                    if "/" in name or name in ("", ".", ".."):
                        continue  # not one of ours: images are flat
                    self.client.download_file(self.bucket, base + name, str(tmp / name))
            except Exception as exc:
                raise S3Error(f"download of s3://{self.bucket}/{base} failed: {exc}") from exc
            lock_down(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.replace(target)
            tmp.mkdir()  # TemporaryDirectory cleans up the name it made
        return Image(key, version, target)
