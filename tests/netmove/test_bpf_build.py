"""The BPF build: one object per program, cached by source hash, idempotent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from albatross.netmove import build

pytestmark = pytest.mark.skipif(
    shutil.which("clang") is None, reason="clang missing: run scripts/setup.sh"
)


def test_build_is_cached_and_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALBATROSS_CACHE", str(tmp_path))
    first = build.build_all()
    assert [p.name for p in first] == ["hold_egress.o", "guard_xdp.o"]
    assert all(p.read_bytes()[:4] == b"\x7fELF" for p in first)
    stamps = [p.stat().st_mtime_ns for p in first]
    again = build.build_all()
    assert again == first and [p.stat().st_mtime_ns for p in again] == stamps
    assert first[0].parent.name == build.build_key()


def test_key_changes_with_the_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "bpf"
    shutil.copytree(build.BPF_SOURCE_DIR, src)
    monkeypatch.setattr(build, "BPF_SOURCE_DIR", src)
    before = build.build_key()
    (src / "flow_key.h").write_text((src / "flow_key.h").read_text() + "\n/* changed */\n")
    assert build.build_key() != before


def test_unknown_program_is_named() -> None:
    with pytest.raises(build.BuildError, match="program: 'nope' is not one of"):
        build.bpf_object("nope")
