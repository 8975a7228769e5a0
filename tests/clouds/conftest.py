"""Fixtures for the cloud watcher tests: a fake clock and running metadata fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from albatross.testing.metadata_fakes import FakeAzureImds, FakeClock, FakeGcpMetadata, FakeImds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def imds(clock: FakeClock) -> AsyncIterator[FakeImds]:
    server = FakeImds(clock)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def gce() -> AsyncIterator[FakeGcpMetadata]:
    server = FakeGcpMetadata()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def azure_imds() -> AsyncIterator[FakeAzureImds]:
    server = FakeAzureImds()
    await server.start()
    yield server
    await server.close()
