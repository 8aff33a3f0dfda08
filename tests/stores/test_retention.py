"""The store contract for retention: trimmed event logs and purged closed sessions.

Runs on every implementation through the contract suite's ``store`` fixture.
"""

from __future__ import annotations

from dataclasses import replace

from svantic_grpc.core.events import StatusChanged
from svantic_grpc.core.inputs.model import (
    Decision,
    InputKind,
    InputRequest,
    InputState,
    Resolution,
    Surface,
    ToolCall,
)
from svantic_grpc.core.models import SessionStatus
from svantic_grpc.core.store import Store
from tests.stores.test_contract import T0, make_message, make_session, store

__all__ = ["store"]  # the fixture, shared with the contract suite


async def _append(store: Store, session_id: str, count: int) -> None:
    for _ in range(count):
        await store.append_event(
            tenant_id="acme",
            session_id=session_id,
            time=T0,
            payload=StatusChanged(SessionStatus.ACTIVE, SessionStatus.PAUSED),
        )


async def _sequences(store: Store, session_id: str, after: int = 0) -> list[int]:
    events = await store.list_events(tenant_id="acme", session_id=session_id, after_sequence=after)
    return [e.sequence for e in events]


async def test_trimmed_events_are_gone_and_numbering_continues(store: Store) -> None:
    await _append(store, "s1", 10)
    await _append(store, "s2", 3)
    await store.trim_events(tenant_id="acme", session_id="s1", through_sequence=6)
    assert await _sequences(store, "s1") == [7, 8, 9, 10]
    assert await _sequences(store, "s1", after=2) == [7, 8, 9, 10]
    assert await _sequences(store, "s1", after=8) == [9, 10]
    await _append(store, "s1", 2)
    assert await _sequences(store, "s1") == [7, 8, 9, 10, 11, 12]
    assert await _sequences(store, "s2") == [1, 2, 3]  # another session keeps its log


async def test_trimming_again_or_beyond_the_log_keeps_numbering(store: Store) -> None:
    await _append(store, "s1", 5)
    await store.trim_events(tenant_id="acme", session_id="s1", through_sequence=2)
    await store.trim_events(tenant_id="acme", session_id="s1", through_sequence=1)  # already gone
    assert await _sequences(store, "s1") == [3, 4, 5]
    await store.trim_events(tenant_id="acme", session_id="s1", through_sequence=99)
    await _append(store, "s1", 1)
    assert (await _sequences(store, "s1"))[-1] == 6
    await store.trim_events(tenant_id="acme", session_id="nope", through_sequence=5)  # no log: no-op


async def test_purge_takes_closed_sessions_with_their_messages_requests_and_events(store: Store) -> None:
    for session_id, closed_at in (("old", T0 + 10), ("recent", T0 + 100)):
        created = await store.create_session(make_session(session_id))
        await store.update_session(replace(created, status=SessionStatus.CLOSED, closed_at=closed_at))
        await store.create_message(make_message("m1", session_id=session_id))
        await store.create_input(
            InputRequest(
                "acme",
                f"r-{session_id}",
                session_id,
                "m1",
                InputKind.TOOL_APPROVAL,
                T0,
                T0 + 9,
                ToolCall("t"),
            )
        )
        await _append(store, session_id, 2)
        # What adapters keep about the session (an A2A task index, a Slack post) goes with it.
        await store.put_adapter_value("a2a", f"task/{session_id}", {"n": 1}, session=("acme", session_id))
    await store.create_session(make_session("open"))
    await store.create_message(make_message("m1", session_id="open"))
    await _append(store, "open", 2)
    await store.put_adapter_value("a2a", "task/open", {"n": 1}, session=("acme", "open"))
    await store.put_adapter_value("slack", "unscoped", {"n": 1})  # belongs to no session: kept
    await store.put_adapter_value("a2a", "task/other-tenant", {"n": 1}, session=("globex", "old"))
    # Put again for another session, or for none: it follows its latest put, not its first.
    await store.put_adapter_value("slack", "moved", {"n": 1}, session=("acme", "old"))
    await store.put_adapter_value("slack", "moved", {"n": 2}, session=("acme", "open"))
    await store.put_adapter_value("slack", "unlinked", {"n": 1}, session=("acme", "old"))
    await store.put_adapter_value("slack", "unlinked", {"n": 2})

    assert await store.purge_closed_sessions(closed_before=T0 + 50, limit=100) == 1

    assert await store.get_adapter_value("a2a", "task/old") is None
    for value_key in ("task/recent", "task/open", "task/other-tenant"):
        assert await store.get_adapter_value("a2a", value_key) == {"n": 1}
    assert await store.get_adapter_value("slack", "unscoped") == {"n": 1}
    assert await store.get_adapter_value("slack", "moved") == {"n": 2}
    assert await store.get_adapter_value("slack", "unlinked") == {"n": 2}

    assert await store.get_session(tenant_id="acme", session_id="old") is None
    assert await store.get_message(tenant_id="acme", session_id="old", message_id="m1") is None
    assert await store.get_input(tenant_id="acme", request_id="r-old") is None
    assert await _sequences(store, "old") == []
    for kept in ("recent", "open"):
        assert await store.get_session(tenant_id="acme", session_id=kept) is not None
        assert await store.get_message(tenant_id="acme", session_id=kept, message_id="m1") is not None
        assert await _sequences(store, kept) == [1, 2]
    assert await store.get_input(tenant_id="acme", request_id="r-recent") is not None
    assert await store.purge_closed_sessions(closed_before=T0 + 50, limit=100) == 0


async def test_purge_keeps_an_always_approval_the_tenants_grant(store: Store) -> None:
    created = await store.create_session(make_session("old"))
    await store.update_session(replace(created, status=SessionStatus.CLOSED, closed_at=T0 + 10))
    for request_id, decision in (
        ("always", Decision.APPROVE_ALWAYS),
        ("session", Decision.APPROVE_FOR_SESSION),
    ):
        asked = await store.create_input(
            InputRequest("acme", request_id, "old", "m1", InputKind.TOOL_APPROVAL, T0, T0 + 9, ToolCall("t"))
        )
        answered = Resolution(decision=decision, resolved_by="ops", surface=Surface.GRPC, resolved_at=T0 + 1)
        await store.update_input(replace(asked, state=InputState.RESOLVED, resolution=answered))
    await store.create_input(
        InputRequest("acme", "pending", "old", "m1", InputKind.TOOL_APPROVAL, T0, T0 + 9, ToolCall("t"))
    )
    assert await store.purge_closed_sessions(closed_before=T0 + 50, limit=100) == 1
    assert await store.get_session(tenant_id="acme", session_id="old") is None
    assert await store.get_input(tenant_id="acme", request_id="session") is None
    assert await store.get_input(tenant_id="acme", request_id="pending") is None
    kept = await store.get_input(tenant_id="acme", request_id="always")
    assert kept is not None and kept.grants_always
    assert [r.request_id for r in await store.granting_inputs()] == ["always"]


async def test_purge_goes_in_batches_of_limit(store: Store) -> None:
    for n in range(5):
        created = await store.create_session(make_session(f"s{n}"))
        await store.update_session(replace(created, status=SessionStatus.CLOSED, closed_at=T0))
    assert await store.purge_closed_sessions(closed_before=T0 + 1, limit=2) == 2
    assert await store.purge_closed_sessions(closed_before=T0 + 1, limit=2) == 2
    assert await store.purge_closed_sessions(closed_before=T0 + 1, limit=2) == 1
    page = await store.list_sessions(tenant_id="acme")
    assert page.sessions == ()


async def test_an_always_approval_is_found_by_tenant_and_policy(store: Store) -> None:
    await store.create_session(make_session("s1"))
    for request_id, tenant, policy, decision in (
        ("r1", "acme", "deletes", Decision.APPROVE_ALWAYS),
        ("r2", "acme", "exports", Decision.APPROVE),
        ("r3", "globex", "imports", Decision.APPROVE_ALWAYS),
    ):
        asked = await store.create_input(
            InputRequest(
                tenant,
                request_id,
                "s1",
                "m1",
                InputKind.TOOL_APPROVAL,
                T0,
                T0 + 9,
                ToolCall("t"),
                policy=policy,
            )
        )
        answered = Resolution(decision=decision, resolved_by="ops", surface=Surface.GRPC, resolved_at=T0 + 1)
        await store.update_input(replace(asked, state=InputState.RESOLVED, resolution=answered))
    assert await store.approved_always(tenant_id="acme", policy="deletes")
    assert not await store.approved_always(tenant_id="acme", policy="exports")  # approved once only
    assert not await store.approved_always(tenant_id="acme", policy="imports")  # another tenant's
    assert await store.approved_always(tenant_id="globex", policy="imports")
