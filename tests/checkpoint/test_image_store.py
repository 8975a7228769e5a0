"""The image store on a real file system, and its S3 copy against moto's S3."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from albatross.checkpoint.s3 import S3Images
from albatross.checkpoint.store import (
    METADATA,
    BudgetError,
    Image,
    ImageCorruptError,
    ImageStore,
)

BUCKET = "albatross-images"


def _fake_dump(image: Image, size: int = 4096) -> None:
    """Files shaped like criu's (content does not matter to the store)."""
    (image.path / "inventory.img").write_bytes(b"inv")
    (image.path / "pages-1.img").write_bytes(bytes(range(256)) * (size // 256))


def _sealed(store: ImageStore, key: str = "model-a/0", size: int = 4096) -> Image:
    image = store.new_image(key)
    _fake_dump(image, size)
    store.finish(image, {"engine": "llama-server", "argv": ["llama-server", "-m", "m.gguf"]})
    return image


def test_images_are_owner_only_with_metadata_written_last(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    image = store.new_image("model a/0")  # odd characters become "_"
    assert image.path.parent == tmp_path / "images" / "model_a" / "0"
    _fake_dump(image)
    assert store.latest("model a/0") is None  # no metadata yet: not an image
    meta = store.finish(image, {"engine": "llama-server"})
    assert store.latest("model a/0") == image
    assert meta["size_bytes"] == 4096 + 3 and meta["kernel"] and "created_utc" in meta
    assert set(meta["files"]) == {"inventory.img", "pages-1.img"}
    for path in [tmp_path / "images", image.path.parent.parent, image.path.parent, image.path]:
        assert path.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in image.path.iterdir()} == {0o600}


def test_verify_names_the_damaged_or_missing_file(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    image = _sealed(store)
    assert store.verify(image)["engine"] == "llama-server"
    pages = image.path / "pages-1.img"
    data = bytearray(pages.read_bytes())
    data[100] ^= 1
    pages.write_bytes(bytes(data))
    with pytest.raises(ImageCorruptError, match=r"pages-1.img does not match its sha256"):
        store.verify(image)
    pages.write_bytes(b"short")
    with pytest.raises(ImageCorruptError, match=r"pages-1.img has 5 bytes, 4096 were written"):
        store.verify(image)
    pages.unlink()
    with pytest.raises(ImageCorruptError, match=r"pages-1.img is missing"):
        store.verify(image)
    (image.path / METADATA).write_text("{not json")
    with pytest.raises(ImageCorruptError, match=r"metadata.json unreadable"):
        store.verify(image)


def test_budget_refuses_before_and_after_a_dump(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, budget_bytes=10_000)
    _sealed(store, "a/0", 4096)
    store.admit(
        4096, what="a checkpoint of b/0"
    )  # fits: about 4600 used (files + metadata) + 4096 <= 10000
    with pytest.raises(
        BudgetError,
        match=r"needs about 8192 bytes .* uses 4[0-9]{3} bytes of its 10000 bytes budget",
    ):
        store.admit(8192, what="a checkpoint of b/0")
    image = store.new_image("b/0")
    _fake_dump(image, 8192)  # the estimate was low: the real size decides
    with pytest.raises(BudgetError, match=r"exceeds .* the image was deleted"):
        store.finish(image, {})
    assert not image.path.exists() and store.latest("b/0") is None
    assert store.latest("a/0") is not None  # nothing else lost


def test_versions_newest_last_and_delete_tidies_up(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    first, second = _sealed(store), _sealed(store)
    assert store.images("model-a/0") == [first, second] and store.latest("model-a/0") == second
    store.record_restore(second, 1234)
    assert store.verify(second)["restored"][0]["pid"] == 1234
    store.delete(second)
    store.delete(first)
    assert store.latest("model-a/0") is None
    assert not (tmp_path / "images" / "model-a").exists()
    assert (tmp_path / "images").is_dir()


@mock_aws
def test_s3_round_trip_gives_an_owner_only_verified_image(tmp_path: Path) -> None:
    client = boto3.client("s3", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    here = ImageStore(tmp_path / "here")
    image = _sealed(here)
    s3 = S3Images(client, BUCKET, "imgs")
    assert s3.upload(image) > 4096
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert f"imgs/model-a/0/{image.version}/{METADATA}" in keys

    there = ImageStore(tmp_path / "there")
    fetched = s3.download(there, "model-a/0")
    assert fetched is not None and fetched.version == image.version
    assert there.verify(fetched)["files"] == here.verify(image)["files"]
    assert {p.stat().st_mode & 0o777 for p in fetched.path.iterdir()} == {0o600}
    assert fetched.path.stat().st_mode & 0o777 == 0o700
    assert s3.download(there, "model-b/0") is None


@mock_aws
def test_s3_ignores_an_upload_without_metadata(tmp_path: Path) -> None:
    client = boto3.client("s3", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="albatross/images/m/0/20250101T000000-000/pages-1.img",
                      Body=b"partial")  # fmt: skip
    s3 = S3Images(client, BUCKET)
    assert s3.versions("m/0") == []
    assert s3.download(ImageStore(tmp_path), "m/0") is None


def test_link_remap_paths_are_read_whole_from_the_file_table(tmp_path: Path) -> None:
    from albatross.checkpoint.criu import _link_remaps

    # "pytest-284/": the "4" (52) is also the length of the path's tail from the next
    # "/": a byte inside a path that looks like a length prefix must not win.
    real = b"/tmp/pytest-of-root/pytest-284/test_discard_removes_link_rema0/files/link_remap.11"
    tail = real[real.index(b"/test_discard") :]
    assert len(tail) == real[real.index(b"/test_discard") - 1]  # the coincidence itself
    (tmp_path / "files.img").write_bytes(b"\x0a\x12\x22" + bytes([len(real)]) + real + b"\x10\x01")
    assert _link_remaps(tmp_path) == [real.decode()]
