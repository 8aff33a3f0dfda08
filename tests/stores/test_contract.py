"""The store contract: every ``Store`` implementation must pass this suite.

A new implementation joins by adding one line to ``FACTORIES``. A factory gets
the test's ``tmp_path`` (for a database file) and returns the store, or an
awaitable of it; the fixture always closes the store at teardown.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import inspect
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from svantic_grpc.core.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from svantic_grpc.core.events import (
    AgentJoined,
    AgentLeft,
    ArtifactAdded,
    EventPayload,
    MessageStateChanged,
    StatusChanged,
)
from svantic_grpc.core.inputs.model import (
    Decision,
    FormField,
    InputKind,
    InputRequest,
    InputState,
    Resolution,
    ToolCall,
)
from svantic_grpc.core.messages.model import Artifact, Message, MessageState, Part, Role
from svantic_grpc.core.models import (
    AgentRegistration,
    AgentStatus,
    ConnectionStats,
    DeploymentMode,
    JoinReason,
    Session,
    SessionAgent,
    SessionStatus,
    Skill,
    Tool,
)
from svantic_grpc.core.store import Change, Store
from svantic_grpc.stores import MemoryStore, _copy
from svantic_grpc.stores.postgres import PostgresStore
from svantic_grpc.stores.sqlite import SqliteStore
from tests import _postgres

StoreFactory = Callable[[Path], "Store | Awaitable[Store]"]

FACTORIES: dict[str, StoreFactory] = {
    "memory": lambda tmp_path: MemoryStore(),
    "sqlite": lambda tmp_path: SqliteStore.open(tmp_path / "mesh.db"),
    "postgresql": lambda tmp_path: _postgres.fresh_store(),
}

T0 = 1_700_000_000.0


@pytest.fixture(params=sorted(FACTORIES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh store of each implementation, closed after the test."""
    made = FACTORIES[request.param](tmp_path)
    instance = await made if inspect.isawaitable(made) else made
    try:
        yield instance
    finally:
        await instance.close()
        if isinstance(instance, PostgresStore):
            await _postgres.drop_schema(instance.schema)


def make_session(
    session_id: str = "s1",
    *,
    tenant_id: str = "acme",
    created_at: float = T0,
    status: SessionStatus = SessionStatus.ACTIVE,
) -> Session:
    return Session(
        tenant_id=tenant_id,
        session_id=session_id,
        status=status,
        created_at=created_at,
        updated_at=created_at,
        last_activity_at=created_at,
        user_id="u-1",
        created_by="acme-full",
        creator_agent_type="a2ui-terminal",
    )


def make_agent(
    instance_id: str = "i1", *, tenant_id: str = "acme", agent_type: str = "researcher"
) -> AgentRegistration:
    return AgentRegistration(
        tenant_id=tenant_id,
        agent_type=agent_type,
        instance_id=instance_id,
        deployment_mode=DeploymentMode.HOSTED,
        registered_at=T0,
        last_seen_at=T0,
        url=f"http://agents.example/{instance_id}",
        agent_card={"name": instance_id, "capabilities": {"streaming": True}},
        mcp_servers={"files": {"url": "http://mcp.example"}},
    )


# Sessions


async def test_create_returns_version_one_and_get_returns_the_same_record(store: Store) -> None:
    session = make_session()
    created = await store.create_session(replace(session, version=7))
    assert created == replace(session, version=1)
    assert await store.get_session(tenant_id="acme", session_id="s1") == created


async def test_full_session_record_round_trips(store: Store) -> None:
    agents = (  # the internal agents are never stored: the session derives them
        SessionAgent("researcher", "r-1", JoinReason.ROUTED, T0 + 1, left_at=T0 + 2.5),
        SessionAgent("a2ui-terminal", "term-1", JoinReason.SELF, T0 + 3),
    )
    session = replace(
        make_session(status=SessionStatus.CLOSED),
        closed_at=T0 + 9.25,
        close_reason="idle",
        agents=agents,
    )
    created = await store.create_session(session)
    assert created == replace(session, version=1)
    assert await store.get_session(tenant_id="acme", session_id="s1") == created


async def test_missing_session_is_none(store: Store) -> None:
    assert await store.get_session(tenant_id="acme", session_id="nope") is None


async def test_duplicate_session_is_already_exists(store: Store) -> None:
    await store.create_session(make_session())
    with pytest.raises(AlreadyExists):
        await store.create_session(make_session(status=SessionStatus.PAUSED))
    stored = await store.get_session(tenant_id="acme", session_id="s1")
    assert stored is not None and stored.status is SessionStatus.ACTIVE


async def test_update_with_the_read_version_bumps_it(store: Store) -> None:
    created = await store.create_session(make_session())
    updated = await store.update_session(replace(created, status=SessionStatus.PAUSED, updated_at=T0 + 5))
    assert updated.version == 2
    assert updated.status is SessionStatus.PAUSED
    again = await store.update_session(replace(updated, status=SessionStatus.ACTIVE))
    assert again.version == 3
    assert await store.get_session(tenant_id="acme", session_id="s1") == again


async def test_update_with_a_stale_version_is_a_conflict_and_changes_nothing(store: Store) -> None:
    first_read = await store.create_session(make_session())
    second_read = await store.get_session(tenant_id="acme", session_id="s1")
    assert second_read is not None
    winner = await store.update_session(replace(second_read, status=SessionStatus.PAUSED))
    with pytest.raises(Conflict):
        await store.update_session(replace(first_read, status=SessionStatus.CLOSED, close_reason="lost"))
    assert await store.get_session(tenant_id="acme", session_id="s1") == winner


async def test_update_of_a_missing_session_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.update_session(replace(make_session("ghost"), version=1))
    assert await store.get_session(tenant_id="acme", session_id="ghost") is None


async def test_same_session_id_in_two_tenants_is_independent(store: Store) -> None:
    acme = await store.create_session(make_session("shared", tenant_id="acme"))
    globex = await store.create_session(make_session("shared", tenant_id="globex", created_at=T0 + 1))
    await store.update_session(replace(acme, status=SessionStatus.PAUSED))
    stored_globex = await store.get_session(tenant_id="globex", session_id="shared")
    assert stored_globex == globex
    stored_acme = await store.get_session(tenant_id="acme", session_id="shared")
    assert stored_acme is not None and stored_acme.status is SessionStatus.PAUSED


async def test_get_with_the_wrong_tenant_is_none(store: Store) -> None:
    await store.create_session(make_session("s1", tenant_id="acme"))
    assert await store.get_session(tenant_id="globex", session_id="s1") is None
    with pytest.raises(NotFound):
        await store.update_session(replace(make_session("s1", tenant_id="globex"), version=1))


# Listing sessions


async def test_list_sessions_pages_newest_first_over_ties(store: Store) -> None:
    # 60 sessions over 9 distinct timestamps: many ties on created_at.
    for i in range(60):
        await store.create_session(make_session(f"s{i:02d}", created_at=T0 + i // 7))
    await store.create_session(make_session("other-tenant", tenant_id="globex", created_at=T0 + 100))
    seen: list[Session] = []
    cursor = ""
    for _ in range(20):
        page = await store.list_sessions(tenant_id="acme", page_size=7, cursor=cursor)
        assert 0 < len(page.sessions) <= 7
        seen.extend(page.sessions)
        cursor = page.next_cursor
        if not cursor:
            break
    ids = [s.session_id for s in seen]
    assert sorted(ids) == [f"s{i:02d}" for i in range(60)]  # each exactly once, no other tenant
    created = [s.created_at for s in seen]
    assert created == sorted(created, reverse=True)


async def test_list_sessions_has_no_trailing_empty_page(store: Store) -> None:
    for i in range(14):
        await store.create_session(make_session(f"s{i:02d}", created_at=T0 + i))
    first = await store.list_sessions(tenant_id="acme", page_size=7)
    assert [s.session_id for s in first.sessions] == [f"s{i:02d}" for i in range(13, 6, -1)]
    assert first.next_cursor
    second = await store.list_sessions(tenant_id="acme", page_size=7, cursor=first.next_cursor)
    assert [s.session_id for s in second.sessions] == [f"s{i:02d}" for i in range(6, -1, -1)]
    assert second.next_cursor == ""


async def test_list_sessions_cursor_is_stable_when_newer_sessions_arrive(store: Store) -> None:
    for i in range(6):
        await store.create_session(make_session(f"s{i}", created_at=T0 + i))
    first = await store.list_sessions(tenant_id="acme", page_size=3)
    await store.create_session(make_session("newer", created_at=T0 + 50))
    second = await store.list_sessions(tenant_id="acme", page_size=3, cursor=first.next_cursor)
    assert [s.session_id for s in first.sessions + second.sessions] == ["s5", "s4", "s3", "s2", "s1", "s0"]


async def test_list_sessions_filters_by_status(store: Store) -> None:
    statuses = [SessionStatus.OPENING, SessionStatus.ACTIVE, SessionStatus.PAUSED, SessionStatus.CLOSED]
    for i in range(20):
        await store.create_session(make_session(f"s{i:02d}", created_at=T0 + i, status=statuses[i % 4]))
    wanted = {SessionStatus.ACTIVE, SessionStatus.PAUSED}
    seen: list[Session] = []
    cursor = ""
    while True:
        page = await store.list_sessions(tenant_id="acme", statuses=wanted, page_size=3, cursor=cursor)
        seen.extend(page.sessions)
        cursor = page.next_cursor
        if not cursor:
            break
    expected = [f"s{i:02d}" for i in range(19, -1, -1) if statuses[i % 4] in wanted]
    assert [s.session_id for s in seen] == expected
    closed = await store.list_sessions(tenant_id="acme", statuses=[SessionStatus.CLOSED])
    assert [s.session_id for s in closed.sessions] == ["s19", "s15", "s11", "s07", "s03"]
    assert closed.next_cursor == ""


async def test_list_sessions_of_an_empty_tenant(store: Store) -> None:
    await store.create_session(make_session(tenant_id="acme"))
    page = await store.list_sessions(tenant_id="globex")
    assert page.sessions == ()
    assert page.next_cursor == ""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "é",
        "A",
        _b64(b"foo"),
        _b64(b"null"),
        _b64(b"[1]"),
        _b64(b'["x", "y"]'),
        _b64(b'{"a": 1}'),
        _b64(b"[1, 2, 3]"),
        # Forged behind a valid page token's digest (found from outside: each was INTERNAL):
        _b64(b"[1" + b"0" * 400 + b', "k"]'),  # a time too large for a float
        _b64(b"[" * 100_000),  # nested past the parser's stack
        _b64(b'[1.0, "a\\u0000b"]'),  # a NUL, which PostgreSQL's text cannot hold
    ],
    ids=lambda cursor: cursor[:24],
)
async def test_foreign_cursor_is_invalid_argument(store: Store, cursor: str) -> None:
    await store.create_session(make_session())
    with pytest.raises(InvalidArgument) as excinfo:
        await store.list_sessions(tenant_id="acme", cursor=cursor)
    assert excinfo.value.field == "page_token"


async def test_open_sessions_spans_tenants_and_excludes_closed(store: Store) -> None:
    await store.create_session(make_session("a-open", tenant_id="acme"))
    await store.create_session(make_session("a-paused", tenant_id="acme", status=SessionStatus.PAUSED))
    await store.create_session(make_session("a-opening", tenant_id="acme", status=SessionStatus.OPENING))
    await store.create_session(make_session("a-closed", tenant_id="acme", status=SessionStatus.CLOSED))
    g = await store.create_session(make_session("g-open", tenant_id="globex"))
    await store.update_session(replace(g, status=SessionStatus.CLOSED, closed_at=T0 + 1))
    await store.create_session(make_session("g-open2", tenant_id="globex"))
    found = {(s.tenant_id, s.session_id) for s in await store.open_sessions()}
    assert found == {("acme", "a-open"), ("acme", "a-paused"), ("acme", "a-opening"), ("globex", "g-open2")}


# Agent registrations


async def test_agent_create_get_update_delete_with_versions(store: Store) -> None:
    agent = replace(
        make_agent(),
        skills=(Skill("search", "Search", "finds things", tags=("web",), examples=("find x",)),),
        tools=(Tool("fetch", "GET a URL", {"type": "object", "properties": {"url": {"type": "string"}}}),),
        max_concurrent_sessions=3,
        reported_status=AgentStatus.AVAILABLE,
        reported_sessions=1,
        session_ids=("s1", "s2"),
        connection=ConnectionStats("grpc", True, T0, T0 + 1, 4, 1, "timeout", "replica-b"),
    )
    created = await store.create_agent(replace(agent, version=9))
    assert created == replace(agent, version=1)
    assert await store.get_agent(tenant_id="acme", instance_id="i1") == created

    updated = await store.update_agent(
        replace(created, reported_status=AgentStatus.BUSY, last_seen_at=T0 + 5)
    )
    assert updated.version == 2
    assert await store.get_agent(tenant_id="acme", instance_id="i1") == updated

    await store.delete_agent(tenant_id="acme", instance_id="i1", version=2)
    assert await store.get_agent(tenant_id="acme", instance_id="i1") is None
    recreated = await store.create_agent(make_agent())
    assert recreated.version == 1


async def test_duplicate_agent_is_already_exists(store: Store) -> None:
    await store.create_agent(make_agent())
    with pytest.raises(AlreadyExists):
        await store.create_agent(make_agent(agent_type="writer"))
    stored = await store.get_agent(tenant_id="acme", instance_id="i1")
    assert stored is not None and stored.agent_type == "researcher"


async def test_stale_agent_update_and_delete_are_conflicts(store: Store) -> None:
    stale = await store.create_agent(make_agent())
    winner = await store.update_agent(replace(stale, url="http://new.example"))
    with pytest.raises(Conflict):
        await store.update_agent(replace(stale, url="http://lost.example"))
    with pytest.raises(Conflict):
        await store.delete_agent(tenant_id="acme", instance_id="i1", version=stale.version)
    assert await store.get_agent(tenant_id="acme", instance_id="i1") == winner


async def test_missing_agent_update_and_delete_are_not_found(store: Store) -> None:
    assert await store.get_agent(tenant_id="acme", instance_id="ghost") is None
    with pytest.raises(NotFound):
        await store.update_agent(replace(make_agent("ghost"), version=1))
    with pytest.raises(NotFound):
        await store.delete_agent(tenant_id="acme", instance_id="ghost", version=1)


async def test_agents_are_partitioned_by_tenant(store: Store) -> None:
    await store.create_agent(make_agent("i1", tenant_id="acme"))
    theirs = await store.create_agent(make_agent("i1", tenant_id="globex", agent_type="writer"))
    assert await store.get_agent(tenant_id="initech", instance_id="i1") is None
    with pytest.raises(NotFound):
        await store.delete_agent(tenant_id="initech", instance_id="i1", version=1)
    await store.delete_agent(tenant_id="acme", instance_id="i1", version=1)
    assert await store.get_agent(tenant_id="globex", instance_id="i1") == theirs


async def test_list_agents_sorted_by_type_then_instance_and_filtered(store: Store) -> None:
    for agent_type, instance_id in [
        ("writer", "b"),
        ("researcher", "z"),
        ("writer", "a"),
        ("researcher", "c"),
    ]:
        await store.create_agent(make_agent(instance_id, agent_type=agent_type))
    await store.create_agent(make_agent("x", tenant_id="globex", agent_type="researcher"))
    listed = await store.list_agents(tenant_id="acme")
    assert [(a.agent_type, a.instance_id) for a in listed] == [
        ("researcher", "c"),
        ("researcher", "z"),
        ("writer", "a"),
        ("writer", "b"),
    ]
    writers = await store.list_agents(tenant_id="acme", agent_type="writer")
    assert [a.instance_id for a in writers] == ["a", "b"]
    assert list(await store.list_agents(tenant_id="acme", agent_type="critic")) == []
    assert [a.instance_id for a in await store.list_agents(tenant_id="globex")] == ["x"]


async def test_stored_json_cannot_be_changed_behind_the_stores_back(store: Store) -> None:
    """Records copy the JSON they are given and hand out read-only views of it."""
    card: dict[str, Any] = {"name": "i1", "capabilities": {"streaming": True}}
    created = await store.create_agent(replace(make_agent(), agent_card=card))
    card["name"] = "changed by the caller after create"  # the caller's dict is not the record's
    card["capabilities"]["streaming"] = False
    for change in (
        lambda: created.agent_card.__setitem__("name", "x"),
        lambda: created.agent_card["capabilities"].update(streaming=False),
        lambda: created.mcp_servers.clear(),
    ):
        with pytest.raises(TypeError):
            change()
    fetched = await store.get_agent(tenant_id="acme", instance_id="i1")
    assert fetched is not None
    assert fetched.agent_card == {"name": "i1", "capabilities": {"streaming": True}}
    assert fetched.mcp_servers == {"files": {"url": "http://mcp.example"}}
    # A change is a new record, written with the version that was read.
    renamed = await store.update_agent(replace(fetched, agent_card={**fetched.agent_card, "name": "renamed"}))
    again = await store.get_agent(tenant_id="acme", instance_id="i1")
    assert again is not None and again.agent_card["name"] == "renamed" and again.version == renamed.version


async def test_tool_schema_and_data_parts_are_read_only(store: Store) -> None:
    schema: dict[str, Any] = {"type": "object", "required": ["url"]}
    created = await store.create_agent(replace(make_agent(), tools=(Tool("fetch", input_schema=schema),)))
    schema["type"] = "string"
    with pytest.raises(TypeError):
        created.tools[0].input_schema["required"].append("x")
    fetched = await store.get_agent(tenant_id="acme", instance_id="i1")
    assert fetched is not None and fetched.tools[0].input_schema == {"type": "object", "required": ["url"]}
    data: dict[str, Any] = {"target_agent": "echo", "context": {"k": [1]}}
    part = Part(data=data)
    data["target_agent"] = "other"
    assert part.data == {"target_agent": "echo", "context": {"k": [1]}}
    with pytest.raises(TypeError):
        part.data["context"]["k"].append(2)


# Event log


def _status(to: SessionStatus = SessionStatus.PAUSED) -> StatusChanged:
    return StatusChanged(SessionStatus.ACTIVE, to)


async def test_append_event_numbers_each_session_from_one(store: Store) -> None:
    sequences = []
    for session_id in ["s1", "s2", "s1", "s1", "s2"]:
        event = await store.append_event(tenant_id="acme", session_id=session_id, time=T0, payload=_status())
        sequences.append((session_id, event.sequence))
    other = await store.append_event(tenant_id="globex", session_id="s1", time=T0, payload=_status())
    assert sequences == [("s1", 1), ("s2", 1), ("s1", 2), ("s1", 3), ("s2", 2)]
    assert other.sequence == 1


async def test_list_events_after_sequence_and_limit(store: Store) -> None:
    for i in range(10):
        await store.append_event(tenant_id="acme", session_id="s1", time=T0 + i, payload=_status())
        await store.append_event(tenant_id="acme", session_id="s2", time=T0 + i, payload=_status())
        await store.append_event(tenant_id="globex", session_id="s1", time=T0 + i, payload=_status())
    events = await store.list_events(tenant_id="acme", session_id="s1")
    assert [e.sequence for e in events] == list(range(1, 11))
    assert all((e.tenant_id, e.session_id) == ("acme", "s1") for e in events)
    assert [e.time for e in events] == [T0 + i for i in range(10)]

    after = await store.list_events(tenant_id="acme", session_id="s1", after_sequence=4, limit=3)
    assert [e.sequence for e in after] == [5, 6, 7]
    tail = await store.list_events(tenant_id="acme", session_id="s1", after_sequence=8, limit=3)
    assert [e.sequence for e in tail] == [9, 10]
    assert list(await store.list_events(tenant_id="acme", session_id="s1", after_sequence=10)) == []
    assert list(await store.list_events(tenant_id="acme", session_id="s1", after_sequence=99)) == []
    assert list(await store.list_events(tenant_id="acme", session_id="nope")) == []
    assert list(await store.list_events(tenant_id="initech", session_id="s1")) == []


@pytest.mark.parametrize(
    "payload",
    [
        AgentJoined(SessionAgent("orchestrator", "orch-1", JoinReason.AUTO, T0, internal=True)),
        AgentJoined(SessionAgent("researcher", "r-1", JoinReason.INVITED, T0 + 0.5, left_at=T0 + 1.25)),
        AgentLeft("researcher", "r-1", "heartbeat lost"),
        StatusChanged(SessionStatus.OPENING, SessionStatus.ACTIVE),
        StatusChanged(SessionStatus.PAUSED, SessionStatus.CLOSED, reason="idle for 3600s"),
    ],
    ids=["joined-internal", "joined-left", "left", "status", "closed"],
)
async def test_event_payloads_round_trip(store: Store, payload: EventPayload) -> None:
    appended = await store.append_event(tenant_id="acme", session_id="s1", time=T0 + 0.125, payload=payload)
    (stored,) = await store.list_events(tenant_id="acme", session_id="s1")
    assert stored == appended
    assert stored.payload == payload
    assert type(stored.payload) is type(payload)
    assert (stored.tenant_id, stored.session_id, stored.sequence, stored.time) == (
        "acme",
        "s1",
        1,
        T0 + 0.125,
    )
    assert stored.closes_session == (
        isinstance(payload, StatusChanged) and payload.to_status is SessionStatus.CLOSED
    )


# Lifecycle


async def test_close_is_idempotent(store: Store) -> None:
    await store.create_session(make_session())
    await store.close()
    await store.close()


def test_records_shared_without_copying_really_hold_nothing_mutable() -> None:
    """The in-memory store hands out these record types without copying them (see stores/_copy.py).

    JSON fields (``dict``/``list`` annotations) are allowed only in classes that freeze
    them on construction; the test above shows that freezing holds.
    """
    immutable_leaves = (str, int, float, bool, bytes, type(None))
    freezes_json = {Part, Tool, AgentRegistration, ToolCall, FormField, Resolution}

    def check(tp: object, seen: set[object], owner: type | None = None) -> None:
        if tp in seen:
            return
        seen.add(tp)
        origin = typing.get_origin(tp)
        if origin is tuple:
            for arg in typing.get_args(tp):
                if arg is not Ellipsis:
                    check(arg, seen, owner)
            return
        if origin in (typing.Union, types.UnionType):
            for arg in typing.get_args(tp):
                check(arg, seen, owner)
            return
        if tp is Any or origin in (dict, list):
            assert owner in freezes_json, f"{owner} holds a mutable {tp} it does not freeze"
            return
        assert origin is None, f"{tp} is a mutable container"
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            assert tp.__dataclass_params__.frozen, tp  # type: ignore[attr-defined]
            hints = typing.get_type_hints(tp)
            for f in dataclasses.fields(tp):
                check(hints[f.name], seen, tp)
            return
        assert tp in immutable_leaves, f"{tp} may be mutable"

    for cls in _copy._SHARED:
        if dataclasses.is_dataclass(cls):
            check(cls, set())


# Messages


def make_message(message_id: str, *, session_id: str = "s1", created_at: float = T0) -> Message:
    return Message(
        "acme",
        session_id,
        message_id,
        Role.USER,
        (Part(text="hi"),),
        MessageState.SUBMITTED,
        created_at,
        created_at,
    )


async def test_message_versions_guard_updates(store: Store) -> None:
    created = await store.create_message(make_message("m1"))
    assert created.version == 1
    with pytest.raises(AlreadyExists):
        await store.create_message(make_message("m1"))
    working = await store.update_message(replace(created, state=MessageState.WORKING))
    assert working.version == 2
    with pytest.raises(Conflict):
        await store.update_message(replace(created, state=MessageState.FAILED))  # read at version 1
    with pytest.raises(NotFound):
        await store.update_message(make_message("nope"))
    assert await store.get_message(tenant_id="acme", session_id="s1", message_id="m1") == working


async def test_a_message_is_found_by_its_id_alone_within_its_tenant(store: Store) -> None:
    await store.create_message(make_message("m1", session_id="s1"))
    created = await store.create_message(make_message("m2", session_id="s2"))
    assert await store.find_message(tenant_id="acme", message_id="m2") == created
    assert await store.find_message(tenant_id="globex", message_id="m2") is None  # another tenant's
    assert await store.find_message(tenant_id="acme", message_id="nope") is None


async def test_a_message_change_and_its_events_are_written_together(store: Store) -> None:
    submitted = MessageStateChanged("m1", None, MessageState.SUBMITTED)
    created, events = await store.create_message_with_events(
        make_message("m1"), time=T0, payloads=(submitted,)
    )
    assert created.version == 1 and [(e.sequence, e.payload) for e in events] == [(1, submitted)]

    def announce(saved: Message) -> tuple[EventPayload, ...]:
        return (
            MessageStateChanged(saved.message_id, MessageState.SUBMITTED, saved.state, "", saved),
            ArtifactAdded(saved.message_id, saved.artifacts[0]),
        )

    done = replace(created, state=MessageState.COMPLETED, artifacts=(Artifact("a1", (Part(text="out"),)),))
    updated, events = await store.update_message_with_events(done, time=T0 + 1, payloads=announce)
    assert updated.version == 2 and updated.state is MessageState.COMPLETED
    assert [e.sequence for e in events] == [2, 3]
    first = events[0].payload
    assert isinstance(first, MessageStateChanged) and first.message == updated  # the record as stored
    logged = await store.list_events(tenant_id="acme", session_id="s1")
    assert [e.payload for e in logged] == [submitted, *(e.payload for e in events)]
    assert await store.get_message(tenant_id="acme", session_id="s1", message_id="m1") == updated

    # A stale change writes neither the record nor its events.
    with pytest.raises(Conflict):
        await store.update_message_with_events(done, time=T0 + 2, payloads=announce)
    with pytest.raises(AlreadyExists):
        await store.create_message_with_events(make_message("m1"), time=T0, payloads=(submitted,))
    assert len(await store.list_events(tenant_id="acme", session_id="s1")) == 3


async def test_list_messages_by_session_and_state_oldest_first_in_pages(store: Store) -> None:
    for n in range(5):
        await store.create_message(make_message(f"m{n}", created_at=T0 + n))
    await store.create_message(make_message("other", session_id="s2", created_at=T0))
    m3 = await store.get_message(tenant_id="acme", session_id="s1", message_id="m3")
    assert m3 is not None
    await store.update_message(replace(m3, state=MessageState.COMPLETED))

    first = await store.list_messages(tenant_id="acme", session_id="s1", page_size=3)
    rest = await store.list_messages(tenant_id="acme", session_id="s1", page_size=3, cursor=first.next_cursor)
    assert [m.message_id for m in first.messages + rest.messages] == ["m0", "m1", "m2", "m3", "m4"]
    assert rest.next_cursor == ""
    done = await store.list_messages(tenant_id="acme", states=(MessageState.COMPLETED,))
    assert [m.message_id for m in done.messages] == ["m3"]
    everything = await store.list_messages(tenant_id="acme", page_size=50)
    assert len(everything.messages) == 6
    assert (await store.list_messages(tenant_id="globex")).messages == ()


# Input requests whose answers outlive them


async def test_granting_inputs_are_the_resolved_session_and_always_approvals(store: Store) -> None:
    def request(request_id: str, tenant_id: str = "acme") -> InputRequest:
        return InputRequest(
            tenant_id, request_id, "s1", "m1", InputKind.TOOL_APPROVAL, T0, T0 + 600, ToolCall("crm.delete")
        )

    answers = {
        "always": Decision.APPROVE_ALWAYS,
        "session": Decision.APPROVE_FOR_SESSION,
        "once": Decision.APPROVE,
        "no": Decision.DENY,
    }
    for request_id, decision in answers.items():
        created = await store.create_input(request(request_id))
        resolution = Resolution(decision=decision, resolved_by="ops", resolved_at=T0 + 1)
        await store.update_input(replace(created, state=InputState.RESOLVED, resolution=resolution))
    await store.create_input(request("pending"))
    other = await store.create_input(request("elsewhere", tenant_id="globex"))
    resolution = Resolution(decision=Decision.APPROVE_ALWAYS, resolved_by="ops", resolved_at=T0 + 1)
    await store.update_input(replace(other, state=InputState.RESOLVED, resolution=resolution))

    granting = await store.granting_inputs()
    assert sorted((r.tenant_id, r.request_id) for r in granting) == [
        ("acme", "always"),
        ("acme", "session"),
        ("globex", "elsewhere"),
    ]


async def test_untold_outcomes_are_the_ended_requests_not_yet_marked_told(store: Store) -> None:
    def request(request_id: str, session_id: str = "s1", at: float = T0) -> InputRequest:
        return InputRequest(
            "acme",
            request_id,
            session_id,
            "m1",
            InputKind.TOOL_APPROVAL,
            at,
            at + 600,
            ToolCall("crm.delete"),
        )

    ended: dict[str, InputRequest] = {}
    for n, (request_id, session_id) in enumerate((("a", "s1"), ("b", "s2"), ("c", "s1"))):
        created = await store.create_input(request(request_id, session_id, T0 + n))
        ended[request_id] = await store.update_input(
            replace(created, state=InputState.CANCELED, outcome_reason="withdrawn")
        )
    await store.create_input(request("pending"))  # nothing to tell yet
    told = await store.create_input(request("told", at=T0 + 9))
    await store.update_input(replace(told, state=InputState.EXPIRED, outcome_told=True))

    assert [r.request_id for r in await store.untold_outcomes()] == ["a", "b", "c"]
    one_session = await store.untold_outcomes(tenant_id="acme", session_id="s1")
    assert [r.request_id for r in one_session] == ["a", "c"]
    assert one_session[0] == ended["a"]  # the record as stored, version and all
    await store.write(Change("acme", "s1", inputs=(replace(ended["a"], outcome_told=True),)))
    assert [r.request_id for r in await store.untold_outcomes()] == ["b", "c"]
    assert await store.untold_outcomes(tenant_id="globex", session_id="s1") == []


# Adapters' values


async def test_adapter_values_are_kept_per_adapter_and_key(store: Store) -> None:
    assert await store.get_adapter_value("slack", "post/acme/r1") is None
    await store.put_adapter_value("slack", "post/acme/r1", {"channel": "C1", "ts": "1.0001"})
    await store.put_adapter_value("webhook", "post/acme/r1", {"other": True})
    value = await store.get_adapter_value("slack", "post/acme/r1")
    assert value == {"channel": "C1", "ts": "1.0001"}
    assert value is not None
    value["ts"] = "changed by the caller"  # a copy: the kept value does not change
    assert await store.get_adapter_value("slack", "post/acme/r1") == {"channel": "C1", "ts": "1.0001"}
    await store.put_adapter_value("slack", "post/acme/r1", {"channel": "C2", "ts": "2.0"})  # replaces
    assert await store.get_adapter_value("slack", "post/acme/r1") == {"channel": "C2", "ts": "2.0"}
    await store.delete_adapter_value("slack", "post/acme/r1")
    await store.delete_adapter_value("slack", "post/acme/r1")  # twice: nothing happens
    assert await store.get_adapter_value("slack", "post/acme/r1") is None
    assert await store.get_adapter_value("webhook", "post/acme/r1") == {"other": True}


async def test_an_adapter_value_put_if_absent_is_put_once(store: Store) -> None:
    assert await store.put_adapter_value("webhook", "answered/acme/r1", {"by": "a"}, if_absent=True)
    assert not await store.put_adapter_value("webhook", "answered/acme/r1", {"by": "b"}, if_absent=True)
    assert await store.get_adapter_value("webhook", "answered/acme/r1") == {"by": "a"}  # the first stays
    assert await store.put_adapter_value("webhook", "answered/acme/r1", {"by": "c"})  # a plain put replaces
    assert await store.get_adapter_value("webhook", "answered/acme/r1") == {"by": "c"}
    await store.delete_adapter_value("webhook", "answered/acme/r1")
    assert await store.put_adapter_value("webhook", "answered/acme/r1", {"by": "d"}, if_absent=True)


async def test_expired_adapter_values_are_purged_by_their_expires_at(store: Store) -> None:
    await store.put_adapter_value("console", "out/a", {"expires_at": T0 - 1})
    await store.put_adapter_value("console", "out/b", {"expires_at": int(T0) - 5})  # a whole number
    await store.put_adapter_value("console", "out/c", {"expires_at": T0 + 60})  # still good
    await store.put_adapter_value("console", "out/d", {"expires_at": "yesterday"})  # not a number
    await store.put_adapter_value("console", "out/e", {"other": 1})  # none
    await store.put_adapter_value("slack", "out/a", {"expires_at": T0 - 1})  # another adapter's
    assert await store.purge_expired_adapter_values("console", before=T0) == 2
    assert await store.get_adapter_value("console", "out/a") is None
    assert await store.get_adapter_value("console", "out/b") is None
    for key in ("out/c", "out/d", "out/e"):
        assert await store.get_adapter_value("console", key) is not None, key
    assert await store.get_adapter_value("slack", "out/a") == {"expires_at": T0 - 1}
    assert await store.purge_expired_adapter_values("console", before=T0) == 0


async def test_a_session_is_listed_under_its_current_status_only(store: Store) -> None:
    first = await store.create_session(make_session("s1", created_at=T0))
    second = await store.create_session(make_session("s2", created_at=T0 + 1))
    await store.update_session(replace(first, status=SessionStatus.PAUSED))
    await store.write(
        Change("acme", "s2", sessions=(replace(second, status=SessionStatus.CLOSED, closed_at=T0 + 2),))
    )

    async def listed(*statuses: SessionStatus) -> list[str]:
        page = await store.list_sessions(tenant_id="acme", statuses=statuses)
        return [s.session_id for s in page.sessions]

    assert await listed(SessionStatus.ACTIVE) == []
    assert await listed(SessionStatus.PAUSED) == ["s1"]
    assert await listed(SessionStatus.CLOSED) == ["s2"]
    assert await listed() == ["s2", "s1"]
    assert await store.purge_closed_sessions(closed_before=T0 + 3, limit=10) == 1
    assert await listed() == ["s1"]
