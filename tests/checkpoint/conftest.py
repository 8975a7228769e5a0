"""Fixtures for the CRIU tests: the private criu install and nft clean-up checks.

CRIU needs root; without it every test here that uses ``criu`` is skipped with the
reason. The install (about 25 s, once) is cached under ``~/.cache/albatross``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from albatross.checkpoint.criu import DUMP_INFO, Criu, DumpRecord
from albatross.checkpoint.install import install_criu


@pytest.fixture(scope="session")
def criu_bin() -> Path:
    if os.geteuid() != 0:
        pytest.skip("CRIU needs root")
    return install_criu(progress=lambda line: None)


@pytest.fixture
def criu(criu_bin: Path, tmp_path: Path) -> Iterator[Criu]:
    """A Criu; afterwards no nft lock table of a dump made under ``tmp_path`` may be
    left (only this test's dumps are checked: other runs may be dumping meanwhile)."""
    c = Criu(criu_bin)
    yield c
    ours = {
        r.nft_table
        for info in tmp_path.rglob(DUMP_INFO)
        if (r := DumpRecord.read(info.parent)).nft_table is not None
    }
    left = ours & _criu_tables(c)
    for name in left:
        c.remove_nft_table(name)
    assert not left, f"CRIU network lock tables left behind: {sorted(left)}"


def _criu_tables(c: Criu) -> set[str]:
    assert c.nft is not None
    out = subprocess.run([str(c.nft), "list", "tables"], capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.startswith("table inet CRIU-")}
