"""Two meshes on one SQLite file: what one remembers of a session never hides what the other did.

Each process starts its frequent session changes (activity, close) from the record
it last saw; these tests change the session in the other mesh first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from svantic_grpc.core.auth import Caller, Scope, TokenSettings
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.errors import FailedPrecondition
from svantic_grpc.core.mesh import Mesh, MeshOptions
from svantic_grpc.core.messages.model import MessageState, Part
from svantic_grpc.core.models import SessionStatus
from svantic_grpc.stores.sqlite import SqliteStore

CALLER = Caller("acme", "acme-full", "bench", (Scope.FULL,), "tok_1")


@pytest.fixture
async def meshes(tmp_path: Path, clock: ManualClock) -> AsyncIterator[tuple[Mesh, Mesh]]:
    stores = [await SqliteStore.open(tmp_path / "mesh.db") for _ in range(2)]
    try:
        yield tuple(  # type: ignore[misc]
            Mesh(
                store=store,
                tokens=TokenSettings(signing_key="k" * 32),
                credentials=(),
                options=MeshOptions(session_ttl_s=60),
                clock=clock,
            )
            for store in stores
        )
    finally:
        for store in stores:
            await store.close()


async def test_a_session_closed_by_the_other_mesh_takes_no_more_messages(meshes: tuple[Mesh, Mesh]) -> None:
    first, second = meshes
    session = await first.sessions.init(CALLER)
    await first.sessions.open_record("acme", session.session_id)  # `first` now remembers it open
    await second.sessions.close(CALLER, session.session_id, reason="done elsewhere")

    with pytest.raises(FailedPrecondition, match="done elsewhere"):
        await first.messages.send(CALLER, session.session_id, parts=(Part(text="hello"),))
    closed, closed_now = await first.sessions.close(CALLER, session.session_id)
    assert not closed_now and closed.close_reason == "done elsewhere"


async def test_activity_and_close_after_the_other_mesh_wrote_keep_both_changes(
    meshes: tuple[Mesh, Mesh], clock: ManualClock
) -> None:
    first, second = meshes
    session = await first.sessions.init(CALLER)
    clock.advance(5)
    message = await second.messages.send_and_wait(CALLER, session.session_id, parts=(Part(text="hi"),))
    assert message.state is MessageState.COMPLETED  # answered by chat; the session's activity written
    written = await second.sessions.get(CALLER, session.session_id)
    clock.advance(5)
    # `first` still holds the session as it created it: its message's write reads it again
    again = await first.messages.send_and_wait(CALLER, session.session_id, parts=(Part(text="again"),))
    assert again.state is MessageState.COMPLETED
    active = await second.sessions.get(CALLER, session.session_id)
    assert active.version > written.version and active.last_activity_at == clock.now()
    closed, closed_now = await first.sessions.close(CALLER, session.session_id, reason="bye")
    assert closed_now and closed.status is SessionStatus.CLOSED and closed.close_reason == "bye"
    stored = await second.sessions.get(CALLER, session.session_id)
    assert stored == closed


async def test_an_invite_after_the_other_mesh_closed_the_session_is_refused(
    meshes: tuple[Mesh, Mesh],
) -> None:
    first, second = meshes
    session = await first.sessions.init(CALLER, self_agent_type="worker", self_instance_id="w1")
    await second.sessions.close(CALLER, session.session_id, reason="done elsewhere")
    with pytest.raises(FailedPrecondition, match="done elsewhere"):
        await first.sessions.invite(CALLER, session.session_id, agent_type="worker", instance_id="w1")


async def test_a_close_cancelled_while_its_write_waits_still_leaves_the_session_closed(
    meshes: tuple[Mesh, Mesh],
) -> None:
    first, _ = meshes
    session = await first.sessions.init(CALLER, self_agent_type="worker", self_instance_id="w1")
    closing = asyncio.create_task(first.sessions.close(CALLER, session.session_id, reason="bye"))
    for _ in range(20):  # until its write is queued in the store (which commits it regardless)
        await asyncio.sleep(0)
        if first.store._waiting:  # type: ignore[attr-defined]
            break
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    with pytest.raises(FailedPrecondition, match="bye"):
        await first.sessions.invite(CALLER, session.session_id, agent_type="worker", instance_id="w1")
    with pytest.raises(FailedPrecondition):
        await first.messages.send(CALLER, session.session_id, parts=(Part(text="late"),))
