"""RegistryService against a real server: registration, heartbeats, load, tenancy and scopes."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from svantic_grpc.core.clock import ManualClock
from svantic_grpc.pb import (
    agent_types_pb2,
    message_service_pb2,
    registry_service_pb2,
    session_service_pb2,
)
from tests._support import Client, code_of, error_details, running_server

HOSTED = agent_types_pb2.DEPLOYMENT_MODE_HOSTED
CONNECTED = agent_types_pb2.DEPLOYMENT_MODE_CONNECTED
UNSPECIFIED_MODE = agent_types_pb2.DEPLOYMENT_MODE_UNSPECIFIED
AVAILABLE = agent_types_pb2.AGENT_STATUS_AVAILABLE
BUSY = agent_types_pb2.AGENT_STATUS_BUSY
DRAINING = agent_types_pb2.AGENT_STATUS_DRAINING
OFFLINE = agent_types_pb2.AGENT_STATUS_OFFLINE
UNHEALTHY = agent_types_pb2.AGENT_STATUS_UNHEALTHY
UNKNOWN = agent_types_pb2.AGENT_STATUS_UNKNOWN

HEARTBEAT_TIMEOUT_MS = 30_000
URL = "https://agents.example.com/a2a"


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def _skill(skill_id: str, **fields: Any) -> agent_types_pb2.AgentSkill:
    return agent_types_pb2.AgentSkill(id=skill_id, **fields)


async def _register(
    client: Client, *, client_id: str = "acme-full", **fields: Any
) -> registry_service_pb2.RegisterAgentResponse:
    request: dict[str, Any] = {
        "agent_type": "transcript-link",
        "instance_id": "tl-1",
        "url": URL,
        "deployment_mode": HOSTED,
    }
    request.update(fields)
    response: registry_service_pb2.RegisterAgentResponse = await client.registry.RegisterAgent(
        registry_service_pb2.RegisterAgentRequest(**request), metadata=await client.md(client_id)
    )
    return response


async def _get(
    client: Client, instance_id: str = "tl-1", client_id: str = "acme-full"
) -> agent_types_pb2.Agent:
    response: registry_service_pb2.GetAgentResponse = await client.registry.GetAgent(
        registry_service_pb2.GetAgentRequest(instance_id=instance_id), metadata=await client.md(client_id)
    )
    return response.agent


async def _heartbeat(
    client: Client, instance_id: str = "tl-1", client_id: str = "acme-full", **fields: Any
) -> registry_service_pb2.HeartbeatResponse:
    response: registry_service_pb2.HeartbeatResponse = await client.registry.Heartbeat(
        registry_service_pb2.HeartbeatRequest(instance_id=instance_id, **fields),
        metadata=await client.md(client_id),
    )
    return response


async def _list(client: Client, client_id: str = "acme-full", **fields: Any) -> list[agent_types_pb2.Agent]:
    response = await client.registry.ListAgents(
        registry_service_pb2.ListAgentsRequest(**fields), metadata=await client.md(client_id)
    )
    return list(response.agents)


async def _new_session(client: Client, session_id: str) -> str:
    response: session_service_pb2.InitSessionResponse = await client.sessions.InitSession(
        session_service_pb2.InitSessionRequest(session_id=session_id), metadata=await client.md()
    )
    return response.session.session_id


async def _invite(
    client: Client, session_id: str, agent_type: str = "transcript-link", instance_id: str = ""
) -> session_service_pb2.InviteAgentResponse:
    response: session_service_pb2.InviteAgentResponse = await client.sessions.InviteAgent(
        session_service_pb2.InviteAgentRequest(
            session_id=session_id, agent_type=agent_type, instance_id=instance_id
        ),
        metadata=await client.md(),
    )
    return response


async def _session_instances(client: Client, session_id: str) -> set[str]:
    response = await client.sessions.ListSessionAgents(
        session_service_pb2.ListSessionAgentsRequest(session_id=session_id), metadata=await client.md()
    )
    return {a.instance_id for a in response.agents}


# --- registration ---------------------------------------------------------------------------


async def test_register_hosted_agent(client: Client) -> None:
    response = await _register(client, skills=[_skill("summarize", name="Summarize", tags=["text"])])
    assert response.created
    agent = response.agent
    assert (agent.agent_type, agent.instance_id, agent.url) == ("transcript-link", "tl-1", URL)
    assert agent.deployment_mode == HOSTED
    assert [(s.id, s.name, list(s.tags)) for s in agent.skills] == [("summarize", "Summarize", ["text"])]
    assert agent.status == UNKNOWN  # registered, no status reported yet: routable
    assert agent.reported_status == UNKNOWN
    assert list(agent.session_ids) == []
    assert agent.registered_at.seconds > 0
    assert agent.registered_at == agent.last_seen_at
    assert (await _get(client)) == agent


async def test_register_connected_agent_without_url(client: Client) -> None:
    response = await _register(client, instance_id="laptop-1", url="", deployment_mode=CONNECTED)
    assert response.created
    assert response.agent.deployment_mode == CONNECTED
    assert response.agent.url == ""


@pytest.mark.parametrize(
    ("url", "mode"), [pytest.param(URL, HOSTED, id="with-url"), pytest.param("", CONNECTED, id="without-url")]
)
async def test_unspecified_mode_follows_the_url(client: Client, url: str, mode: int) -> None:
    response = await _register(client, url=url, deployment_mode=UNSPECIFIED_MODE)
    assert response.agent.deployment_mode == mode


async def test_registering_joins_no_session(client: Client) -> None:
    session_id = await _new_session(client, "s-1")
    await _register(client)
    assert "tl-1" not in await _session_instances(client, session_id)
    assert list((await _get(client)).session_ids) == []


async def test_register_again_updates_and_keeps_registration_time_and_bindings(clock: ManualClock) -> None:
    async with running_server(clock=clock) as client:
        first = await _register(client, skills=[_skill("a")], max_concurrent_sessions=5)
        session_id = await _new_session(client, "s-1")
        await _invite(client, session_id, instance_id="tl-1")
        clock.advance(10)

        again = await _register(
            client,
            url="https://agents.example.com/v2",
            skills=[_skill("b"), _skill("c")],
            max_concurrent_sessions=7,
        )
        assert not again.created
        agent = again.agent
        assert agent.url == "https://agents.example.com/v2"
        assert [s.id for s in agent.skills] == ["b", "c"]
        assert agent.max_concurrent_sessions == 7
        assert agent.registered_at == first.agent.registered_at
        assert agent.last_seen_at.ToSeconds() == first.agent.last_seen_at.ToSeconds() + 10
        assert list(agent.session_ids) == [session_id]
        assert agent.version > first.agent.version
        assert await _session_instances(client, session_id) >= {"tl-1"}
        assert len(await _list(client)) == 1


async def test_switching_deployment_mode_is_a_conflict(client: Client) -> None:
    await _register(client)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _register(client, url="", deployment_mode=CONNECTED)
    assert code_of(excinfo) == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(excinfo)[0] == "DEPLOYMENT_MODE_CONFLICT"
    assert "deregister" in (excinfo.value.details() or "")
    agent = await _get(client)  # the accepted registration is untouched
    assert (agent.deployment_mode, agent.url) == (HOSTED, URL)


async def test_changing_the_agent_type_of_an_instance_is_refused(client: Client) -> None:
    await _register(client)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _register(client, agent_type="cliq")
    assert code_of(excinfo) == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(excinfo)[0] == "AGENT_TYPE_CONFLICT"
    assert (await _get(client)).agent_type == "transcript-link"


async def test_skills_come_from_the_agent_card_when_none_are_given(client: Client) -> None:
    card = {
        "name": "Transcript Link",
        "url": URL,
        "skills": [
            {
                "id": "summarize",
                "name": "Summarize",
                "tags": ["meeting", "notes"],
                "inputModes": ["text/plain"],
            },
            {"id": "translate", "name": "Translate", "description": "any language"},
        ],
    }
    agent = (await _register(client, agent_card=_struct(card))).agent
    assert [(s.id, s.name, list(s.tags)) for s in agent.skills] == [
        ("summarize", "Summarize", ["meeting", "notes"]),
        ("translate", "Translate", []),
    ]
    assert list(agent.skills[0].input_modes) == ["text/plain"]
    assert agent.skills[1].description == "any language"
    assert agent.agent_card["name"] == "Transcript Link"


async def test_explicit_skills_win_over_the_agent_card(client: Client) -> None:
    card = {"skills": [{"id": "from-card"}]}
    agent = (await _register(client, agent_card=_struct(card), skills=[_skill("explicit")])).agent
    assert [s.id for s in agent.skills] == ["explicit"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param({"agent_type": ""}, "agent_type", id="empty-agent-type"),
        pytest.param({"instance_id": ""}, "instance_id", id="empty-instance-id"),
        pytest.param({"instance_id": "has space"}, "instance_id", id="bad-instance-id"),
        pytest.param({"instance_id": "-leading-dash"}, "instance_id", id="instance-id-leading-dash"),
        pytest.param({"instance_id": "echo-1\n"}, "instance_id", id="instance-id-trailing-newline"),
        pytest.param({"agent_type": "savant:orchestrator"}, "agent_type", id="reserved-prefix"),
        pytest.param({"url": ""}, "url", id="hosted-without-url"),
        pytest.param({"url": "ftp://agents.example.com"}, "url", id="non-http-url"),
        pytest.param({"url": "not a url"}, "url", id="not-a-url"),
        pytest.param({"url": "http://"}, "url", id="url-without-host"),
        pytest.param({"max_concurrent_sessions": -1}, "max_concurrent_sessions", id="negative-max"),
        pytest.param({"skills": [_skill("a"), _skill("a")]}, "skills[1].id", id="duplicate-skill"),
        pytest.param({"skills": [_skill("a"), _skill("")]}, "skills[1].id", id="skill-without-id"),
        pytest.param(
            {"agent_card": _struct({"skills": [{"id": "x"}, {"id": "y"}, {"id": "x"}]})},
            "skills[2].id",
            id="duplicate-skill-in-card",
        ),
        pytest.param(
            {"tools": [agent_types_pb2.AgentTool(name="")]}, "tools[0].name", id="tool-without-name"
        ),
    ],
)
async def test_invalid_registration_names_the_field(
    client: Client, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _register(client, **fields)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(excinfo) == ("INVALID_ARGUMENT", field)
    assert await _list(client) == []  # nothing half-registered


async def test_unknown_deployment_mode_value_is_invalid(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _register(client, deployment_mode=7)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(excinfo) == ("INVALID_ARGUMENT", "deployment_mode")


async def test_invalid_re_registration_keeps_the_accepted_one(client: Client) -> None:
    await _register(client, max_concurrent_sessions=3)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _register(client, max_concurrent_sessions=-3)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert (await _get(client)).max_concurrent_sessions == 3


async def test_register_again_after_going_offline_makes_it_routable_again(client: Client) -> None:
    # A restarted agent re-registers: a registration declares it available.
    await _register(client)
    await _heartbeat(client, status=OFFLINE)
    again = await _register(client)
    assert again.agent.status in (AVAILABLE, UNKNOWN), again.agent.status


# --- heartbeats -----------------------------------------------------------------------------


async def test_heartbeat_records_status_and_load(clock: ManualClock) -> None:
    async with running_server(clock=clock, heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS) as client:
        await _register(client)
        clock.advance(5)
        response = await _heartbeat(client, status=AVAILABLE, current_sessions=3)
        agent = response.agent
        assert agent.status == agent.reported_status == AVAILABLE
        assert agent.reported_sessions == 3
        assert agent.last_seen_at.ToNanoseconds() == round(clock.now() * 1e9)
        assert (
            response.next_heartbeat_before.ToNanoseconds()
            == agent.last_seen_at.ToNanoseconds() + HEARTBEAT_TIMEOUT_MS * 1_000_000
        )
        assert await _get(client) == agent


async def test_heartbeat_without_status_keeps_the_last_one(client: Client) -> None:
    await _register(client)
    await _heartbeat(client, status=DRAINING)
    agent = (await _heartbeat(client, current_sessions=1)).agent
    assert agent.reported_status == agent.status == DRAINING
    assert agent.reported_sessions == 1


@pytest.mark.parametrize("status", [BUSY, DRAINING, OFFLINE, UNHEALTHY])
async def test_reported_status_other_than_available_is_not_routable(client: Client, status: int) -> None:
    await _register(client)
    await _heartbeat(client, status=status)
    assert (await _get(client)).status == status
    assert await _list(client, routable_only=True) == []
    session_id = await _new_session(client, "s-1")
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _invite(client, session_id)
    assert code_of(excinfo) == grpc.StatusCode.UNAVAILABLE


async def test_heartbeat_with_an_unknown_status_value_is_invalid(client: Client) -> None:
    await _register(client)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _heartbeat(client, status=42)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(excinfo) == ("INVALID_ARGUMENT", "status")


async def test_heartbeat_for_unknown_instance_is_not_found(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _heartbeat(client, instance_id="nobody")
    assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
    assert error_details(excinfo)[0] == "AGENT_NOT_FOUND"


async def test_heartbeat_with_negative_load_is_invalid(client: Client) -> None:
    await _register(client)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _heartbeat(client, current_sessions=-1)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(excinfo) == ("INVALID_ARGUMENT", "current_sessions")
    assert (await _get(client)).reported_sessions == 0


async def test_missed_heartbeats_make_an_instance_unhealthy_until_it_reports_again(
    clock: ManualClock,
) -> None:
    async with running_server(clock=clock, heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS) as client:
        await _register(client)
        await _heartbeat(client, status=AVAILABLE)
        session_id = await _new_session(client, "s-1")

        clock.advance(HEARTBEAT_TIMEOUT_MS / 1000 - 1)  # just before the deadline: still fine
        assert (await _get(client)).status == AVAILABLE

        clock.advance(2)
        agent = await _get(client)
        assert agent.status == UNHEALTHY
        assert agent.reported_status == AVAILABLE  # what it said is kept; what routing sees changed
        assert [a.instance_id for a in await _list(client)] == ["tl-1"]
        assert await _list(client, routable_only=True) == []
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await _invite(client, session_id)
        assert code_of(excinfo) == grpc.StatusCode.UNAVAILABLE
        assert error_details(excinfo)[0] == "NO_AGENT_AVAILABLE"
        assert "unhealthy" in (excinfo.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as named:
            await _invite(client, session_id, instance_id="tl-1")
        assert code_of(named) == grpc.StatusCode.UNAVAILABLE

        assert (await _heartbeat(client)).agent.status == AVAILABLE
        assert [a.instance_id for a in await _list(client, routable_only=True)] == ["tl-1"]
        joined = await _invite(client, session_id)
        assert joined.agent.instance_id == "tl-1"
        assert joined.agent.join_reason == agent_types_pb2.JOIN_REASON_INVITED


async def test_invite_without_any_instance_is_unavailable(client: Client) -> None:
    session_id = await _new_session(client, "s-1")
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _invite(client, session_id)
    assert code_of(excinfo) == grpc.StatusCode.UNAVAILABLE
    assert error_details(excinfo)[0] == "NO_AGENT_AVAILABLE"


async def test_an_instance_at_its_session_limit_is_busy_until_a_session_closes(client: Client) -> None:
    await _register(client, max_concurrent_sessions=1)
    first = await _new_session(client, "s-1")
    second = await _new_session(client, "s-2")
    await _invite(client, first)

    agent = await _get(client)
    assert agent.status == BUSY
    assert list(agent.session_ids) == [first]
    assert await _list(client, routable_only=True) == []
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _invite(client, second)
    assert code_of(excinfo) == grpc.StatusCode.UNAVAILABLE
    assert "tl-1" not in await _session_instances(client, second)

    await client.sessions.CloseSession(
        session_service_pb2.CloseSessionRequest(session_id=first), metadata=await client.md()
    )
    agent = await _get(client)
    assert agent.status == UNKNOWN
    assert list(agent.session_ids) == []
    assert (await _invite(client, second)).agent.instance_id == "tl-1"


async def test_an_instance_reporting_itself_at_its_limit_is_busy(client: Client) -> None:
    await _register(client, max_concurrent_sessions=2)
    agent = (await _heartbeat(client, status=AVAILABLE, current_sessions=2)).agent
    assert agent.status == BUSY
    assert await _list(client, routable_only=True) == []


async def test_invite_picks_the_least_loaded_instance(client: Client) -> None:
    await _register(client, instance_id="tl-1")
    await _register(client, instance_id="tl-2")
    await _heartbeat(client, instance_id="tl-1", current_sessions=4)
    session_id = await _new_session(client, "s-1")
    assert (await _invite(client, session_id)).agent.instance_id == "tl-2"


# --- deregistration -------------------------------------------------------------------------


async def test_deregister_releases_the_sessions_it_served(client: Client) -> None:
    await _register(client)
    first = await _new_session(client, "s-1")
    second = await _new_session(client, "s-2")
    await _invite(client, first)
    await _invite(client, second)

    response = await client.registry.DeregisterAgent(
        registry_service_pb2.DeregisterAgentRequest(instance_id="tl-1"), metadata=await client.md()
    )
    assert sorted(response.released_session_ids) == [first, second]
    for session_id in (first, second):
        assert "tl-1" not in await _session_instances(client, session_id)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _get(client)
    assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
    assert await _list(client) == []

    # It may come back, even as a connected agent this time; it starts with no bindings.
    again = await _register(client, url="", deployment_mode=CONNECTED)
    assert again.created
    assert again.agent.deployment_mode == CONNECTED
    assert list(again.agent.session_ids) == []


async def test_deregister_releases_only_sessions_still_open(client: Client) -> None:
    await _register(client)
    closed = await _new_session(client, "s-closed")
    open_ = await _new_session(client, "s-open")
    await _invite(client, closed)
    await _invite(client, open_)
    await client.sessions.CloseSession(
        session_service_pb2.CloseSessionRequest(session_id=closed), metadata=await client.md()
    )
    response = await client.registry.DeregisterAgent(
        registry_service_pb2.DeregisterAgentRequest(instance_id="tl-1"), metadata=await client.md()
    )
    assert list(response.released_session_ids) == [open_]


async def test_deregister_unknown_instance_is_not_found(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await client.registry.DeregisterAgent(
            registry_service_pb2.DeregisterAgentRequest(instance_id="nobody"), metadata=await client.md()
        )
    assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND


async def test_deregister_without_sessions_releases_nothing(client: Client) -> None:
    await _register(client)
    response = await client.registry.DeregisterAgent(
        registry_service_pb2.DeregisterAgentRequest(instance_id="tl-1"), metadata=await client.md()
    )
    assert list(response.released_session_ids) == []


# --- listing and reading --------------------------------------------------------------------


async def test_list_agents_is_sorted_by_type_then_instance_and_filters_by_type(client: Client) -> None:
    for agent_type, instance_id in [("zeta", "z-1"), ("alpha", "a-2"), ("zeta", "a-9"), ("alpha", "a-1")]:
        await _register(client, agent_type=agent_type, instance_id=instance_id)
    listed = [(a.agent_type, a.instance_id) for a in await _list(client)]
    assert listed == [("alpha", "a-1"), ("alpha", "a-2"), ("zeta", "a-9"), ("zeta", "z-1")]
    assert [a.instance_id for a in await _list(client, agent_type="zeta")] == ["a-9", "z-1"]
    assert await _list(client, agent_type="nothing-of-that-type") == []


async def test_get_agent_has_empty_connection_state_before_any_dispatch(client: Client) -> None:
    await _register(client)
    agent = await _get(client)
    connection = agent.connection
    assert connection.transport == ""
    assert not connection.connected
    assert not connection.HasField("connected_since")
    assert not connection.HasField("last_dispatch_at")
    assert (connection.successes, connection.failures, connection.last_error) == (0, 0, "")


async def test_get_agent_needs_a_valid_instance_id(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _get(client, instance_id="")
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(excinfo) == ("INVALID_ARGUMENT", "instance_id")


# --- tenancy and scopes ---------------------------------------------------------------------


async def test_another_tenant_cannot_see_or_touch_an_instance(client: Client) -> None:
    await _register(client)
    globex = await client.md("globex-full")
    calls = {
        "get": client.registry.GetAgent(
            registry_service_pb2.GetAgentRequest(instance_id="tl-1"), metadata=globex
        ),
        "heartbeat": client.registry.Heartbeat(
            registry_service_pb2.HeartbeatRequest(instance_id="tl-1", status=OFFLINE), metadata=globex
        ),
        "deregister": client.registry.DeregisterAgent(
            registry_service_pb2.DeregisterAgentRequest(instance_id="tl-1"), metadata=globex
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await call
        assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND, name
        assert error_details(excinfo)[0] == "AGENT_NOT_FOUND", name
    assert await _list(client, client_id="globex-full") == []

    acme = await _get(client)  # untouched by any of that
    assert acme.reported_status == UNKNOWN


async def test_another_tenant_may_use_the_same_instance_id(client: Client) -> None:
    acme = (await _register(client)).agent
    theirs = await _register(
        client,
        client_id="globex-full",
        agent_type="cliq",
        url="",
        deployment_mode=CONNECTED,
    )
    assert theirs.created
    assert (theirs.agent.agent_type, theirs.agent.deployment_mode) == ("cliq", CONNECTED)
    assert await _get(client) == acme
    assert [a.agent_type for a in await _list(client, client_id="globex-full")] == ["cliq"]
    assert [a.agent_type for a in await _list(client)] == ["transcript-link"]


async def test_an_agent_of_another_tenant_never_joins_a_session(client: Client) -> None:
    await _register(client, client_id="globex-full")
    session_id = await _new_session(client, "s-1")
    with pytest.raises(grpc.aio.AioRpcError) as by_type:
        await _invite(client, session_id)
    assert code_of(by_type) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as by_id:
        await _invite(client, session_id, instance_id="tl-1")
    assert code_of(by_id) == grpc.StatusCode.NOT_FOUND


async def test_read_scope_lists_and_gets_but_cannot_register(client: Client) -> None:
    await _register(client)
    assert [a.instance_id for a in await _list(client, client_id="acme-read")] == ["tl-1"]
    assert (await _get(client, client_id="acme-read")).instance_id == "tl-1"
    read = await client.md("acme-read")
    writes = [
        client.registry.RegisterAgent(
            registry_service_pb2.RegisterAgentRequest(agent_type="cliq", instance_id="c-1", url=URL),
            metadata=read,
        ),
        client.registry.Heartbeat(registry_service_pb2.HeartbeatRequest(instance_id="tl-1"), metadata=read),
        client.registry.DeregisterAgent(
            registry_service_pb2.DeregisterAgentRequest(instance_id="tl-1"), metadata=read
        ),
    ]
    for call in writes:
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await call
        assert code_of(excinfo) == grpc.StatusCode.PERMISSION_DENIED
        assert error_details(excinfo)[0] == "MISSING_SCOPE"
    assert [a.instance_id for a in await _list(client)] == ["tl-1"]


async def test_registry_needs_a_token(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await client.registry.ListAgents(registry_service_pb2.ListAgentsRequest())
    assert code_of(excinfo) == grpc.StatusCode.UNAUTHENTICATED


# --- message service and Connect need tokens ------------------------------------------------

_UNARY_MESSAGE_RPCS = [
    "SendMessage",
    "GetMessage",
    "ListMessages",
    "CancelMessage",
    "ListPendingInputs",
    "ResolveInput",
]


async def _call_message_rpc(client: Client, name: str, metadata: tuple[tuple[str, str], ...]) -> None:
    method = getattr(client.messages, name)
    if name == "SendStreamingMessage":
        async for _ in method(
            message_service_pb2.SendStreamingMessageRequest(session_id="s"), metadata=metadata
        ):
            pass
    elif name == "Converse":
        opening = message_service_pb2.ConverseRequest(open=message_service_pb2.ConverseOpen(session_id="s"))
        async for _ in method(iter([opening]), metadata=metadata):
            pass
    else:
        await method(getattr(message_service_pb2, f"{name}Request")(), metadata=metadata)


@pytest.mark.parametrize("name", [*_UNARY_MESSAGE_RPCS, "SendStreamingMessage", "Converse"])
async def test_message_service_needs_a_token(client: Client, name: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await _call_message_rpc(client, name, ())
    assert code_of(anonymous) == grpc.StatusCode.UNAUTHENTICATED


async def test_connect_needs_a_token_and_a_registered_connected_instance(client: Client) -> None:
    hello = registry_service_pb2.ConnectRequest(
        hello=registry_service_pb2.ConnectHello(instance_id="laptop-1")
    )
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        async for _ in client.registry.Connect(iter([hello])):
            pass
    assert code_of(anonymous) == grpc.StatusCode.UNAUTHENTICATED

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        async for _ in client.registry.Connect(iter([hello]), metadata=await client.md()):
            pass
    assert code_of(unknown) == grpc.StatusCode.NOT_FOUND

    await _register(client, instance_id="laptop-1", url="http://127.0.0.1:4100")
    with pytest.raises(grpc.aio.AioRpcError) as hosted:
        async for _ in client.registry.Connect(iter([hello]), metadata=await client.md()):
            pass
    assert code_of(hosted) == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(hosted)[0] == "NOT_A_CONNECTED_AGENT"


# --- sizes: what carries registrations stays readable with gRPC's default 4 MB limit ----------


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"skills": [_skill(f"s{n}") for n in range(201)]}, "skills", "declares 201 skills; at most 200"),
        ({"tools": [agent_types_pb2.AgentTool(name=f"t{n}") for n in range(501)]}, "tools", "at most 500"),
        ({"agent_card": _struct({"blob": "x" * 300_000})}, "agent_card", "at most 262144 bytes"),
        (
            {"skills": [_skill(f"s{n}", description="d" * 2000) for n in range(150)]},
            "skills",
            "at most 262144 bytes",
        ),
    ],
)
async def test_an_oversized_registration_is_refused_naming_the_field(
    fields: dict[str, Any], field: str, words: str
) -> None:
    # found from outside: a 2.1 MB registration (50,000 skills) was accepted, and ListAgents, the
    # chat's answers and the watchers of its sessions then failed for every default client
    async with running_server() as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _register(client, **fields)
        assert code_of(refused) == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(refused)[1] == field
        assert words in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await _get(client)
        assert code_of(gone) == grpc.StatusCode.NOT_FOUND  # nothing of it was kept


async def test_list_agents_pages_by_count_and_by_size() -> None:
    async with running_server() as client:
        big = {"agent_card": _struct({"blob": "x" * 200_000})}  # under the limit, ~200 KB each
        for n in range(14):
            await _register(client, instance_id=f"tl-{n:02d}", **big)
        for n in range(3):
            await _register(client, agent_type="cliq", instance_id=f"c-{n}")
        md = await client.md()
        seen: list[tuple[str, str]] = []
        pages: list[int] = []
        token = ""
        for _ in range(20):
            page = await client.registry.ListAgents(
                registry_service_pb2.ListAgentsRequest(page_size=0, page_token=token), metadata=md
            )
            assert page.ByteSize() < 4 * 1024 * 1024
            pages.append(len(page.agents))
            seen += [(a.agent_type, a.instance_id) for a in page.agents]
            token = page.next_page_token
            if not token:
                break
        assert seen == sorted(seen) and len(seen) == len(set(seen)) == 17  # every one, once, in order
        assert len(pages) > 1  # 14 x 200 KB do not fit one 2 MiB page
        small = await client.registry.ListAgents(
            registry_service_pb2.ListAgentsRequest(agent_type="cliq", page_size=2), metadata=md
        )
        assert [a.instance_id for a in small.agents] == ["c-0", "c-1"] and small.next_page_token
        rest = await client.registry.ListAgents(
            registry_service_pb2.ListAgentsRequest(
                agent_type="cliq", page_size=2, page_token=small.next_page_token
            ),
            metadata=md,
        )
        assert [a.instance_id for a in rest.agents] == ["c-2"] and not rest.next_page_token
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await client.registry.ListAgents(
                registry_service_pb2.ListAgentsRequest(page_token="not-a-token"), metadata=md
            )
        assert code_of(bad) == grpc.StatusCode.INVALID_ARGUMENT and error_details(bad)[1] == "page_token"
        # The token of the `cliq` list is not a position in the list of every type.
        with pytest.raises(grpc.aio.AioRpcError) as other_list:
            await client.registry.ListAgents(
                registry_service_pb2.ListAgentsRequest(page_token=small.next_page_token), metadata=md
            )
        assert code_of(other_list) == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(other_list)[1] == "page_token"


async def test_the_chat_lists_what_agents_can_do_within_bounds() -> None:
    async with running_server() as client:
        for n in range(40):
            await _register(
                client,
                agent_type=f"type-{n:02d}",
                instance_id=f"i-{n:02d}",
                skills=[_skill(f"skill-{n:02d}-{k:03d}-" + "s" * 40) for k in range(200)],
            )
        md = await client.md()
        session = await client.sessions.InitSession(session_service_pb2.InitSessionRequest(), metadata=md)
        answer = await client.messages.SendMessage(
            message_service_pb2.SendMessageRequest(
                session_id=session.session.session_id,
                message=message_service_pb2.OutgoingMessage(
                    parts=[{"text": "what can you do?"}]  # type: ignore[list-item]
                ),
            ),
            metadata=md,
        )
        text = answer.message.history[-1].parts[0].text
        assert "type-00: skill-00-000-" in text  # it still says what there is, in order
        assert "more skills (ListAgents lists every agent)" in text
        assert answer.message.ByteSize() < 512 * 1024
