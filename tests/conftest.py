"""Fixtures: a real server per test (see ``tests/_support.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from svantic_grpc.core.clock import ManualClock
from tests._support import Client, running_server


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    """A real server on 127.0.0.1:0 with tenants acme and globex, and stubs for it."""
    async with running_server() as c:
        yield c


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()
