"""The adapters are told every outcome at least once, across restarts: an ended request is
written untold and marked told once every adapter returned, and at start-up the mesh tells the
adapters again what is still untold (found from outside: an outcome in flight at a kill, and a
request start-up recovery withdrew before the adapters listened, were never told)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from svantic_grpc.core.auth import Caller, Scope, TokenSettings
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.inputs.model import InputKind, InputRequest, InputState, ToolCall
from svantic_grpc.core.mesh import Mesh, MeshOptions
from svantic_grpc.core.store import Change, Changed
from svantic_grpc.stores.sqlite import SqliteStore

CALLER = Caller("acme", "acme-full", "terminal", (Scope.FULL,), "tok_1")


class Adapter:
    """An input listener that records outcomes; it fails while ``failing``."""

    def __init__(self, *, failing: bool = False) -> None:
        self.outcomes: list[InputRequest] = []
        self.failing = failing

    async def on_request(self, request: InputRequest) -> None:
        pass

    async def on_outcome(self, request: InputRequest) -> None:
        self.outcomes.append(request)
        if self.failing:
            raise ConnectionError("the adapter's service is down")


async def ask_to_delete(mesh: Mesh, session_id: str, message_id: str = "m1") -> InputRequest:
    """A pending tool approval in ``session_id`` for ``message_id`` (which need not exist)."""
    return await mesh.inputs.ask(
        tenant_id="acme",
        session_id=session_id,
        message_id=message_id,
        kind=InputKind.TOOL_APPROVAL,
        tool_call=ToolCall("crm.delete_records", {"ids": [7]}),
    )


async def started(path: Path, clock: ManualClock, adapter: Adapter, *, look_every_s: float = 600.0) -> Mesh:
    """A mesh on ``path`` started as the server starts it with an adapter (``look_every_s``: how
    often it looks for outcomes still untold)."""
    mesh = Mesh(
        store=SqliteStore(path),
        tokens=TokenSettings(signing_key="k" * 32),
        credentials=(),
        options=MeshOptions(session_ttl_s=0),
        clock=clock,
    )
    mesh.inputs.tells_outcomes = True  # as the adapter host sets it, before recovery
    mesh.inputs.tell_again_every_s = look_every_s
    await mesh.start()
    mesh.inputs.add_listener(adapter)
    await mesh.inputs.start_telling()
    return mesh


async def settled(mesh: Mesh) -> list[str]:
    """The ids of what is still untold once the mesh's telling is done."""
    for _ in range(100):
        await asyncio.sleep(0.01)
        untold = [r.request_id for r in await mesh.store.untold_outcomes()]
        if not untold:
            break
    return untold


async def told_at_the_next_start(path: Path, clock: ManualClock) -> list[InputRequest]:
    """What an adapter is told when a mesh starts again on ``path``, once the telling is done."""
    adapter = Adapter()
    mesh = await started(path, clock, adapter)
    try:
        assert await settled(mesh) == []
        return adapter.outcomes
    finally:
        await mesh.stop()


async def test_a_request_withdrawn_at_start_up_is_told_to_the_adapters(
    tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "mesh.db"
    before = await started(path, clock, Adapter())
    try:
        session_id = (await before.sessions.init(CALLER)).session_id
        # No such message: start-up recovery withdraws what it asked.
        request = await ask_to_delete(before, session_id, "gone")
    finally:
        await before.stop()

    told = await told_at_the_next_start(path, clock)
    assert [(r.request_id, r.state) for r in told] == [(request.request_id, InputState.CANCELED)]
    assert told[0].outcome_reason.startswith("withdrawn at start-up")

    again = Adapter()
    third = await started(path, clock, again)
    try:
        await asyncio.sleep(0.05)
        assert again.outcomes == []  # told and marked: not told again
    finally:
        await third.stop()


async def test_an_outcome_an_adapter_could_not_tell_is_told_again_at_the_next_start(
    tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "mesh.db"
    down = Adapter(failing=True)
    before = await started(path, clock, down)
    try:
        session_id = (await before.sessions.init(CALLER)).session_id
        request = await ask_to_delete(before, session_id, "m1")
        await before.inputs.cancel_for_message("acme", session_id, "m1", "not needed")
        await asyncio.sleep(0.05)
        assert [r.request_id for r in down.outcomes] == [request.request_id]
        assert [r.request_id for r in await before.store.untold_outcomes()] == [request.request_id]
    finally:
        await before.stop()

    up = Adapter()
    after = await started(path, clock, up)
    try:
        assert await settled(after) == []
        assert [(r.request_id, r.state, r.outcome_reason) for r in up.outcomes] == [
            (request.request_id, InputState.CANCELED, "not needed")
        ]
    finally:
        await after.stop()


class CountingStore(SqliteStore):
    """Counts the writes that carry input requests."""

    input_writes = 0

    async def write(self, change: Change) -> Changed:
        if change.inputs:
            self.input_writes += 1
        return await super().write(change)


async def test_without_adapters_an_outcome_is_written_told_in_one_write(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Found by review: the end wrote the pending record's flag, so every answer without adapters
    took a second write to mark it told (or stayed untold for good)."""
    store = CountingStore(tmp_path / "mesh.db")
    mesh = Mesh(store=store, tokens=TokenSettings(signing_key="k" * 32), credentials=(), clock=clock)
    await mesh.start()
    await mesh.inputs.start_telling()  # as the adapter host does, with no adapter
    try:
        session_id = (await mesh.sessions.init(CALLER)).session_id
        request = await ask_to_delete(mesh, session_id, "m1")
        before = store.input_writes
        await mesh.inputs.cancel_for_message("acme", session_id, "m1", "not needed")
        await asyncio.sleep(0.05)
        assert store.input_writes - before == 1
        assert await store.untold_outcomes() == []
        ended = await store.get_input(tenant_id="acme", request_id=request.request_id)
        assert ended is not None and ended.outcome_told
    finally:
        await mesh.stop()


async def test_a_request_pending_since_before_the_upgrade_is_told_when_it_ends(
    tmp_path: Path, clock: ManualClock
) -> None:
    """A record written before outcomes were marked reads as told; ending it must still leave its
    outcome untold for the adapters (found by review: the withdrawal at the first start on the new
    version was never told)."""
    path = tmp_path / "mesh.db"
    before = await started(path, clock, Adapter())
    try:
        session_id = (await before.sessions.init(CALLER)).session_id
        request = await ask_to_delete(before, session_id, "gone")
        pending = await before.store.get_input(tenant_id="acme", request_id=request.request_id)
        assert pending is not None
        # As the old version stored it: no outcome_told in the record (decoded as told).
        await before.store.write(Change("acme", session_id, inputs=(replace(pending, outcome_told=True),)))
    finally:
        await before.stop()

    told = await told_at_the_next_start(path, clock)
    assert [(r.request_id, r.state) for r in told] == [(request.request_id, InputState.CANCELED)]


async def test_an_outcome_an_adapter_could_not_tell_is_told_again_without_a_restart(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Slack or a webhook target down for a while: once it is back, the outcome it missed is told
    (found by review for replicas: one whose teller died with its session's lease waited for a
    process to start)."""
    adapter = Adapter(failing=True)
    mesh = await started(tmp_path / "mesh.db", clock, adapter, look_every_s=0.05)
    try:
        session_id = (await mesh.sessions.init(CALLER)).session_id
        request = await ask_to_delete(mesh, session_id)
        await mesh.inputs.cancel_for_message("acme", session_id, "m1", "not needed")
        await asyncio.sleep(0.02)
        assert [r.request_id for r in adapter.outcomes] == [request.request_id]  # tried, failed
        adapter.failing = False  # the service is back
        assert await settled(mesh) == []
        assert [r.request_id for r in adapter.outcomes] == [request.request_id] * 2
        await asyncio.sleep(0.2)  # told and marked: not told a third time
        assert len(adapter.outcomes) == 2
    finally:
        await mesh.stop()
