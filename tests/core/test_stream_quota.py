"""Agents' Connect streams in the tenant's stream allowance: an instance's place is held once,
whatever its streams do (code review K4: an attach whose write failed after a newer stream of the
same instance took its place gave the place back a second time, and the count drifted low)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from svantic_grpc.core.auth import Caller, Scope
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.dispatch._connected import ConnectedAgents
from svantic_grpc.core.errors import ResourceExhausted
from svantic_grpc.core.models import AgentRegistration, DeploymentMode
from svantic_grpc.core.stream_quota import StreamQuota

CALLER = Caller("acme", "acme-full", "terminal", (Scope.FULL,), "tok_1")


class _Registry:
    """Its next ``set_connection`` waits on ``gate`` (then fails if the gate does)."""

    def __init__(self) -> None:
        self.gate: asyncio.Future[None] | None = None

    async def get(self, caller: Caller, instance_id: str) -> AgentRegistration:
        return AgentRegistration("acme", "t", instance_id, DeploymentMode.CONNECTED, 0.0, 0.0)

    async def set_connection(self, *args: Any, **fields: Any) -> AgentRegistration | None:
        gate, self.gate = self.gate, None
        if gate is not None:
            await gate
        return None


async def test_a_failed_attach_replaced_meanwhile_gives_back_no_place_it_no_longer_holds() -> None:
    registry = _Registry()
    quota = StreamQuota(limit=2)
    agents = ConnectedAgents(registry=registry, clock=ManualClock(), quota=quota)  # type: ignore[arg-type]
    gate = registry.gate = asyncio.get_running_loop().create_future()
    first = asyncio.create_task(agents.attach(CALLER, "i1"))
    for _ in range(10):  # until its write waits on the gate
        await asyncio.sleep(0)
    assert registry.gate is None
    second = await agents.attach(CALLER, "i1")  # the same instance again: takes the first's place
    gate.set_exception(ConnectionError("the store went away"))
    with pytest.raises(ConnectionError):
        await first
    assert quota.open("acme") == 1  # the second stream's place, once
    other = await agents.attach(CALLER, "i2")
    with pytest.raises(ResourceExhausted):
        await agents.attach(CALLER, "i3")  # the limit holds
    for connection in (second, other):
        await agents.detach(connection, "done")
    assert quota.open("acme") == 0
