"""The store contract for ``Store.write``: changes that belong together land together or not at all.

Runs on every store of ``FACTORIES`` (through the ``store`` fixture of the contract suite).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from svantic_grpc.core.errors import AlreadyExists, Conflict, NotFound
from svantic_grpc.core.events import AgentJoined, InputEnded, StatusChanged
from svantic_grpc.core.inputs.model import Decision, InputKind, InputRequest, InputState, Resolution, ToolCall
from svantic_grpc.core.models import JoinReason, SessionAgent, SessionStatus
from svantic_grpc.core.store import AuditRecord, Change, Store
from tests.stores.test_contract import T0, make_agent, make_message, make_session, store

__all__ = ["store"]


def _request(request_id: str = "r1") -> InputRequest:
    return InputRequest(
        "acme", request_id, "s1", "m1", InputKind.TOOL_APPROVAL, T0, T0 + 600, ToolCall("crm.x")
    )


def _audit(request_id: str, outcome: str) -> AuditRecord:
    return AuditRecord("acme", request_id, "s1", "m1", "tool_approval", outcome, "ops", "grpc", T0 + 1)


async def test_records_audit_and_events_land_in_one_write(store: Store) -> None:
    session = await store.create_session(make_session("s1", status=SessionStatus.PAUSED))
    request = await store.create_input(_request())
    answered = replace(
        request,
        state=InputState.RESOLVED,
        resolution=Resolution(decision=Decision.APPROVE, resolved_by="ops", resolved_at=T0 + 1),
    )
    active = replace(session, status=SessionStatus.ACTIVE)
    new_message = make_message("m2")
    changed = await store.write(
        Change(
            "acme",
            "s1",
            T0 + 1,
            sessions=(active,),
            messages=(new_message,),  # version 0: inserted
            inputs=(answered,),
            audit=(_audit("r1", "approve"), _audit("r1", "again")),
            events=(
                InputEnded(answered),
                StatusChanged(SessionStatus.PAUSED, SessionStatus.ACTIVE, "answered"),
            ),
        )
    )
    assert [s.version for s in changed.sessions] == [2]
    assert [m.version for m in changed.messages] == [1]
    assert [r.version for r in changed.inputs] == [2]
    assert [a.sequence for a in changed.audit] == [1, 2]
    assert [(e.sequence, e.time) for e in changed.events] == [(1, T0 + 1), (2, T0 + 1)]
    assert await store.get_session(tenant_id="acme", session_id="s1") == changed.sessions[0]
    assert await store.get_input(tenant_id="acme", request_id="r1") == changed.inputs[0]
    assert await store.get_message(tenant_id="acme", session_id="s1", message_id="m2") == changed.messages[0]
    assert [r.outcome for r in await store.list_audit(tenant_id="acme", request_id="r1")] == [
        "approve",
        "again",
    ]
    assert [e.payload for e in await store.list_events(tenant_id="acme", session_id="s1")] == [
        e.payload for e in changed.events
    ]


@pytest.mark.parametrize("failing", ["stale session", "missing input", "taken message", "stale agent"])
async def test_one_refused_part_leaves_nothing_of_the_write(store: Store, failing: str) -> None:
    session = await store.create_session(make_session("s1"))
    request = await store.create_input(_request())
    agent = await store.create_agent(make_agent("i1"))
    await store.create_message(make_message("taken"))
    joined = SessionAgent("researcher", "i1", JoinReason.INVITED, T0)
    parts = {
        "sessions": (replace(session, agents=(joined,)),),
        "inputs": (replace(request, state=InputState.CANCELED),),
        "agents": (replace(agent, session_ids=("s1",)),),
        "messages": (make_message("fresh"),),
    }
    error: type[Exception]
    if failing == "stale session":
        await store.update_session(session)  # someone else wrote first
        error = Conflict
    elif failing == "missing input":
        parts["inputs"] = (replace(_request("nope"), version=1),)
        error = NotFound
    elif failing == "taken message":
        parts["messages"] = (make_message("fresh"), make_message("taken"))
        error = AlreadyExists
    else:
        await store.update_agent(agent)
        error = Conflict
    before_session = await store.get_session(tenant_id="acme", session_id="s1")
    before_agent = await store.get_agent(tenant_id="acme", instance_id="i1")
    with pytest.raises(error):
        await store.write(
            Change(
                "acme",
                "s1",
                T0 + 1,
                sessions=parts["sessions"],  # type: ignore[arg-type]
                messages=parts["messages"],  # type: ignore[arg-type]
                inputs=parts["inputs"],  # type: ignore[arg-type]
                agents=parts["agents"],  # type: ignore[arg-type]
                audit=(_audit("r1", "canceled"),),
                events=(AgentJoined(joined),),
            )
        )
    assert await store.get_session(tenant_id="acme", session_id="s1") == before_session
    assert await store.get_input(tenant_id="acme", request_id="r1") == request
    assert await store.get_agent(tenant_id="acme", instance_id="i1") == before_agent
    assert await store.get_message(tenant_id="acme", session_id="s1", message_id="fresh") is None
    assert await store.list_audit(tenant_id="acme") == []
    assert await store.list_events(tenant_id="acme", session_id="s1") == []


@pytest.mark.parametrize("failing", ["", "stale session", "closed elsewhere", "taken message", "no session"])
async def test_a_message_with_its_sessions_activity_lands_whole_or_not_at_all(
    store: Store, failing: str
) -> None:
    """The write each sent message makes: the session (its activity moved on, at the version read),
    the new message and its event. PostgreSQL runs it as one statement; it holds as a transaction."""
    session = await store.create_session(make_session("s1"))
    await store.create_message(make_message("taken"))
    if failing in ("stale session", "closed elsewhere"):
        moved = replace(session, status=SessionStatus.CLOSED) if failing == "closed elsewhere" else session
        await store.update_session(replace(moved, updated_at=T0 + 1))
    if failing == "no session":
        session = replace(session, session_id="gone")
    active = replace(session, last_activity_at=T0 + 5, updated_at=T0 + 5)
    message = make_message("taken" if failing == "taken message" else "m2", session_id=session.session_id)
    change = Change(
        "acme",
        session.session_id,
        T0 + 5,
        sessions=(active,),
        messages=(message,),
        events=(StatusChanged(SessionStatus.ACTIVE, SessionStatus.ACTIVE, "sent"),),
    )
    if not failing:
        changed = await store.write(change)
        assert changed.sessions[0].version == 2 and changed.sessions[0].last_activity_at == T0 + 5
        assert changed.messages[0].version == 1
        assert [e.sequence for e in changed.events] == [1]
        assert await store.get_session(tenant_id="acme", session_id="s1") == changed.sessions[0]
        assert (
            await store.get_message(tenant_id="acme", session_id="s1", message_id="m2") == changed.messages[0]
        )
        return
    expected = {
        "stale session": Conflict,
        "closed elsewhere": Conflict,
        "taken message": AlreadyExists,
        "no session": NotFound,
    }[failing]
    with pytest.raises(expected):
        await store.write(change)
    stored = await store.get_session(tenant_id="acme", session_id="s1")
    assert stored is not None and stored.last_activity_at != T0 + 5
    assert await store.get_message(tenant_id="acme", session_id="s1", message_id="m2") is None
    assert await store.list_events(tenant_id="acme", session_id=session.session_id) == []


@pytest.mark.parametrize("failing", ["stale session", "stale agent", "missing agent"])
async def test_a_session_with_an_instance_bound_lands_whole_or_not_at_all(store: Store, failing: str) -> None:
    """The write of an agent joining a session: the session, the instance's binding and the event.
    The session's update must not land when the instance's is refused, and the other way round."""
    session = await store.create_session(make_session("s1"))
    agent = await store.create_agent(make_agent("i1"))
    joined = SessionAgent("researcher", "i1", JoinReason.INVITED, T0)
    bound = replace(agent, session_ids=("s1",))
    expected: type[Exception] = Conflict
    if failing == "stale session":
        await store.update_session(session)
    elif failing == "stale agent":
        await store.update_agent(agent)
    else:
        bound = replace(make_agent("gone"), version=1)
        expected = NotFound
    before_session = await store.get_session(tenant_id="acme", session_id="s1")
    before_agent = await store.get_agent(tenant_id="acme", instance_id="i1")
    with pytest.raises(expected):
        await store.write(
            Change(
                "acme",
                "s1",
                T0 + 1,
                sessions=(replace(session, agents=(joined,)),),
                agents=(bound,),
                events=(AgentJoined(joined),),
            )
        )
    assert await store.get_session(tenant_id="acme", session_id="s1") == before_session
    assert await store.get_agent(tenant_id="acme", instance_id="i1") == before_agent
    assert await store.list_events(tenant_id="acme", session_id="s1") == []
