"""Fast tests of llama_build's cache logic; nothing here builds or downloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from albatross.config import LlamaServerConfig
from albatross.engines import llama_build
from albatross.engines.llama_build import (
    LLAMA_CPP_PYTHON_VERSION,
    EngineSetupError,
    build_key,
    cached_binary_path,
    llama_server_binary,
)


def _no_build(target: Path, progress: object) -> None:
    raise AssertionError(f"unexpected build of {target}")


@pytest.fixture(autouse=True)
def _forbid_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(llama_build, "_build", _no_build)
    monkeypatch.setenv("ALBATROSS_CACHE", str(tmp_path / "cache"))


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_cache_path_changes_with_patch_bytes(tmp_path: Path) -> None:
    patch = tmp_path / "a.patch"
    patch.write_bytes(b"--- a/x\n+++ b/x\n")
    cfg = LlamaServerConfig()
    before = cached_binary_path(cfg, [patch])
    assert before == (tmp_path / "cache" / "llama-server" / build_key([patch]) / "llama-server")
    assert build_key([patch]).startswith(f"{LLAMA_CPP_PYTHON_VERSION}-")
    assert len(build_key([patch]).rsplit("-", 1)[1]) == 8
    patch.write_bytes(b"--- a/x\n+++ b/y\n")
    assert cached_binary_path(cfg, [patch]) != before


def test_shipped_patches_are_part_of_the_key() -> None:
    assert llama_build.patch_files(), "the held-token-ids patch must ship with the package"
    assert build_key() != build_key([])


def test_cache_dir_setting_beats_environment(tmp_path: Path) -> None:
    cfg = LlamaServerConfig(cache_dir=tmp_path / "configured")
    assert cached_binary_path(cfg).is_relative_to(tmp_path / "configured")


def test_missing_configured_binary_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "llama-server"
    with pytest.raises(EngineSetupError, match="no such file") as info:
        llama_server_binary(LlamaServerConfig(binary=missing), progress=lambda _: None)
    assert str(missing) in str(info.value)


def test_non_executable_configured_binary_is_rejected(tmp_path: Path) -> None:
    plain = tmp_path / "llama-server"
    plain.write_text("not a program")
    plain.chmod(0o644)
    with pytest.raises(EngineSetupError, match="not an executable") as info:
        llama_server_binary(LlamaServerConfig(binary=plain), progress=lambda _: None)
    assert str(plain) in str(info.value)


def test_configured_binary_is_returned_as_is(tmp_path: Path) -> None:
    exe = _executable(tmp_path / "bin" / "llama-server")
    assert llama_server_binary(LlamaServerConfig(binary=exe)) == exe


def test_cached_binary_is_returned_without_building() -> None:
    cfg = LlamaServerConfig()
    exe = _executable(cached_binary_path(cfg))
    lines: list[str] = []
    assert llama_server_binary(cfg, progress=lines.append) == exe
    assert lines == []
