"""What only the SQLite store has: a file that outlives the process, shared by processes.

Behaviour common to every store is in ``test_contract.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import sqlite3
import sys
import textwrap
import types
import typing
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from svantic_grpc.core.errors import Conflict, Unavailable
from svantic_grpc.core.events import (
    AgentJoined,
    AgentLeft,
    ArtifactAdded,
    Event,
    EventPayload,
    InputEnded,
    InputRaised,
    MessageStateChanged,
    StatusChanged,
    TurnAdded,
)
from svantic_grpc.core.inputs.model import (
    Decision,
    Form,
    FormField,
    InputKind,
    InputRequest,
    InputState,
    PlanItem,
    Resolution,
    Surface,
    ToolCall,
)
from svantic_grpc.core.messages.model import Artifact, FilePart, Message, MessageState, Part, Role, Turn
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
from svantic_grpc.core.store import AuditRecord
from svantic_grpc.stores import _schema
from svantic_grpc.stores.sqlite import ForeignDatabaseError, SqliteStore, StoreVersionError

T0 = 1_700_000_000.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "mesh.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    async with await SqliteStore.open(db_path) as opened:
        yield opened


# Records with every field set away from its default, so a field the codec forgets shows.

AGENT_IN_SESSION = SessionAgent(
    "researcher", "r-1", JoinReason.ROUTED, T0 + 1, internal=True, left_at=T0 + 2.5
)


def full_session() -> Session:
    return Session(
        tenant_id="acme",
        session_id="s1",
        status=SessionStatus.PAUSED,
        created_at=T0,
        updated_at=T0 + 3,
        last_activity_at=T0 + 2,
        user_id="u-1",
        created_by="acme-full",
        creator_agent_type="a2ui-terminal",
        closed_at=T0 + 9.25,
        close_reason="idle",
        agents=(AGENT_IN_SESSION, SessionAgent("orchestrator", "o-1", JoinReason.AUTO, T0)),
    )


def full_agent() -> AgentRegistration:
    return AgentRegistration(
        tenant_id="acme",
        agent_type="researcher",
        instance_id="r-1",
        deployment_mode=DeploymentMode.CONNECTED,
        registered_at=T0,
        last_seen_at=T0 + 4,
        url="http://agents.example/r-1",
        agent_card={"name": "r-1", "capabilities": {"streaming": True}, "n": [1, 2.5, None]},
        skills=(Skill("search", "Search", "finds things", ("web",), ("find x",), ("text",), ("json",)),),
        tools=(Tool("fetch", "GET a URL", {"type": "object", "required": ["url"]}),),
        mcp_servers={"files": {"url": "http://mcp.example"}},
        max_concurrent_sessions=3,
        reported_status=AgentStatus.BUSY,
        reported_sessions=2,
        session_ids=("s1", "s2"),
        connection=ConnectionStats("grpc", True, T0, T0 + 1, 4, 1, "timeout", "replica-b"),
    )


PARTS = (
    Part(text="héllo ☃"),
    Part(data={"target_agent": "echo", "context": {"k": [1, "two", False]}}),
    Part(file=FilePart("a.bin", "application/octet-stream", bytes(range(256)) + b"\x00", "file:///a.bin")),
)


def full_message() -> Message:
    return Message(
        tenant_id="acme",
        session_id="s1",
        message_id="m1",
        role=Role.AGENT,
        parts=PARTS,
        state=MessageState.INPUT_REQUIRED,
        created_at=T0 + 0.1,
        updated_at=T0 + 0.2,
        sender="acme-full",
        state_reason="waiting on a human",
        history=(Turn(Role.AGENT, PARTS[:1], T0 + 0.15, instance_id="r-1"),),
        artifacts=(Artifact("a1", PARTS[1:], name="result"),),
        agent_type="researcher",
        instance_id="r-1",
        input_request_ids=("in-1",),
        remote_task_id="task-9",
    )


def full_input() -> InputRequest:
    return InputRequest(
        tenant_id="acme",
        request_id="in-1",
        session_id="s1",
        message_id="m1",
        kind=InputKind.FORM,
        created_at=T0 + 0.3,
        expires_at=T0 + 600,
        tool_call=ToolCall("fetch", {"url": "http://x.example"}, agent_type="researcher", instance_id="r-1"),
        form=Form(
            "Where to?",
            "Pick a city",
            (FormField("city", "select", "City", True, True, ("Oslo", "Lima"), default="Oslo"),),
        ),
        plan=(PlanItem("look it up", agent_type="researcher", tool_name="fetch"),),
        allowed_decisions=(Decision.APPROVE, Decision.DENY),
        allowed_responders=("alice",),
        policy="ask",
        state=InputState.RESOLVED,
        resolution=Resolution(
            decision=Decision.APPROVE_FOR_SESSION,
            reason="fine",
            values={"city": "Oslo"},
            confirmed=True,
            payload={"slack": {"ts": "1.2"}},
            resolved_by="alice",
            surface=Surface.SLACK,
            resolved_at=T0 + 5,
        ),
        outcome_reason="answered",
        outcome_told=True,
    )


def full_audit() -> AuditRecord:
    return AuditRecord("acme", "in-1", "s1", "m1", "form", "form submitted", "alice", "slack", T0 + 5)


def full_payloads() -> list[EventPayload]:
    message = replace(full_message(), version=3)
    request = replace(full_input(), version=2)
    return [
        AgentJoined(AGENT_IN_SESSION),
        AgentLeft("researcher", "r-1", "heartbeat lost"),
        StatusChanged(SessionStatus.ACTIVE, SessionStatus.CLOSED, reason="idle"),
        MessageStateChanged("m1", MessageState.WORKING, MessageState.COMPLETED, "done", message),
        MessageStateChanged("m1", None, MessageState.SUBMITTED),
        TurnAdded("m1", message.history[0]),
        ArtifactAdded("m1", message.artifacts[0]),
        InputRaised(request),
        InputEnded(request),
    ]


async def write_everything(store: SqliteStore) -> dict[str, Any]:
    """Store one of each record (and every kind of event); what was stored, by kind."""
    written: dict[str, Any] = {
        "session": await store.create_session(full_session()),
        "agent": await store.create_agent(full_agent()),
        "message": await store.create_message(full_message()),
        "input": await store.create_input(replace(full_input(), state=InputState.PENDING, resolution=None)),
        "audit": [await store.append_audit(full_audit()), await store.append_audit(full_audit())],
        "events": [
            await store.append_event(tenant_id="acme", session_id="s1", time=T0 + i / 8, payload=p)
            for i, p in enumerate(full_payloads())
        ],
    }
    written["session"] = await store.update_session(replace(written["session"], close_reason="updated"))
    written["input"] = await store.update_input(replace(full_input(), version=written["input"].version))
    return written


async def read_everything(store: SqliteStore) -> dict[str, Any]:
    return {
        "session": await store.get_session(tenant_id="acme", session_id="s1"),
        "agent": await store.get_agent(tenant_id="acme", instance_id="r-1"),
        "message": await store.get_message(tenant_id="acme", session_id="s1", message_id="m1"),
        "input": await store.get_input(tenant_id="acme", request_id="in-1"),
        "audit": list(await store.list_audit(tenant_id="acme")),
        "events": list(await store.list_events(tenant_id="acme", session_id="s1")),
    }


# Durability


async def test_everything_survives_closing_and_reopening_the_file(db_path: Path) -> None:
    async with await SqliteStore.open(db_path) as store:
        written = await write_everything(store)
        assert await read_everything(store) == written

    async with await SqliteStore.open(db_path) as reopened:
        assert await read_everything(reopened) == written
        assert [e.sequence for e in written["events"]] == list(range(1, len(full_payloads()) + 1))
        assert [a.sequence for a in written["audit"]] == [1, 2]
        assert [type(e.payload) for e in written["events"]] == [type(p) for p in full_payloads()]
        # Numbering carries on from the stored log, and versions from the stored rows.
        more = await reopened.append_event(tenant_id="acme", session_id="s1", time=T0, payload=_status())
        assert more.sequence == len(full_payloads()) + 1
        assert (await reopened.append_audit(full_audit())).sequence == 3
        assert (await reopened.update_session(written["session"])).version == 3
        with pytest.raises(Conflict):
            await reopened.update_input(replace(written["input"], version=1))
        assert [s.session_id for s in await reopened.open_sessions()] == ["s1"]
        assert list(await reopened.pending_inputs()) == []


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _record_types(tp: Any, found: set[type]) -> None:
    """Every dataclass reachable from ``tp`` through its fields' annotations."""
    origin = typing.get_origin(tp)
    if origin in (tuple, typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            _record_types(arg, found)
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp) and tp not in found:
        found.add(tp)
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            _record_types(hints[f.name], found)


def _set_fields(value: Any, seen: dict[type, set[str]]) -> None:
    """Record, per dataclass, which fields hold something other than their default."""
    if isinstance(value, tuple | list):
        for item in value:
            _set_fields(item, seen)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = seen.setdefault(type(value), set())
        for f in dataclasses.fields(value):
            current = getattr(value, f.name)
            if _default(f) is dataclasses.MISSING or current != _default(f):
                names.add(f.name)
            _set_fields(current, seen)


async def test_the_round_trip_covers_every_field_of_every_record(store: SqliteStore) -> None:
    """Fails when a record gains a field (or a nested record type) that the codec does not store."""
    written = await write_everything(store)
    assert await read_everything(store) == written
    seen: dict[type, set[str]] = {}
    _set_fields(list(written.values()), seen)
    stored_types: set[type] = set()
    for root in (Session, AgentRegistration, Message, InputRequest, AuditRecord, Event):
        _record_types(root, stored_types)
    assert set(seen) == stored_types
    for cls in stored_types:
        unset = {f.name for f in dataclasses.fields(cls)} - seen[cls]
        assert not unset, f"the samples leave {cls.__name__}.{sorted(unset)} at their defaults"


async def test_unfinished_messages_are_those_not_in_a_terminal_state(store: SqliteStore) -> None:
    for tenant_id in ("acme", "globex"):
        for state in MessageState:
            message = replace(full_message(), tenant_id=tenant_id, message_id=f"m-{state.value}", state=state)
            await store.create_message(message)
    found = {(m.tenant_id, m.state) for m in await store.unfinished_messages()}
    assert found == {(t, s) for t in ("acme", "globex") for s in MessageState if not s.terminal}


# Two writers on one file


async def test_two_stores_on_one_file_racing_a_resolution_have_exactly_one_winner(db_path: Path) -> None:
    async with await SqliteStore.open(db_path) as first, await SqliteStore.open(db_path) as second:
        for round_ in range(40):
            read = await first.create_input(_pending(f"in-{round_}"))
            outcomes = await asyncio.gather(
                _resolve(first, read, "first"), _resolve(second, read, "second"), return_exceptions=True
            )
            winners = [o for o in outcomes if isinstance(o, InputRequest)]
            assert len(winners) == 1, outcomes
            assert sum(isinstance(o, Conflict) for o in outcomes) == 1, outcomes
            stored = await second.get_input(tenant_id="acme", request_id=read.request_id)
            assert stored == winners[0] and stored.version == 2


async def test_appends_from_two_stores_number_events_and_audit_without_gaps(db_path: Path) -> None:
    async with await SqliteStore.open(db_path) as first, await SqliteStore.open(db_path) as second:

        async def append(store: SqliteStore, n: int) -> list[int]:
            sequences = []
            for i in range(n):
                event = await store.append_event(
                    tenant_id="acme", session_id="s1", time=T0 + i, payload=_status()
                )
                sequences.append(event.sequence)
                sequences.append(-(await store.append_audit(full_audit())).sequence)
            return sequences

        mine, theirs = await asyncio.gather(append(first, 100), append(second, 100))
        assert sorted(s for s in mine + theirs if s > 0) == list(range(1, 201))
        assert sorted(-s for s in mine + theirs if s < 0) == list(range(1, 201))
        logged = await second.list_events(tenant_id="acme", session_id="s1", limit=1000)
        assert [e.sequence for e in logged] == list(range(1, 201))
        assert [a.sequence for a in await first.list_audit(tenant_id="acme")] == list(range(1, 201))


async def test_a_batch_of_events_is_numbered_consecutively_between_single_appends(db_path: Path) -> None:
    async with await SqliteStore.open(db_path) as first, await SqliteStore.open(db_path) as second:
        batches = [
            first.append_events(tenant_id="acme", session_id="s1", time=T0, payloads=full_payloads())
            for _ in range(10)
        ]
        singles = [
            second.append_event(tenant_id="acme", session_id="s1", time=T0, payload=_status())
            for _ in range(30)
        ]
        results = await asyncio.gather(*batches, *singles)
        for batch in results[:10]:
            assert isinstance(batch, list)
            sequences = [e.sequence for e in batch]
            assert sequences == list(range(sequences[0], sequences[0] + len(full_payloads())))
            assert [e.payload for e in batch] == full_payloads()
        logged = await first.list_events(tenant_id="acme", session_id="s1", limit=1000)
        assert [e.sequence for e in logged] == list(range(1, 10 * len(full_payloads()) + 31))
        assert await first.append_events(tenant_id="acme", session_id="s1", time=T0, payloads=()) == []


async def test_a_write_waits_for_another_writers_lock(store: SqliteStore, db_path: Path) -> None:
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, other.execute, "COMMIT")
        created = await store.create_input(_pending("in-1"))  # blocks in SQLite until the commit
        assert created.version == 1
    finally:
        other.close()


async def test_a_write_that_outwaits_the_busy_timeout_is_unavailable(db_path: Path) -> None:
    async with await SqliteStore.open(db_path, busy_timeout_ms=50) as store:
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(Unavailable) as excinfo:
                await store.create_input(_pending("in-1"))
            assert excinfo.value.reason == "STORE_BUSY"
            other.execute("COMMIT")
            assert (await store.create_input(_pending("in-1"))).version == 1  # nothing half-done
        finally:
            other.close()


async def test_writes_sent_together_share_a_commit_yet_fail_one_by_one(db_path: Path) -> None:
    async with await SqliteStore.open(db_path) as store:
        first = await store.create_input(_pending("in-0"))
        await _resolve(store, first, "earlier")  # leaves `first` a stale read
        writes = [
            *(store.create_input(_pending(f"in-{n}")) for n in range(1, 9)),
            store.create_input(_pending("in-3")),  # a duplicate of one in this very batch
            _resolve(store, first, "late"),  # written at a version that is gone
            store.append_events(tenant_id="acme", session_id="s1", time=T0, payloads=full_payloads()),
        ]
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
    assert [type(o).__name__ for o in outcomes[8:10]] == ["AlreadyExists", "Conflict"]
    assert not any(isinstance(o, BaseException) for o in outcomes[:8] + outcomes[10:]), outcomes
    async with await SqliteStore.open(db_path) as reopened:  # what landed is on disk
        stored = await reopened.list_inputs(tenant_id="acme", page_size=50)
        assert sorted(r.request_id for r in stored.requests) == [f"in-{n}" for n in range(9)]
        resolved = await reopened.get_input(tenant_id="acme", request_id="in-0")
        assert resolved is not None and resolved.resolution.resolved_by == "earlier"
        logged = await reopened.list_events(tenant_id="acme", session_id="s1")
        assert [e.payload for e in logged] == full_payloads()


async def test_a_write_failing_half_way_leaves_nothing_while_its_batch_commits(store: SqliteStore) -> None:
    # No store call fails after it has written today; this holds the rule for one that will.
    def half(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO audit (tenant_id, sequence, request_id, record) VALUES ('acme', 99, 'x', '{}')"
        )
        raise Conflict("second statement failed")

    outcomes = await asyncio.gather(
        store.create_input(_pending("in-1")),
        store._write(half),
        store.append_audit(full_audit()),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], Conflict) and isinstance(outcomes[2], AuditRecord)
    assert [a.sequence for a in await store.list_audit(tenant_id="acme")] == [1]
    assert await store.get_input(tenant_id="acme", request_id="in-1") == outcomes[0]


async def test_closing_the_store_first_commits_the_writes_it_accepted(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    writes = [asyncio.create_task(store.create_input(_pending(f"in-{n}"))) for n in range(5)]
    await asyncio.sleep(0)  # the writes are queued, none committed yet
    await store.close()
    assert [(await w).version for w in writes] == [1] * 5
    async with await SqliteStore.open(db_path) as reopened:
        assert len((await reopened.list_inputs(tenant_id="acme")).requests) == 5


async def test_a_write_whose_caller_is_cancelled_still_lands_whole(store: SqliteStore) -> None:
    cancelled = asyncio.create_task(
        store.append_events(tenant_id="acme", session_id="s1", time=T0, payloads=full_payloads())
    )
    await asyncio.sleep(0)
    cancelled.cancel()
    await store.create_input(_pending("in-1"))  # queued after it, so committed after it
    assert cancelled.cancelled()
    logged = await store.list_events(tenant_id="acme", session_id="s1")
    assert [e.payload for e in logged] == full_payloads()


RACER = textwrap.dedent(
    """
    import asyncio, sys
    from dataclasses import replace
    from svantic_grpc.core.errors import Conflict, Unavailable
    from svantic_grpc.core.inputs.model import InputState, Resolution
    from svantic_grpc.stores.sqlite import SqliteStore

    async def main(path):
        async with await SqliteStore.open(path) as store:
            read = None
            for line in sys.stdin:
                command, request_id = line.split()
                if command == "read":
                    read = await store.get_input(tenant_id="acme", request_id=request_id)
                    print("ready", flush=True)
                    continue
                resolution = Resolution(resolved_by="child")
                try:
                    await store.update_input(replace(read, state=InputState.RESOLVED, resolution=resolution))
                    print("won", flush=True)
                except Conflict:
                    print("conflict", flush=True)

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_two_processes_racing_a_resolution_have_exactly_one_winner(
    store: SqliteStore, db_path: Path, tmp_path: Path
) -> None:
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(db_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None

    async def tell(line: str) -> str:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(f"{line}\n".encode())
        await child.stdin.drain()
        return (await asyncio.wait_for(child.stdout.readline(), 30)).decode().strip()

    winners = []
    try:
        for round_ in range(30):
            request_id = f"in-{round_}"
            read = await store.create_input(_pending(request_id))
            assert await tell(f"read {request_id}") == "ready"
            child_answer, mine = await asyncio.gather(
                tell(f"go {request_id}"), _resolve(store, read, "parent"), return_exceptions=True
            )
            parent_won = isinstance(mine, InputRequest)
            assert isinstance(mine, InputRequest | Conflict), mine
            assert child_answer == ("conflict" if parent_won else "won"), (child_answer, mine)
            stored = await store.get_input(tenant_id="acme", request_id=request_id)
            assert stored is not None and stored.version == 2 and stored.resolution is not None
            winners.append(stored.resolution.resolved_by)
            assert stored.resolution.resolved_by == ("parent" if parent_won else "child")
        child.stdin.close()
        assert await asyncio.wait_for(child.wait(), 30) == 0, await child.stderr.read()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert len(winners) == 30


# Opening files: what is refused, what is created, what is migrated


async def test_a_new_file_and_its_directories_are_created_with_the_current_schema(db_path: Path) -> None:
    assert not db_path.parent.exists()
    async with await SqliteStore.open(db_path) as store:
        assert store.path == db_path
    assert _pragma(db_path, "PRAGMA user_version") == _schema.schema_version()
    assert _pragma(db_path, "PRAGMA application_id") == _schema.APPLICATION_ID
    assert _pragma(db_path, "PRAGMA journal_mode") == "wal"


async def test_an_empty_file_is_taken_as_a_new_database(db_path: Path) -> None:
    _put(db_path, b"")
    async with await SqliteStore.open(db_path) as store:
        created = await store.create_session(full_session())
        assert await store.get_session(tenant_id="acme", session_id="s1") == created


async def test_a_database_from_newer_code_is_refused(db_path: Path) -> None:
    async with await SqliteStore.open(db_path) as store:
        await store.create_session(full_session())
    newer = _schema.schema_version() + 1
    _pragma(db_path, f"PRAGMA user_version = {newer}")
    with pytest.raises(StoreVersionError) as excinfo:
        await SqliteStore.open(db_path)
    message = str(excinfo.value)
    assert str(db_path) in message and f"version {newer}" in message
    assert f"({_schema.schema_version()})" in message
    assert _pragma(db_path, "PRAGMA user_version") == newer  # left as it was


def _valid_then_truncated(path: Path) -> None:
    _put(path, b"")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (v TEXT)")
    conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 200)
    conn.commit()
    conn.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: _put(p, os.urandom(8192)),
        lambda p: _put(p, b"SQLite format 3\x00" + os.urandom(34)),
        lambda p: _put(p, b'{"sessions": []}\n'),
        _valid_then_truncated,
    ],
    ids=["random-bytes", "header-only", "json-text", "truncated"],
)
async def test_a_file_that_is_not_a_sound_sqlite_database_is_refused_untouched(
    db_path: Path, make: Any
) -> None:
    make(db_path)
    before = _files(db_path)
    with pytest.raises(ForeignDatabaseError, match=str(db_path)):
        await SqliteStore.open(db_path)
    assert _files(db_path) == before


@pytest.mark.parametrize(
    "setup",
    [
        ["CREATE TABLE x (id INTEGER)"],
        ["PRAGMA user_version = 3"],
        ["PRAGMA application_id = 42", "CREATE TABLE sessions (id TEXT)"],
    ],
    ids=["other-tables", "other-user-version", "other-application-id"],
)
async def test_another_programs_sqlite_database_is_refused_untouched(db_path: Path, setup: list[str]) -> None:
    _put(db_path, b"")
    for statement in setup:
        _pragma(db_path, statement)
    before = _files(db_path)
    with pytest.raises(ForeignDatabaseError, match="another program"):
        await SqliteStore.open(db_path)
    assert _files(db_path) == before


async def test_pending_migrations_run_at_open(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with await SqliteStore.open(db_path) as store:
        written = await store.create_session(full_session())

    def user_id_column(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE sessions ADD COLUMN user_id TEXT NOT NULL DEFAULT ''")
        conn.execute("UPDATE sessions SET user_id = json_extract(record, '$.user_id')")

    current = _schema.schema_version()
    monkeypatch.setattr(_schema, "MIGRATIONS", (*_schema.MIGRATIONS, user_id_column))
    async with await SqliteStore.open(db_path) as store:
        assert await store.get_session(tenant_id="acme", session_id="s1") == written
    assert _pragma(db_path, "PRAGMA user_version") == current + 1
    assert _pragma(db_path, "SELECT user_id FROM sessions") == "u-1"


async def test_a_failing_migration_leaves_the_file_as_it_was(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await SqliteStore.open(db_path) as store:
        written = await store.create_session(full_session())

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (id INTEGER)")
        raise RuntimeError("migration bug")

    with monkeypatch.context() as patch:
        patch.setattr(_schema, "MIGRATIONS", (*_schema.MIGRATIONS, broken))
        with pytest.raises(RuntimeError, match="migration bug"):
            await SqliteStore.open(db_path)
    assert _pragma(db_path, "PRAGMA user_version") == _schema.schema_version()
    assert _pragma(db_path, "SELECT count(*) FROM sqlite_master WHERE name = 'half_done'") == 0
    async with await SqliteStore.open(db_path) as store:
        assert await store.get_session(tenant_id="acme", session_id="s1") == written


async def test_the_store_is_usable_between_connect_and_close(db_path: Path) -> None:
    store = SqliteStore(db_path)
    assert _files(db_path) == {}  # constructing opens nothing
    with pytest.raises(RuntimeError, match="connect"):
        await store.get_session(tenant_id="acme", session_id="s1")
    await asyncio.gather(store.connect(), store.connect())
    await store.connect()
    try:
        assert await store.create_session(full_session())
    finally:
        await store.close()
    with pytest.raises(RuntimeError, match="not open"):
        await store.get_session(tenant_id="acme", session_id="s1")
    await store.close()


# Helpers


def _status() -> StatusChanged:
    return StatusChanged(SessionStatus.ACTIVE, SessionStatus.PAUSED)


def _pending(request_id: str) -> InputRequest:
    return InputRequest("acme", request_id, "s1", "m1", InputKind.TOOL_APPROVAL, T0, T0 + 600)


async def _resolve(store: SqliteStore, read: InputRequest, who: str) -> InputRequest:
    resolution = Resolution(decision=Decision.APPROVE, resolved_by=who, resolved_at=T0 + 1)
    return await store.update_input(replace(read, state=InputState.RESOLVED, resolution=resolution))


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _files(path: Path) -> dict[str, bytes]:
    """The database file and its companions (journal, WAL, shared memory) that exist, by name."""
    return {p.name: p.read_bytes() for p in path.parent.glob(f"{path.name}*")} if path.parent.exists() else {}


def _pragma(path: Path, sql: str) -> Any:
    """Run one statement on the file outside the store; the first column of its first row."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        row = conn.execute(sql).fetchone()
        return None if row is None else row[0]
    finally:
        conn.close()


async def test_records_written_by_the_json_module_with_nan_still_read(db_path: Path) -> None:
    # Before orjson, records were written with json.dumps, which writes NaN for a float NaN.
    async with await SqliteStore.open(db_path) as store:
        created = await store.create_input(replace(_pending("in-1"), tool_call=ToolCall("t", {"x": 1.5})))
    with sqlite3.connect(db_path) as conn:
        (record,) = conn.execute("SELECT record FROM inputs WHERE request_id = 'in-1'").fetchone()
        conn.execute(
            "UPDATE inputs SET record = ? WHERE request_id = 'in-1'", (record.replace("1.5", "NaN"),)
        )
    async with await SqliteStore.open(db_path) as store:
        read = await store.get_input(tenant_id="acme", request_id="in-1")
        assert read is not None and read.tool_call is not None
        assert math.isnan(read.tool_call.arguments["x"])
        assert replace(read, tool_call=created.tool_call) == created


_STATUS_PAGE_SQL = (
    "SELECT record FROM sessions WHERE tenant_id = 'acme' AND status = 'active' "
    "AND (created_at, session_id) < (1.0, 's') ORDER BY created_at DESC, session_id DESC LIMIT 51"
)


async def test_a_file_of_the_first_schema_is_migrated_and_keeps_its_records(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(_schema, "MIGRATIONS", _schema.MIGRATIONS[:1])  # as the first release wrote it
        async with await SqliteStore.open(db_path) as store:
            written = await store.create_session(full_session())
    assert _pragma(db_path, "PRAGMA user_version") == 1
    async with await SqliteStore.open(db_path) as store:
        assert await store.get_session(tenant_id="acme", session_id="s1") == written
        await store.put_adapter_value("slack", "post/acme/r1", {"channel": "C1", "ts": "1.0"})
        assert await store.get_adapter_value("slack", "post/acme/r1") == {"channel": "C1", "ts": "1.0"}
    assert _pragma(db_path, "PRAGMA user_version") == _schema.schema_version() == 6
    # v3: the retention sweep finds closed sessions by an index, not a scan of every session.
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        plan = " ".join(str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {_CLOSED_SQL}"))
    assert "sessions_closed" in plan
    # v4: a page of one status is read in order from an index, never sorted from all rows.
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        plan = " ".join(str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {_STATUS_PAGE_SQL}"))
    assert "sessions_by_status" in plan and "TEMP B-TREE" not in plan
    # v5: a value written before v5 belongs to no session; one written after may, and goes with it.
    async with await SqliteStore.open(db_path) as store:
        await store.put_adapter_value("a2a", "task/s1", {"n": 1}, session=("acme", "s1"))
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        rows = sorted(conn.execute("SELECT adapter, tenant_id, session_id FROM adapter_values"))
    assert rows == [("a2a", "acme", "s1"), ("slack", "", "")]


_CLOSED_SQL = (
    "SELECT tenant_id, session_id FROM sessions WHERE status = 'closed' "
    "AND json_extract(record, '$.closed_at') < 1 LIMIT 10"
)
