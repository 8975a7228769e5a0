"""Fixtures of the connection-migration tests: a topology per test, always removed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from albatross.testing.netns import Topology, topology


@pytest.fixture
def topo() -> Iterator[Topology]:
    with topology() as t:
        yield t
