"""SessionService against a real server: lifecycle, agents, tenancy, idle TTL and watching."""

from __future__ import annotations

import asyncio
import base64
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from svantic_grpc.connected_agent import ConnectedAgent
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.events import AgentLeft
from svantic_grpc.pb import (
    agent_types_pb2,
    event_types_pb2,
    message_service_pb2,
    message_service_pb2_grpc,
    message_types_pb2,
    registry_service_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    session_types_pb2,
)
from tests._support import SECRET, Client, code_of, error_details, rpc_error, running_server
from tests.agents_connected import RawAgent, data, raw_agent, register_connected, running_agent, send

ROLES = ("orchestrator", "executor", "planner", "chat", "critic", "learner")
WAIT = 3.0
"""Upper bound for anything a test waits on, so nothing can hang."""

ACTIVE = session_types_pb2.SESSION_STATUS_ACTIVE
CLOSED = session_types_pb2.SESSION_STATUS_CLOSED
OPENING = session_types_pb2.SESSION_STATUS_OPENING
AUTO = agent_types_pb2.JOIN_REASON_AUTO
SELF = agent_types_pb2.JOIN_REASON_SELF
INVITED = agent_types_pb2.JOIN_REASON_INVITED

Metadata = tuple[tuple[str, str], ...]


# --- helpers ---------------------------------------------------------------


async def _init(client: Client, md: Metadata | None = None, **fields: Any) -> session_types_pb2.Session:
    response = await client.sessions.InitSession(
        session_service_pb2.InitSessionRequest(**fields), metadata=md or await client.md()
    )
    return response.session


async def _get(
    client: Client, session_id: str, md: Metadata | None = None, *, include_agents: bool = False
) -> session_types_pb2.Session:
    response = await client.sessions.GetSession(
        session_service_pb2.GetSessionRequest(session_id=session_id, include_agents=include_agents),
        metadata=md or await client.md(),
    )
    return response.session


async def _close(
    client: Client, session_id: str, md: Metadata | None = None, reason: str = ""
) -> session_service_pb2.CloseSessionResponse:
    return await client.sessions.CloseSession(
        session_service_pb2.CloseSessionRequest(session_id=session_id, reason=reason),
        metadata=md or await client.md(),
    )


async def _register(
    client: Client, instance_id: str, agent_type: str = "worker", md: Metadata | None = None, **fields: Any
) -> agent_types_pb2.Agent:
    if "deployment_mode" not in fields and "url" not in fields:
        fields["url"] = "http://127.0.0.1:4100"
    response = await client.registry.RegisterAgent(
        registry_service_pb2.RegisterAgentRequest(agent_type=agent_type, instance_id=instance_id, **fields),
        metadata=md or await client.md(),
    )
    return response.agent


async def _heartbeat(client: Client, instance_id: str, status: int) -> None:
    await client.registry.Heartbeat(
        registry_service_pb2.HeartbeatRequest(instance_id=instance_id, status=status),  # type: ignore[arg-type]
        metadata=await client.md(),
    )


async def _agent(client: Client, instance_id: str, md: Metadata | None = None) -> agent_types_pb2.Agent:
    response = await client.registry.GetAgent(
        registry_service_pb2.GetAgentRequest(instance_id=instance_id), metadata=md or await client.md()
    )
    return response.agent


async def _invite(
    client: Client,
    session_id: str,
    agent_type: str = "worker",
    instance_id: str = "",
    md: Metadata | None = None,
) -> session_types_pb2.SessionAgent:
    response = await client.sessions.InviteAgent(
        session_service_pb2.InviteAgentRequest(
            session_id=session_id, agent_type=agent_type, instance_id=instance_id
        ),
        metadata=md or await client.md(),
    )
    assert response.session_id == session_id
    return response.agent


async def _agents(
    client: Client, session_id: str, *, include_departed: bool = False, md: Metadata | None = None
) -> list[session_types_pb2.SessionAgent]:
    response = await client.sessions.ListSessionAgents(
        session_service_pb2.ListSessionAgentsRequest(
            session_id=session_id, include_departed=include_departed
        ),
        metadata=md or await client.md(),
    )
    assert response.session_id == session_id
    return list(response.agents)


async def _list(
    client: Client, md: Metadata | None = None, **fields: Any
) -> session_service_pb2.ListSessionsResponse:
    return await client.sessions.ListSessions(
        session_service_pb2.ListSessionsRequest(**fields), metadata=md or await client.md()
    )


def _error_info(excinfo: object) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo (reason and metadata) of a failed call."""
    error = rpc_error(excinfo)
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw, f"no rich status details on {error.code()}: {error.details()}"
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status details")


def _secs(ts: timestamp_pb2.Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


def _kind(event: event_types_pb2.SessionEvent) -> str:
    return event.WhichOneof("event") or ""


@asynccontextmanager
async def _watching(
    client: Client,
    session_id: str,
    *,
    after_sequence: int = 0,
    md: Metadata | None = None,
    stub: session_service_pb2_grpc.SessionServiceStub | None = None,
) -> AsyncIterator[Any]:
    """A WatchSession call, cancelled on exit whatever happened."""
    call = (stub or client.sessions).WatchSession(
        session_service_pb2.WatchSessionRequest(session_id=session_id, after_sequence=after_sequence),
        metadata=md or await client.md(),
    )
    try:
        yield call
    finally:
        call.cancel()


async def _next(call: Any) -> event_types_pb2.SessionEvent:
    response = await asyncio.wait_for(call.read(), WAIT)
    assert response is not aio.EOF, "the watch stream ended early"
    return response.event


async def _take(call: Any, n: int) -> list[event_types_pb2.SessionEvent]:
    return [await _next(call) for _ in range(n)]


async def _read_to_end(call: Any) -> list[event_types_pb2.SessionEvent]:
    """Every event until the server ends the stream (bounded by WAIT)."""
    events = []
    async with asyncio.timeout(WAIT):
        while (response := await call.read()) is not aio.EOF:
            events.append(response.event)
    assert await call.code() == grpc.StatusCode.OK
    return events


async def _read_until_error(call: Any) -> tuple[list[event_types_pb2.SessionEvent], aio.AioRpcError]:
    """Every event until the stream fails; returns them and the error."""
    events = []
    async with asyncio.timeout(WAIT):
        try:
            while (response := await call.read()) is not aio.EOF:
                events.append(response.event)
        except aio.AioRpcError as error:
            return events, error
    raise AssertionError(f"the stream ended without an error after {len(events)} events")


async def _watch_all(client: Client, session_id: str, **kwargs: Any) -> list[event_types_pb2.SessionEvent]:
    async with _watching(client, session_id, **kwargs) as call:
        return await _read_to_end(call)


async def _rejects(
    call: Awaitable[object], code: grpc.StatusCode, reason: str | None = None, field: str | None = None
) -> pytest.ExceptionInfo[aio.AioRpcError]:
    with pytest.raises(aio.AioRpcError) as excinfo:
        await call
    assert code_of(excinfo) == code, excinfo.value.details()
    if reason is not None or field is not None:
        got_reason, got_field = error_details(excinfo)
        if reason is not None:
            assert got_reason == reason, excinfo.value.details()
        if field is not None:
            assert got_field == field, excinfo.value.details()
    return excinfo


# --- InitSession -------------------------------------------------------------


async def test_init_generates_an_id_and_creates_the_six_internal_agents(client: Client) -> None:
    session = await _init(client)
    other = await _init(client)
    assert session.session_id
    assert other.session_id != session.session_id
    assert session.status == ACTIVE
    assert session.created_by == "acme-full"
    assert session.creator_agent_type == "a2ui-terminal"
    assert session.HasField("created_at")
    sid = session.session_id
    assert [(a.agent_type, a.instance_id) for a in session.agents] == [
        (f"savant:{role}", f"{role}-{sid}") for role in ROLES
    ]
    for agent in session.agents:
        assert agent.join_reason == AUTO
        assert agent.internal
        assert agent.HasField("joined_at")
        assert _secs(agent.joined_at) == pytest.approx(_secs(session.created_at))
        assert not agent.HasField("left_at")
    got = await _get(client, sid)
    assert got.session_id == sid
    assert got.status == ACTIVE


async def test_the_services_are_served_by_their_generic_handlers_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No service is also registered as grpc "registered methods": grpc.aio then waits, for every
    call it accepts, on an outstanding request per registered method (a cost on every RPC)."""
    from grpc.aio import _server

    registered: list[str] = []
    monkeypatch.setattr(
        _server.Server,
        "add_registered_method_handlers",
        lambda self, service_name, method_handlers: registered.append(service_name),
    )
    async with running_server() as fresh:
        session = await _init(fresh)
        closed = await _close(fresh, session.session_id)
    assert closed.closed_now
    assert registered == []


async def test_init_with_a_given_id_and_user(client: Client) -> None:
    session = await _init(client, session_id="my-session-001", user_id="user-42")
    assert session.session_id == "my-session-001"
    assert session.user_id == "user-42"
    assert {a.instance_id for a in session.agents} == {f"{role}-my-session-001" for role in ROLES}
    got = await _get(client, "my-session-001")
    assert got.user_id == "user-42"


async def test_a_duplicate_id_is_already_exists_and_leaves_the_original_alone(client: Client) -> None:
    await _init(client, session_id="dup-1", user_id="first")
    await _rejects(_init(client, session_id="dup-1", user_id="second"), grpc.StatusCode.ALREADY_EXISTS)
    got = await _get(client, "dup-1", include_agents=True)
    assert got.user_id == "first"
    assert len(got.agents) == 6
    events = await _close_and_watch(client, "dup-1")
    joined = [e for e in events if _kind(e) == "agent_joined"]
    assert len(joined) == 6  # the rejected duplicate added nothing to the log


async def _close_and_watch(client: Client, session_id: str) -> list[event_types_pb2.SessionEvent]:
    await _close(client, session_id)
    return await _watch_all(client, session_id)


async def test_self_join_adds_the_creator(client: Client) -> None:
    session = await _init(client, self_agent_type="transcript-link", self_instance_id="tl-pod-1")
    assert len(session.agents) == 7
    me = session.agents[-1]
    assert (me.agent_type, me.instance_id, me.join_reason) == ("transcript-link", "tl-pod-1", SELF)
    assert not me.internal
    assert me.HasField("joined_at")
    listed = await _agents(client, session.session_id)
    assert [a.instance_id for a in listed][-1] == "tl-pod-1"


async def test_self_join_needs_both_fields(client: Client) -> None:
    for fields, missing in [
        ({"self_agent_type": "transcript-link"}, "self_instance_id"),
        ({"self_instance_id": "tl-pod-1"}, "self_agent_type"),
    ]:
        await _rejects(
            _init(client, session_id="half-self", **fields), grpc.StatusCode.INVALID_ARGUMENT, field=missing
        )
    await _rejects(_get(client, "half-self"), grpc.StatusCode.NOT_FOUND)  # nothing was created


async def test_user_id_is_bounded(client: Client) -> None:
    await _rejects(_init(client, user_id="u" * 257), grpc.StatusCode.INVALID_ARGUMENT, field="user_id")
    assert (await _init(client, user_id="u" * 256)).user_id == "u" * 256


async def test_internal_agent_types_cannot_self_join(client: Client) -> None:
    await _rejects(
        _init(client, self_agent_type="savant:chat", self_instance_id="x-1"),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="self_agent_type",
    )


async def test_a_self_join_cannot_borrow_a_registered_instance_of_another_type(client: Client) -> None:
    # found from outside: a self-join as a made-up type with a registered 'victim' instance's id made
    # work routed to the made-up type run on that instance, past the plan policy on 'victim'
    await client.registry.RegisterAgent(
        registry_service_pb2.RegisterAgentRequest(
            agent_type="victim", instance_id="v1", deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_CONNECTED
        ),
        metadata=await client.md(),
    )
    await _rejects(
        _init(client, self_agent_type="other", self_instance_id="v1"),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="self_instance_id",
    )
    assert (await _init(client, self_agent_type="victim", self_instance_id="v1")).session_id  # its own type
    await _rejects(
        _init(client, session_id="s-own", self_agent_type="other", self_instance_id="chat-s-own"),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="self_instance_id",
    )
    # Registered only after the self-join: work for the made-up type still never runs on it.
    early = await _init(client, self_agent_type="other", self_instance_id="v2")
    ran: list[str] = []

    async def victim(dispatch: Any, reply: Any) -> None:
        ran.append(dispatch.text)
        await reply.complete()

    async with running_agent(client, victim, agent_type="victim", instance_id="v2"):
        sent = await send(client, early.session_id, "step", data({"target_agent": "other"}))
        assert sent.state == message_types_pb2.MESSAGE_STATE_FAILED, sent.state_reason
        assert ran == []


async def test_a_bad_session_id_is_invalid_argument(client: Client) -> None:
    for session_id in [
        "has space",
        "-starts-with-dash",
        "x" * 129,
        "semi;colon",
        "tab\there",
        "ünïcode",
        "s-1\n",
    ]:
        await _rejects(
            _init(client, session_id=session_id), grpc.StatusCode.INVALID_ARGUMENT, field="session_id"
        )
    assert (await _list(client)).sessions == []
    assert (await _init(client, session_id="x" * 128)).session_id == "x" * 128  # the longest allowed


async def test_expires_at_is_last_activity_plus_ttl(clock: ManualClock) -> None:
    async with running_server(clock=clock, session_ttl_ms=60_000) as client:
        session = await _init(client)
        assert _secs(session.created_at) == clock.now()
        assert _secs(session.last_activity_at) == clock.now()
        assert _secs(session.expires_at) == clock.now() + 60
        clock.advance(10)
        got = await _get(client, session.session_id)
        assert _secs(got.expires_at) == _secs(got.last_activity_at) + 60 == _secs(session.expires_at)


async def test_default_ttl_is_thirty_minutes(client: Client) -> None:
    session = await _init(client)
    assert _secs(session.expires_at) - _secs(session.last_activity_at) == pytest.approx(1800)


# --- GetSession / ListSessions ------------------------------------------------


async def test_get_session_with_and_without_agents(client: Client) -> None:
    created = await _init(client, self_agent_type="cliq", self_instance_id="cliq-1")
    bare = await _get(client, created.session_id)
    assert bare.session_id == created.session_id
    assert bare.status == ACTIVE
    assert bare.created_at == created.created_at
    assert list(bare.agents) == []
    full = await _get(client, created.session_id, include_agents=True)
    assert list(full.agents) == list(created.agents)


async def test_get_unknown_or_malformed_session(client: Client) -> None:
    await _rejects(_get(client, "no-such-session"), grpc.StatusCode.NOT_FOUND)
    await _rejects(_get(client, ""), grpc.StatusCode.INVALID_ARGUMENT, field="session_id")
    await _rejects(_get(client, "bad id"), grpc.StatusCode.INVALID_ARGUMENT, field="session_id")


async def test_list_sessions_pages_newest_first(clock: ManualClock) -> None:
    async with running_server(clock=clock) as client:
        created = []
        for i in range(5):
            created.append((await _init(client, session_id=f"page-{i}")).session_id)
            clock.advance(1)
        seen: list[str] = []
        sizes = []
        token = ""
        for _ in range(10):
            page = await _list(client, page_size=2, page_token=token)
            sizes.append(len(page.sessions))
            seen.extend(s.session_id for s in page.sessions)
            assert all(not s.agents for s in page.sessions)
            token = page.next_page_token
            if not token:
                break
        assert sizes == [2, 2, 1]
        assert seen == list(reversed(created))  # each exactly once, newest first


async def test_a_page_token_only_serves_the_list_that_gave_it(client: Client) -> None:
    """A kept page token sent with other filters, to another list or by another tenant is refused
    naming ``page_token`` (AIP-158), instead of being taken as a position in the other list."""
    for i in range(3):
        await _init(client, session_id=f"bound-{i}")
    globex = await client.md("globex-full")
    for i in range(3):
        await _init(client, globex, session_id=f"bound-g-{i}")
    first = await _list(client, page_size=1, statuses=[ACTIVE])
    token = first.next_page_token
    assert token
    # The same request goes on from where the page ended.
    second = await _list(client, page_size=1, statuses=[ACTIVE], page_token=token)
    assert second.sessions[0].session_id != first.sessions[0].session_id
    for other in (
        _list(client, page_size=1, statuses=[CLOSED], page_token=token),
        _list(client, page_size=1, page_token=token),
        _list(client, globex, page_size=1, statuses=[ACTIVE], page_token=token),
        client.messages.ListMessages(
            message_service_pb2.ListMessagesRequest(page_token=token), metadata=await client.md()
        ),
        client.messages.ListPendingInputs(
            message_service_pb2.ListPendingInputsRequest(page_token=token), metadata=await client.md()
        ),
    ):
        await _rejects(other, grpc.StatusCode.INVALID_ARGUMENT, field="page_token")
    # A token of the right list whose position was made by hand is still read strictly.
    digest = token.partition(".")[0]
    for inner in (_b64(b'[true, "x"]'), _b64(b'[0, "\\ud800"]'), "", "!"):
        await _rejects(
            _list(client, page_size=1, statuses=[ACTIVE], page_token=f"{digest}.{inner}"),
            grpc.StatusCode.INVALID_ARGUMENT,
            field="page_token",
        )


async def test_list_sessions_filters_by_status(client: Client) -> None:
    a = (await _init(client, session_id="st-a")).session_id
    b = (await _init(client, session_id="st-b")).session_id
    await _close(client, a)
    closed = await _list(client, statuses=[CLOSED])
    assert [s.session_id for s in closed.sessions] == [a]
    assert closed.sessions[0].status == CLOSED
    active = await _list(client, statuses=[ACTIVE])
    assert [s.session_id for s in active.sessions] == [b]
    both = await _list(client, statuses=[ACTIVE, CLOSED])
    assert {s.session_id for s in both.sessions} == {a, b}
    everything = await _list(client)
    assert {s.session_id for s in everything.sessions} == {a, b}


async def test_list_sessions_unspecified_status_filter_means_any(client: Client) -> None:
    a = (await _init(client, session_id="any-a")).session_id
    b = (await _init(client, session_id="any-b")).session_id
    await _close(client, a)
    page = await _list(client, statuses=[session_types_pb2.SESSION_STATUS_UNSPECIFIED])
    assert {s.session_id for s in page.sessions} == {a, b}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_bad_list_requests_are_invalid_argument(client: Client) -> None:
    await _init(client)
    bad_tokens = [
        "not a token!",
        "a",
        _b64(b"{}"),
        _b64(b"[1]"),
        _b64(b'"ab"'),
        _b64(b'[null, "x"]'),
        _b64(b"\xff\xfe"),
        # found from outside: hand-made tokens of the right shape but wrong types; the last was INTERNAL
        _b64(b'[1e308, {"a": 1}]'),
        _b64(b'[NaN, "x"]'),
        _b64(b'[true, "x"]'),
        _b64(b'[0, "\\ud800"]'),
    ]
    for token in bad_tokens:
        await _rejects(_list(client, page_token=token), grpc.StatusCode.INVALID_ARGUMENT, field="page_token")
    for page_size in (501, -1):
        await _rejects(
            _list(client, page_size=page_size), grpc.StatusCode.INVALID_ARGUMENT, field="page_size"
        )
    await _rejects(_list(client, statuses=[99]), grpc.StatusCode.INVALID_ARGUMENT, field="statuses[0]")
    # The limits themselves are fine, and the server is unharmed.
    assert len((await _list(client, page_size=500)).sessions) == 1
    assert len((await _list(client)).sessions) == 1


# --- ListSessionAgents ----------------------------------------------------------


async def test_list_session_agents_present_and_departed(client: Client) -> None:
    sid = (await _init(client, self_agent_type="cliq", self_instance_id="cliq-1")).session_id
    await _register(client, "w-1")
    await _invite(client, sid, instance_id="w-1")
    present = await _agents(client, sid)
    assert [a.instance_id for a in present] == [*(f"{r}-{sid}" for r in ROLES), "cliq-1", "w-1"]

    released = await client.registry.DeregisterAgent(
        registry_service_pb2.DeregisterAgentRequest(instance_id="w-1"), metadata=await client.md()
    )
    assert list(released.released_session_ids) == [sid]

    present = await _agents(client, sid)
    assert "w-1" not in [a.instance_id for a in present]
    assert all(not a.HasField("left_at") for a in present)
    everyone = await _agents(client, sid, include_departed=True)
    assert [a.instance_id for a in everyone] == [*(f"{r}-{sid}" for r in ROLES), "cliq-1", "w-1"]
    departed = everyone[-1]
    assert departed.join_reason == INVITED
    assert departed.HasField("left_at")
    full = await _get(client, sid, include_agents=True)
    assert [a.instance_id for a in full.agents] == [a.instance_id for a in everyone]

    async with _watching(client, sid) as call:
        events = await _take(call, 10)  # 7 joined (6 internal + cliq-1), opened, w-1 joined, w-1 left
    left = [e.agent_left for e in events if _kind(e) == "agent_left"]
    assert [(x.instance_id, x.reason) for x in left] == [("w-1", "deregistered")]


async def test_list_session_agents_of_unknown_session(client: Client) -> None:
    await _rejects(_agents(client, "nope"), grpc.StatusCode.NOT_FOUND)


# --- InviteAgent -----------------------------------------------------------------


async def test_invite_a_given_instance(client: Client) -> None:
    sid = (await _init(client)).session_id
    await _register(client, "w-1")
    joined = await _invite(client, sid, instance_id="w-1")
    assert (joined.agent_type, joined.instance_id, joined.join_reason) == ("worker", "w-1", INVITED)
    assert not joined.internal
    assert joined.HasField("joined_at")
    assert sid in (await _agent(client, "w-1")).session_ids
    assert [a.instance_id for a in await _agents(client, sid)][-1] == "w-1"


async def test_invite_a_connected_agent_without_url(client: Client) -> None:
    sid = (await _init(client)).session_id
    agent = await _register(client, "laptop-1", deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_CONNECTED)
    assert agent.deployment_mode == agent_types_pb2.DEPLOYMENT_MODE_CONNECTED
    joined = await _invite(client, sid, instance_id="laptop-1")
    assert joined.join_reason == INVITED
    assert list((await _agent(client, "laptop-1")).session_ids) == [sid]


async def test_invite_without_instance_picks_the_least_loaded(client: Client) -> None:
    for name in ("w-1", "w-2", "w-3"):
        await _register(client, name)
    # w-1 and w-3 already serve other sessions; w-2 is neither the newest nor the lowest id.
    await _invite(client, (await _init(client)).session_id, instance_id="w-1")
    await _invite(client, (await _init(client)).session_id, instance_id="w-3")
    sid = (await _init(client)).session_id
    joined = await _invite(client, sid)
    assert (joined.instance_id, joined.join_reason) == ("w-2", INVITED)
    assert sid in (await _agent(client, "w-2")).session_ids


async def test_inviting_the_same_type_again_keeps_the_instance_in_the_session(client: Client) -> None:
    await _register(client, "w-1")
    sid = (await _init(client)).session_id
    first = await _invite(client, sid)
    assert first.instance_id == "w-1"
    # Now w-1 is busier than a fresh w-2, but session affinity keeps w-1.
    await _invite(client, (await _init(client)).session_id, instance_id="w-1")
    await _register(client, "w-2")
    again = await _invite(client, sid)
    assert again.instance_id == "w-1"
    assert again.joined_at == first.joined_at
    assert [a.instance_id for a in await _agents(client, sid) if a.agent_type == "worker"] == ["w-1"]
    assert sid not in (await _agent(client, "w-2")).session_ids


async def test_invite_with_no_instance_registered_is_unavailable(client: Client) -> None:
    sid = (await _init(client)).session_id
    excinfo = await _rejects(
        _invite(client, sid, agent_type="nobody-here"),
        grpc.StatusCode.UNAVAILABLE,
        reason="NO_AGENT_AVAILABLE",
    )
    assert _error_info(excinfo).metadata["agent_type"] == "nobody-here"
    assert excinfo.value.details()  # a message a person can act on


async def test_non_routable_instances_are_not_invited(client: Client) -> None:
    # One agent type per way of being unroutable; each type has only that instance.
    await _register(client, "drainer-1", agent_type="drainer")
    await _heartbeat(client, "drainer-1", agent_types_pb2.AGENT_STATUS_DRAINING)
    await _register(client, "sleeper-1", agent_type="sleeper")
    await _heartbeat(client, "sleeper-1", agent_types_pb2.AGENT_STATUS_OFFLINE)
    await _register(client, "full-1", agent_type="full", max_concurrent_sessions=1)
    await _invite(client, (await _init(client)).session_id, agent_type="full", instance_id="full-1")
    await _register(client, "swamped-1", agent_type="swamped")
    await _heartbeat(client, "swamped-1", agent_types_pb2.AGENT_STATUS_BUSY)
    await _register(client, "sick-1", agent_type="sick")
    await _heartbeat(client, "sick-1", agent_types_pb2.AGENT_STATUS_UNHEALTHY)
    # At capacity by its own count (sessions it serves elsewhere), not by this mesh's bindings.
    await _register(client, "elsewhere-1", agent_type="elsewhere", max_concurrent_sessions=2)
    await client.registry.Heartbeat(
        registry_service_pb2.HeartbeatRequest(instance_id="elsewhere-1", current_sessions=2),
        metadata=await client.md(),
    )
    expected = {
        "drainer-1": agent_types_pb2.AGENT_STATUS_DRAINING,
        "sleeper-1": agent_types_pb2.AGENT_STATUS_OFFLINE,
        "full-1": agent_types_pb2.AGENT_STATUS_BUSY,
        "swamped-1": agent_types_pb2.AGENT_STATUS_BUSY,
        "sick-1": agent_types_pb2.AGENT_STATUS_UNHEALTHY,
        "elsewhere-1": agent_types_pb2.AGENT_STATUS_BUSY,
    }
    sid = (await _init(client)).session_id
    for instance_id, status in expected.items():
        agent = await _agent(client, instance_id)
        assert agent.status == status, instance_id
        await _rejects(
            _invite(client, sid, agent_type=agent.agent_type),
            grpc.StatusCode.UNAVAILABLE,
            reason="NO_AGENT_AVAILABLE",
        )
        excinfo = await _rejects(
            _invite(client, sid, agent_type=agent.agent_type, instance_id=instance_id),
            grpc.StatusCode.UNAVAILABLE,
            reason="AGENT_NOT_ROUTABLE",
        )
        assert _error_info(excinfo).metadata["instance_id"] == instance_id
        assert sid not in (await _agent(client, instance_id)).session_ids
    assert len(await _agents(client, sid)) == 6  # nobody joined


async def test_the_load_an_instance_reports_counts_when_picking(client: Client) -> None:
    await _register(client, "w-1")
    await _register(client, "w-2")
    await client.registry.Heartbeat(
        registry_service_pb2.HeartbeatRequest(instance_id="w-2", current_sessions=5),
        metadata=await client.md(),
    )
    await _invite(client, (await _init(client)).session_id, instance_id="w-1")
    # w-1 serves one session here; w-2 says it serves five (elsewhere): w-1 is less loaded.
    sid = (await _init(client)).session_id
    assert (await _invite(client, sid)).instance_id == "w-1"


async def test_a_busy_instance_is_skipped_for_an_available_one(client: Client) -> None:
    await _register(client, "w-1", max_concurrent_sessions=1)
    await _register(client, "w-2")
    await _heartbeat(client, "w-2", agent_types_pb2.AGENT_STATUS_DRAINING)
    await _invite(client, (await _init(client)).session_id, instance_id="w-1")
    await _register(client, "w-3")
    await _invite(client, (await _init(client)).session_id, instance_id="w-3")
    await _invite(client, (await _init(client)).session_id, instance_id="w-3")
    # w-1 is at capacity and w-2 draining, so the busier but available w-3 is picked.
    sid = (await _init(client)).session_id
    assert (await _invite(client, sid)).instance_id == "w-3"


async def test_an_instance_that_stopped_heartbeating_is_not_invited(clock: ManualClock) -> None:
    async with running_server(clock=clock) as client:
        await _register(client, "w-1")
        sid = (await _init(client)).session_id
        clock.advance(91)  # default heartbeat timeout is 90 s
        assert (await _agent(client, "w-1")).status == agent_types_pb2.AGENT_STATUS_UNHEALTHY
        await _rejects(_invite(client, sid), grpc.StatusCode.UNAVAILABLE, reason="NO_AGENT_AVAILABLE")
        await _rejects(
            _invite(client, sid, instance_id="w-1"), grpc.StatusCode.UNAVAILABLE, reason="AGENT_NOT_ROUTABLE"
        )


async def test_invite_an_unknown_instance_is_not_found(client: Client) -> None:
    sid = (await _init(client)).session_id
    await _rejects(_invite(client, sid, instance_id="ghost-1"), grpc.StatusCode.NOT_FOUND)


async def test_invite_with_the_wrong_agent_type_is_invalid_argument(client: Client) -> None:
    sid = (await _init(client)).session_id
    await _register(client, "w-1", agent_type="worker")
    await _rejects(
        _invite(client, sid, agent_type="reviewer", instance_id="w-1"),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="agent_type",
    )
    assert list((await _agent(client, "w-1")).session_ids) == []
    await _invite(client, sid, agent_type="worker", instance_id="w-1")
    # Once in the session as a worker, asking for it as something else is still refused.
    await _rejects(
        _invite(client, sid, agent_type="reviewer", instance_id="w-1"),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="agent_type",
    )


async def test_invite_into_a_closed_session_is_failed_precondition(client: Client) -> None:
    sid = (await _init(client)).session_id
    await _register(client, "w-1")
    await _close(client, sid)
    await _rejects(_invite(client, sid, instance_id="w-1"), grpc.StatusCode.FAILED_PRECONDITION)
    await _rejects(_invite(client, sid), grpc.StatusCode.FAILED_PRECONDITION)
    assert list((await _agent(client, "w-1")).session_ids) == []


async def test_invite_checks_its_arguments(client: Client) -> None:
    sid = (await _init(client)).session_id
    await _rejects(_invite(client, sid, agent_type=""), grpc.StatusCode.INVALID_ARGUMENT, field="agent_type")
    await _rejects(
        _invite(client, sid, instance_id="bad id"), grpc.StatusCode.INVALID_ARGUMENT, field="instance_id"
    )
    await _rejects(_invite(client, "no-such-session"), grpc.StatusCode.NOT_FOUND)


async def test_read_scope_cannot_change_sessions(client: Client) -> None:
    sid = (await _init(client)).session_id
    await _register(client, "w-1")
    read = await client.md("acme-read")
    await _rejects(_init(client, read), grpc.StatusCode.PERMISSION_DENIED)
    await _rejects(_invite(client, sid, instance_id="w-1", md=read), grpc.StatusCode.PERMISSION_DENIED)
    # ... but it can look.
    assert (await _get(client, sid, read)).status == ACTIVE
    assert len(await _agents(client, sid, md=read)) == 6
    assert [s.session_id for s in (await _list(client, read)).sessions] == [sid]
    async with _watching(client, sid, md=read) as call:
        assert (await _next(call)).sequence == 1


# --- CloseSession ------------------------------------------------------------


async def test_close_session(client: Client) -> None:
    sid = (await _init(client)).session_id
    response = await _close(client, sid)
    assert response.closed_now
    closed = response.session
    assert closed.status == CLOSED
    assert closed.close_reason == "closed by acme-full"
    assert closed.HasField("closed_at")
    assert not closed.HasField("expires_at")
    assert list(closed.agents) == []  # none present any more
    got = await _get(client, sid)
    assert got.status == CLOSED
    assert got.closed_at == closed.closed_at
    assert await _agents(client, sid) == []
    # Those that left are still there for who asks: each with when it left, the close.
    departed = (await _get(client, sid, include_agents=True)).agents
    assert len(departed) == 6
    assert all(a.left_at == closed.closed_at for a in departed)


async def test_close_with_a_reason_and_closing_twice_is_harmless(client: Client) -> None:
    sid = (await _init(client)).session_id
    first = await _close(client, sid, reason="work done")
    assert first.closed_now
    assert first.session.close_reason == "work done"
    second = await _close(client, sid, reason="again")
    assert not second.closed_now
    assert second.session.status == CLOSED
    assert second.session.closed_at == first.session.closed_at
    assert second.session.close_reason == "work done"
    events = await _watch_all(client, sid)
    assert (
        sum(1 for e in events if _kind(e) == "status_changed" and e.status_changed.to_status == CLOSED) == 1
    )


async def test_close_releases_remote_agents(client: Client) -> None:
    for name in ("w-1", "w-2"):
        await _register(client, name)
    sid = (await _init(client, self_agent_type="cliq", self_instance_id="cliq-1")).session_id
    other = (await _init(client)).session_id
    await _invite(client, sid, instance_id="w-1")
    await _invite(client, sid, instance_id="w-2")
    await _invite(client, other, instance_id="w-1")
    await _close(client, sid)
    assert list((await _agent(client, "w-1")).session_ids) == [other]
    assert list((await _agent(client, "w-2")).session_ids) == []
    # Released instances can serve again at once.
    fresh = (await _init(client)).session_id
    assert (await _invite(client, fresh, instance_id="w-2")).join_reason == INVITED


async def test_close_publishes_agent_left_for_everyone_then_closed(client: Client) -> None:
    await _register(client, "w-1")
    sid = (await _init(client, self_agent_type="cliq", self_instance_id="cliq-1")).session_id
    await _invite(client, sid, instance_id="w-1")
    everyone = {a.instance_id for a in await _agents(client, sid)}
    assert len(everyone) == 8
    async with _watching(client, sid) as call:
        replayed = await _take(call, 9)  # 6 internal + cliq joined, opened, w-1 joined
        assert replayed[-1].agent_joined.agent.instance_id == "w-1"
        await _close(client, sid, reason="bye")
        tail = await _read_to_end(call)
    left = [e.agent_left for e in tail if _kind(e) == "agent_left"]
    assert {x.instance_id for x in left} == everyone
    assert len(left) == len(everyone)
    assert all(x.reason for x in left)
    last = tail[-1]
    assert _kind(last) == "status_changed"
    assert (last.status_changed.from_status, last.status_changed.to_status) == (ACTIVE, CLOSED)
    assert last.status_changed.reason == "bye"
    assert [e.sequence for e in tail] == list(range(10, 10 + len(tail)))


async def test_close_checks_its_arguments(client: Client) -> None:
    await _rejects(_close(client, "never-was"), grpc.StatusCode.NOT_FOUND)
    await _rejects(_close(client, "bad id"), grpc.StatusCode.INVALID_ARGUMENT, field="session_id")
    sid = (await _init(client)).session_id
    await _rejects(_close(client, sid, reason="x" * 1025), grpc.StatusCode.INVALID_ARGUMENT, field="reason")
    assert (await _get(client, sid)).status == ACTIVE


# --- tenancy -------------------------------------------------------------------


async def test_another_tenant_cannot_see_or_touch_a_session(client: Client) -> None:
    sid = (await _init(client, session_id="acme-private")).session_id
    await _register(client, "w-1")
    globex = await client.md("globex-full")
    await _register(client, "g-1", md=globex)
    await _rejects(_get(client, sid, globex), grpc.StatusCode.NOT_FOUND)
    await _rejects(_invite(client, sid, instance_id="g-1", md=globex), grpc.StatusCode.NOT_FOUND)
    await _rejects(_invite(client, sid, md=globex), grpc.StatusCode.NOT_FOUND)
    await _rejects(_close(client, sid, globex), grpc.StatusCode.NOT_FOUND)
    await _rejects(_agents(client, sid, md=globex), grpc.StatusCode.NOT_FOUND)
    async with _watching(client, sid, md=globex) as call:
        await _rejects(_read_to_end(call), grpc.StatusCode.NOT_FOUND)
    assert [s.session_id for s in (await _list(client, globex)).sessions] == []
    # The same answer as for a session that does not exist at all.
    with pytest.raises(aio.AioRpcError) as missing:
        await _get(client, "does-not-exist", globex)
    with pytest.raises(aio.AioRpcError) as foreign:
        await _get(client, sid, globex)
    assert error_details(missing)[0] == error_details(foreign)[0]
    # Nothing happened to it.
    session = await _get(client, sid, include_agents=True)
    assert session.status == ACTIVE
    assert len(session.agents) == 6
    assert list((await _agent(client, "g-1", globex)).session_ids) == []


async def test_session_ids_are_per_tenant(client: Client) -> None:
    globex = await client.md("globex-full")
    acme_session = await _init(client, session_id="shared-id", user_id="acme-user")
    globex_session = await _init(client, globex, session_id="shared-id", user_id="globex-user")
    assert globex_session.session_id == acme_session.session_id == "shared-id"
    assert (await _get(client, "shared-id")).user_id == "acme-user"
    assert (await _get(client, "shared-id", globex)).created_by == "globex-full"
    await _close(client, "shared-id", globex)
    assert (await _get(client, "shared-id")).status == ACTIVE
    globex_events = await _watch_all(client, "shared-id", md=globex)
    assert [e.sequence for e in globex_events] == list(range(1, len(globex_events) + 1))
    async with _watching(client, "shared-id") as call:
        acme_events = await _take(call, 7)
        assert acme_events[-1].status_changed.to_status == ACTIVE
        with pytest.raises(TimeoutError):  # globex's close did not leak into acme's log
            await asyncio.wait_for(call.read(), 0.1)


async def test_another_tenants_agent_cannot_be_invited(client: Client) -> None:
    await _register(client, "acme-w-1", agent_type="worker")
    globex = await client.md("globex-full")
    sid = (await _init(client, globex)).session_id
    await _rejects(_invite(client, sid, instance_id="acme-w-1", md=globex), grpc.StatusCode.NOT_FOUND)
    await _rejects(
        _invite(client, sid, agent_type="worker", md=globex),
        grpc.StatusCode.UNAVAILABLE,
        reason="NO_AGENT_AVAILABLE",
    )
    assert list((await _agent(client, "acme-w-1")).session_ids) == []


# --- idle TTL ------------------------------------------------------------------


async def test_an_idle_session_closes_at_its_deadline(clock: ManualClock) -> None:
    async with running_server(clock=clock, session_ttl_ms=60_000) as client:
        reaper = client.server.mesh.sessions.reaper
        sid = (await _init(client)).session_id
        clock.advance(59)
        await reaper.run_once()
        assert (await _get(client, sid)).status == ACTIVE
        clock.advance(2)
        await reaper.run_once()
        session = await _get(client, sid, include_agents=True)
        assert session.status == CLOSED
        assert session.close_reason == "idle ttl"
        assert not session.HasField("expires_at")
        assert all(a.HasField("left_at") for a in session.agents)
        events = await _watch_all(client, sid)
        assert sum(1 for e in events if _kind(e) == "agent_left") == 6
        assert _kind(events[-1]) == "status_changed"
        assert events[-1].status_changed.to_status == CLOSED
        assert events[-1].status_changed.reason == "idle ttl"


async def test_idle_ttl_close_releases_remote_agents(clock: ManualClock) -> None:
    async with running_server(clock=clock, session_ttl_ms=60_000) as client:
        await _register(client, "w-1")
        sid = (await _init(client)).session_id
        await _invite(client, sid, instance_id="w-1")
        clock.advance(61)
        await client.server.mesh.sessions.reaper.run_once()
        assert (await _get(client, sid)).status == CLOSED
        assert list((await _agent(client, "w-1")).session_ids) == []


async def test_activity_pushes_the_deadline_back(clock: ManualClock) -> None:
    async with running_server(clock=clock, session_ttl_ms=60_000) as client:
        reaper = client.server.mesh.sessions.reaper
        start = clock.now()
        sid = (await _init(client)).session_id
        clock.advance(50)
        await _register(client, "w-1")
        await _invite(client, sid, instance_id="w-1")
        clock.advance(11)  # past the first deadline (start + 60)
        await reaper.run_once()
        session = await _get(client, sid)
        assert session.status == ACTIVE
        assert _secs(session.last_activity_at) == start + 50
        assert _secs(session.expires_at) == start + 110
        clock.advance(48)  # start + 109
        await reaper.run_once()
        assert (await _get(client, sid)).status == ACTIVE
        clock.advance(2)  # start + 111
        await reaper.run_once()
        session = await _get(client, sid)
        assert session.status == CLOSED
        assert session.close_reason == "idle ttl"


async def test_ttl_zero_never_closes(clock: ManualClock) -> None:
    async with running_server(clock=clock, session_ttl_ms=0) as client:
        session = await _init(client)
        assert not session.HasField("expires_at")
        clock.advance(80_000)  # most of a day (tokens last one)
        assert await client.server.mesh.sessions.reaper.run_once() == 0
        got = await _get(client, session.session_id)
        assert got.status == ACTIVE
        assert not got.HasField("expires_at")


async def test_the_background_reaper_closes_idle_sessions_by_itself() -> None:
    async with running_server(session_ttl_ms=200) as client:
        sid = (await _init(client)).session_id
        deadline = time.monotonic() + WAIT
        session = await _get(client, sid)
        while session.status != CLOSED and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            session = await _get(client, sid)
        assert session.status == CLOSED
        assert session.close_reason == "idle ttl"


async def test_the_reaper_does_not_look_at_sessions_that_are_not_due(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_server(clock=clock, session_ttl_ms=60_000) as client:
        reaper = client.server.mesh.sessions.reaper
        store = client.server.mesh.store
        md = await client.md()
        due = (await _init(client, md, session_id="due-first")).session_id
        clock.advance(30)
        # Many idle sessions, made in-process (the RPC path is covered above; this is about the reaper).
        caller = client.server.mesh.tokens.verify(await client.token())
        idle = [await client.server.mesh.sessions.init(caller) for _ in range(200)]
        looked_at: list[str] = []
        original = store.get_session

        async def counting(*, tenant_id: str, session_id: str) -> Any:
            looked_at.append(session_id)
            return await original(tenant_id=tenant_id, session_id=session_id)

        monkeypatch.setattr(store, "get_session", counting)
        clock.advance(10)  # nobody is due
        assert await reaper.run_once() == 0
        assert looked_at == []
        clock.advance(21)  # only the first session is due
        assert await reaper.run_once() == 1
        assert set(looked_at) == {due}
        monkeypatch.setattr(store, "get_session", original)

        assert (await _get(client, due, md)).status == CLOSED
        clock.advance(30)  # now the 200 are due too
        assert await reaper.run_once() == 200
        closed = await _list(client, md, statuses=[CLOSED], page_size=500)
        assert {s.session_id for s in closed.sessions} == {due} | {s.session_id for s in idle}
        assert all(s.close_reason == "idle ttl" for s in closed.sessions)


# --- WatchSession ------------------------------------------------------------------


async def test_watch_replays_the_opening_with_gapless_sequences(client: Client) -> None:
    sid = (await _init(client)).session_id
    async with _watching(client, sid) as call:
        events = await _take(call, 7)
    assert [e.sequence for e in events] == list(range(1, 8))
    assert all(e.session_id == sid and e.HasField("time") for e in events)
    assert [_kind(e) for e in events] == ["agent_joined"] * 6 + ["status_changed"]
    assert [e.agent_joined.agent.agent_type for e in events[:6]] == [f"savant:{r}" for r in ROLES]
    assert all(e.agent_joined.agent.join_reason == AUTO for e in events[:6])
    opened = events[6].status_changed
    assert (opened.from_status, opened.to_status) == (OPENING, ACTIVE)


async def test_live_events_follow_the_replay(client: Client) -> None:
    sid = (await _init(client)).session_id
    await _register(client, "w-1")
    async with _watching(client, sid) as call:
        assert [e.sequence for e in await _take(call, 7)] == list(range(1, 8))
        await _invite(client, sid, instance_id="w-1")
        live = await _next(call)
    assert live.sequence == 8
    assert _kind(live) == "agent_joined"
    assert (live.agent_joined.agent.instance_id, live.agent_joined.agent.join_reason) == ("w-1", INVITED)


async def test_resume_after_a_sequence_yields_exactly_the_rest(client: Client) -> None:
    await _register(client, "w-1")
    sid = (await _init(client)).session_id
    await _invite(client, sid, instance_id="w-1")
    await _close(client, sid)
    everything = await _watch_all(client, sid)
    total = len(everything)
    assert total == 7 + 1 + 7 + 1  # opening, w-1 joined, 7 left, closed
    assert [e.sequence for e in everything] == list(range(1, total + 1))
    for after in (0, 3, 7, 8, 9, total - 1, total, 100):
        rest = await _watch_all(client, sid, after_sequence=after)
        assert rest == everything[after:], after


async def test_resume_on_an_open_session_then_continue_live(client: Client) -> None:
    await _register(client, "w-1")
    sid = (await _init(client)).session_id
    async with _watching(client, sid, after_sequence=5) as call:
        assert [e.sequence for e in await _take(call, 2)] == [6, 7]
        await _invite(client, sid, instance_id="w-1")
        assert (await _next(call)).sequence == 8


async def test_the_stream_ends_when_the_session_closes(client: Client) -> None:
    sid = (await _init(client)).session_id
    async with _watching(client, sid) as call:
        await _take(call, 7)
        await _close(client, sid)
        tail = await _read_to_end(call)
    assert [e.sequence for e in tail] == list(range(8, 8 + len(tail)))
    assert tail[-1].status_changed.to_status == CLOSED


async def test_watching_a_closed_session_replays_and_ends(client: Client) -> None:
    sid = (await _init(client)).session_id
    await _close(client, sid)
    events = await _watch_all(client, sid)
    assert [e.sequence for e in events] == list(range(1, 15))  # 7 opening, 6 left, 1 closed
    assert events[-1].status_changed.to_status == CLOSED
    assert await _watch_all(client, sid, after_sequence=14) == []


async def test_a_long_history_replays_completely(client: Client) -> None:
    # More events than one page of the store's log.
    sid = (await _init(client)).session_id
    for i in range(600):
        await client.server.mesh.bus.publish("acme", sid, AgentLeft("worker", f"gone-{i}", "deregistered"))
    await _close(client, sid)
    events = await _watch_all(client, sid)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert len(events) == 7 + 600 + 7
    resumed = await _watch_all(client, sid, after_sequence=499)
    assert [e.sequence for e in resumed] == list(range(500, len(events) + 1))


async def test_watch_rejects_bad_requests(client: Client) -> None:
    sid = (await _init(client)).session_id
    async with _watching(client, sid, after_sequence=-1) as call:
        await _rejects(_read_to_end(call), grpc.StatusCode.INVALID_ARGUMENT, field="after_sequence")
    async with _watching(client, "no-such-session") as call:
        await _rejects(_read_to_end(call), grpc.StatusCode.NOT_FOUND)
    # a resume point past the log's end (another session's, another store's) is said, not waited on
    async with _watching(client, sid, after_sequence=2**62) as call:
        await _rejects(_read_to_end(call), grpc.StatusCode.OUT_OF_RANGE)
    async with _watching(client, sid, after_sequence=7) as call:  # the newest event: a resume at the head
        await client.server.mesh.bus.publish("acme", sid, AgentLeft("worker", "gone-1", "deregistered"))
        response = await asyncio.wait_for(call.read(), WAIT)
        assert response.event.sequence == 8


# Client channel options that keep the HTTP/2 window tiny, so a client that does not read
# really stops the server from writing (instead of everything piling up in transport buffers).
_SLOW_READER = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


async def test_a_slow_subscriber_is_cut_off_and_can_resume() -> None:
    async with running_server(subscriber_buffer=4) as client:
        md = await client.md()
        sid = (await _init(client, md)).session_id
        async with aio.insecure_channel(client.server.target, options=_SLOW_READER) as slow_channel:
            stub = session_service_pb2_grpc.SessionServiceStub(slow_channel)
            async with _watching(client, sid, md=md, stub=stub) as call:
                first = await _next(call)  # the stream is live; now stop reading
                for i in range(40):
                    await _register(client, f"w-{i}", md=md)
                    await _invite(client, sid, instance_id=f"w-{i}", md=md)
                await _close(client, sid, md)  # 47 more events in one burst
                got, error = await _read_until_error(call)
        total = 7 + 40 + 47
        got = [first, *got]
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = _error_info(error)
        assert info.reason == "SUBSCRIBER_TOO_SLOW"
        resume_at = int(info.metadata["after_sequence"])
        assert [e.sequence for e in got] == list(range(1, resume_at + 1))
        assert resume_at < total
        assert f"after_sequence={resume_at}" in error.details()

        rest = await _watch_all(client, sid, md=md, after_sequence=resume_at)
        assert [e.sequence for e in got + rest] == list(range(1, total + 1))
        assert rest[-1].status_changed.to_status == CLOSED
        # The live subscription was dropped, not leaked.
        assert client.server.mesh.bus.subscriber_count("acme", sid) == 0


async def test_a_converse_reader_that_stops_reading_is_cut_off_like_a_watcher() -> None:
    # found from outside: Converse kept 64 converted events of its own per stream, so a stalled
    # reader was never behind for the session and held ~10x a watcher's memory
    async with running_server(subscriber_buffer=4) as client:
        md = await client.md()
        sid = (await _init(client, md)).session_id
        async with aio.insecure_channel(client.server.target, options=_SLOW_READER) as slow_channel:
            requests: asyncio.Queue[message_service_pb2.ConverseRequest | None] = asyncio.Queue()

            async def sent() -> AsyncIterator[message_service_pb2.ConverseRequest]:
                while (request := await requests.get()) is not None:
                    yield request

            call = message_service_pb2_grpc.MessageServiceStub(slow_channel).Converse(sent(), metadata=md)
            requests.put_nowait(
                message_service_pb2.ConverseRequest(open=message_service_pb2.ConverseOpen(session_id=sid))
            )
            try:
                first = await asyncio.wait_for(call.read(), WAIT)  # the stream is live; now stop reading
                for i in range(40):  # one event at a time: a reader that kept up would never lag
                    await _register(client, f"w-{i}", md=md)
                    await _invite(client, sid, instance_id=f"w-{i}", md=md)
                got, error = await _read_until_error(call)
            finally:
                requests.put_nowait(None)
                call.cancel()
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = _error_info(error)
        assert info.reason == "SUBSCRIBER_TOO_SLOW"
        resume_at = int(info.metadata["after_sequence"])
        got = [first.event, *got]
        assert [e.sequence for e in got] == list(range(1, resume_at + 1))
        assert resume_at < 7 + 40
        await _close(client, sid, md)
        rest = await _watch_all(client, sid, md=md, after_sequence=resume_at)
        assert [e.sequence for e in got + rest] == list(range(1, len(got + rest) + 1))
        assert rest[-1].status_changed.to_status == CLOSED


_GOES_AWAY = """
import asyncio, sys
from grpc import aio
from svantic_grpc.pb import session_service_pb2, session_service_pb2_grpc

async def main() -> None:
    target, token, session_id = sys.argv[1:4]
    small = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    channel = aio.insecure_channel(target, options=small)
    stub = session_service_pb2_grpc.SessionServiceStub(channel)
    call = stub.WatchSession(
        session_service_pb2.WatchSessionRequest(session_id=session_id),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    await call.read()
    print("reading no more", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_clients_that_go_away_mid_stream_are_no_error_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # found from outside: every closed terminal or browser with unread frames logged an ERROR with
    # a traceback ("unexpected error in .../WatchSession", ExecuteBatchError)
    async with running_server(subscriber_buffer=10_000) as client:
        md = await client.md()
        sid = (await _init(client, md)).session_id
        token = await client.token()
        with caplog.at_level(logging.INFO):
            for _ in range(3):
                watcher = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    _GOES_AWAY,
                    client.server.target,
                    token,
                    sid,
                    stdout=asyncio.subprocess.PIPE,
                )
                assert watcher.stdout is not None
                await asyncio.wait_for(watcher.stdout.readline(), WAIT)  # live; it never reads again
                for i in range(30):  # more than its window holds: the server's writes wait
                    await client.server.mesh.bus.publish("acme", sid, AgentLeft("w", f"x-{i}", "x" * 20_000))
                watcher.kill()  # the client goes away with frames unread
                await watcher.wait()
                await asyncio.sleep(0.3)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]
        await _close(client, sid, md)  # the server still serves the session


async def test_a_subscriber_that_keeps_up_is_not_cut_off() -> None:
    async with running_server(subscriber_buffer=64) as client:
        sid = (await _init(client)).session_id
        async with _watching(client, sid) as call:
            await _take(call, 7)
            for i in range(20):
                await _register(client, f"w-{i}")
                await _invite(client, sid, instance_id=f"w-{i}")
                assert (await _next(call)).sequence == 8 + i
            await _close(client, sid)
            tail = await _read_to_end(call)
        assert tail[-1].status_changed.to_status == CLOSED
        assert len(tail) == 6 + 20 + 1


async def test_a_tenant_holds_at_most_max_streams_per_tenant_live_streams() -> None:
    """Found from outside (review 6, V2): every stream cost the server ~25 KB and one credential
    could open them without end. Past the limit a stream is refused with a clear reason; closing
    one frees its place; another tenant is not affected."""
    async with running_server(max_streams_per_tenant=2) as client:
        md = await client.md()
        sid = (await _init(client, md)).session_id
        async with _watching(client, sid, md=md) as first, _watching(client, sid, md=md) as second:
            await asyncio.wait_for(first.read(), WAIT)  # both live: the session's first event
            await asyncio.wait_for(second.read(), WAIT)
            async with _watching(client, sid, md=md) as third:
                with pytest.raises(aio.AioRpcError) as refused:
                    await asyncio.wait_for(third.read(), WAIT)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _error_info(refused).reason == "TOO_MANY_STREAMS"
            assert "max_streams_per_tenant" in (refused.value.details() or "")
            # A streaming send is a stream too.
            streaming = client.messages.SendStreamingMessage(
                message_service_pb2.SendStreamingMessageRequest(
                    session_id=sid,
                    message=message_service_pb2.OutgoingMessage(parts=[message_types_pb2.Part(text="hi")]),
                ),
                metadata=md,
            )
            with pytest.raises(aio.AioRpcError) as also_refused:
                await asyncio.wait_for(streaming.read(), WAIT)
            assert _error_info(also_refused).reason == "TOO_MANY_STREAMS"
            # Another tenant has its own allowance.
            globex = await client.md("globex-full")
            other = (await _init(client, globex)).session_id
            async with _watching(client, other, md=globex) as theirs:
                assert (await asyncio.wait_for(theirs.read(), WAIT)).event.sequence == 1
            first.cancel()
            for _ in range(100):  # the cancelled stream's place is given back
                async with _watching(client, sid, md=md) as again:
                    try:
                        await asyncio.wait_for(again.read(), WAIT)
                        break
                    except aio.AioRpcError as error:
                        assert _error_info(error).reason == "TOO_MANY_STREAMS"
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("a closed stream's place was never given back")


async def test_agents_connect_streams_count_against_the_same_allowance() -> None:
    """Found from outside (review 7, W6): Connect streams were not counted, and one credential held
    2,000 of them (~28 KB each) on a server allowing 50 streams. They share the tenant's allowance
    with its event streams; a reconnect of an instance takes its own stream's place and is never
    refused; a place given back is taken by the next stream."""
    async with running_server(max_streams_per_tenant=2) as client:
        md = await client.md()
        sid = (await _init(client, md)).session_id
        async with raw_agent(client, "one"), _watching(client, sid, md=md) as watch:
            await asyncio.wait_for(watch.read(), WAIT)  # live: the session's first event
            await register_connected(client, "two")
            refused_agent = RawAgent(client, md, "two")
            try:
                refused_agent.hello()
                with pytest.raises(aio.AioRpcError) as refused:
                    await refused_agent.receive()
            finally:
                refused_agent.close()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _error_info(refused).reason == "TOO_MANY_STREAMS"
            # The same instance connecting again replaces its stream, in its place.
            async with raw_agent(client, "one", register=False) as again:
                assert again.welcomed.agent.instance_id == "one"
        # Both streams are gone: their places are free for anything.
        async with raw_agent(client, "two", register=False), raw_agent(client, "three"):
            pass


async def test_an_agent_refused_for_the_allowance_waits_before_it_tries_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Code review (K9): a refused agent of our own SDK signed in and registered again every second
    (a registration write each time, for every agent over the allowance). The refusal of a Connect
    asks for a longer wait, and the SDK waits it."""
    async with running_server(max_streams_per_tenant=1) as client:
        registry = client.server.mesh.registry
        registered: list[str] = []
        register = registry.register

        async def counting(caller: Any, spec: Any) -> Any:
            registered.append(spec.instance_id)
            return await register(caller, spec)

        monkeypatch.setattr(registry, "register", counting)
        async with raw_agent(client, "one"):
            agent = ConnectedAgent(
                client.server.target,
                client_id="acme-full",
                client_secret=SECRET,
                agent_type="echo",
                instance_id="two",
                handler=_never_called,
                reconnect_delay_s=0.05,
            )
            running = asyncio.create_task(agent.run())
            try:
                await asyncio.sleep(2.5)
            finally:
                await agent.stop()
                await asyncio.wait_for(running, WAIT)
        assert registered.count("two") == 1, registered  # refused once, then waiting (15 s)


async def _never_called(dispatch: Any, reply: Any) -> None:
    raise AssertionError("not connected: nothing is dispatched to it")
