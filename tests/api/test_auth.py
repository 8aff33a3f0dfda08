"""Tokens and the auth interceptor, against a real server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.pb import auth_service_pb2, message_types_pb2, session_service_pb2
from tests._support import SECRET, SIGNING_ENV, Client, code_of, error_details, running_server
from tests.agents_connected import data, new_session, running_agent, send

SIGNING_KEY = SIGNING_ENV["SVANTIC_SIGNING_KEY"]


async def _get_token(client: Client, **fields: object) -> auth_service_pb2.GetTokenResponse:
    request = {"client_id": "acme-full", "client_secret": SECRET, "agent_type": "a2ui-terminal", **fields}
    return await client.auth.GetToken(auth_service_pb2.GetTokenRequest(**request))  # type: ignore[arg-type]


async def _init_with(client: Client, authorization: str | None) -> None:
    metadata = () if authorization is None else (("authorization", authorization),)
    await client.sessions.InitSession(session_service_pb2.InitSessionRequest(), metadata=metadata)


async def test_token_carries_the_documented_claims(client: Client) -> None:
    response = await _get_token(client, expires_in=600)
    claims = jwt.decode(response.token, SIGNING_KEY, algorithms=["HS256"], issuer="svantic-grpc")
    assert claims["tenant_id"] == "acme" == response.tenant_id
    assert claims["sub"] == "acme-full"
    assert claims["agent_type"] == "a2ui-terminal"
    assert claims["scopes"] == ["full"]
    assert claims["exp"] - claims["iat"] == 600
    assert claims["jti"] == response.token_id
    assert response.token_type == "Bearer"
    other = await _get_token(client)
    assert other.token_id != response.token_id


async def test_default_lifetime_is_a_day(client: Client) -> None:
    claims = jwt.decode((await _get_token(client)).token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 86_400


async def test_wrong_secret_and_unknown_client_are_unauthenticated_alike(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await _get_token(client, client_secret="nope")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await _get_token(client, client_id="nobody")
    assert code_of(wrong) == code_of(unknown) == grpc.StatusCode.UNAUTHENTICATED
    assert wrong.value.details() == unknown.value.details()


@pytest.mark.parametrize(
    "agent_type",
    ["", "my agent", "a\nb", "a" * 10_000, "savant:orchestrator"],
    ids=["empty", "space", "newline", "huge", "internal"],  # internal: it created sessions as the mesh
)
async def test_a_missing_or_unusable_agent_type_names_the_field(client: Client, agent_type: str) -> None:
    # a 10,000-character type made a 13.6 KB token that every later call refused (metadata limit)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _get_token(client, agent_type=agent_type)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(excinfo) == ("INVALID_ARGUMENT", "agent_type")


async def test_scope_not_held_by_the_credential_is_refused(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _get_token(client, client_id="acme-read", scopes=["full"])
    assert code_of(excinfo) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "NO_TOKEN"),
        ("Basic abc", "MALFORMED_AUTH"),
        ("Bearer not-a-jwt", "INVALID_TOKEN"),
    ],
)
async def test_missing_or_malformed_token_is_unauthenticated(
    client: Client, authorization: str | None, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _init_with(client, authorization)
    assert code_of(excinfo) == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(excinfo)[0] == reason


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": "svantic-grpc",
        "sub": "acme-full",
        "tenant_id": "acme",
        "agent_type": "a2ui-terminal",
        "scopes": ["full"],
        "iat": now,
        "exp": now + 600,
        "jti": "tok_forged",
    }
    claims.update(overrides)
    return claims


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(
            jwt.encode(_claims(), "some-other-key-0123456789abcdef0123", algorithm="HS256"), id="wrong-key"
        ),
        pytest.param(jwt.encode(_claims(), None, algorithm="none"), id="alg-none"),
        pytest.param(
            jwt.encode(_claims(iss="someone-else"), SIGNING_KEY, algorithm="HS256"), id="wrong-issuer"
        ),
        pytest.param(
            jwt.encode(_claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600), SIGNING_KEY),
            id="expired",
        ),
        pytest.param(
            jwt.encode({k: v for k, v in _claims().items() if k != "exp"}, SIGNING_KEY), id="no-exp"
        ),
    ],
)
async def test_bad_tokens_are_unauthenticated(client: Client, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _init_with(client, f"Bearer {token}")
    assert code_of(excinfo) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_correctly_signed_token_of_our_own_making_is_accepted(client: Client) -> None:
    # The counterpart of the forgeries above: the same claims, signed with the right key, work.
    await _init_with(client, f"Bearer {jwt.encode(_claims(), SIGNING_KEY, algorithm='HS256')}")


async def test_token_expiry_follows_the_server_clock(clock: object) -> None:
    from svantic_grpc.core.clock import ManualClock

    assert isinstance(clock, ManualClock)
    async with running_server(clock=clock) as client:
        md = await client.md()
        await client.sessions.InitSession(session_service_pb2.InitSessionRequest(), metadata=md)
        clock.advance(86_400 + 1)
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await client.sessions.InitSession(session_service_pb2.InitSessionRequest(), metadata=md)
        assert code_of(excinfo) == grpc.StatusCode.UNAUTHENTICATED
        assert error_details(excinfo)[0] == "TOKEN_EXPIRED"


async def test_read_scope_reads_but_cannot_write(client: Client) -> None:
    created = await client.sessions.InitSession(
        session_service_pb2.InitSessionRequest(), metadata=await client.md()
    )
    read_md = await client.md("acme-read")
    got = await client.sessions.GetSession(
        session_service_pb2.GetSessionRequest(session_id=created.session.session_id), metadata=read_md
    )
    assert got.session.session_id == created.session.session_id
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await client.sessions.CloseSession(
            session_service_pb2.CloseSessionRequest(session_id=created.session.session_id), metadata=read_md
        )
    assert code_of(excinfo) == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(excinfo)[0] == "MISSING_SCOPE"


async def test_health_and_reflection_need_no_token(client: Client) -> None:
    health = health_pb2_grpc.HealthStub(client.channel)
    overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    sessions = await health.Check(health_pb2.HealthCheckRequest(service="svantic.v1.SessionService"))
    assert sessions.status == health_pb2.HealthCheckResponse.SERVING

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = set()
    async for response in call:
        services = {s.name for s in response.list_services_response.service}
        break
    call.cancel()
    assert {
        "svantic.v1.AuthService",
        "svantic.v1.SessionService",
        "svantic.v1.RegistryService",
        "svantic.v1.MessageService",
    } <= services


async def test_development_default_accepts_the_walkthrough_credential() -> None:
    async with running_server(env={}, tenants=[]) as client:
        assert client.server.development
        response = await client.auth.GetToken(
            auth_service_pb2.GetTokenRequest(
                client_id="svantic", client_secret="your-secret", agent_type="cliq"
            )
        )
        md = (("authorization", f"Bearer {response.token}"),)
        created = await client.sessions.InitSession(
            session_service_pb2.InitSessionRequest(session_id="my-session-001"), metadata=md
        )
        assert created.session.session_id == "my-session-001"


async def test_configured_signing_key_turns_the_development_credential_off(client: Client) -> None:
    assert not client.server.development
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await client.auth.GetToken(
            auth_service_pb2.GetTokenRequest(
                client_id="svantic", client_secret="your-secret", agent_type="cliq"
            )
        )
    assert code_of(excinfo) == grpc.StatusCode.UNAUTHENTICATED


# --- a stream lives no longer than its token ------------------------------------------------------


async def test_open_streams_end_when_their_token_expires() -> None:
    # found from outside: after exp, an open Converse still sent messages and WatchSession streamed
    async with running_server() as client:
        session_id = await new_session(client)
        short = await client.auth.GetToken(
            auth_service_pb2.GetTokenRequest(
                client_id="acme-full", client_secret=SECRET, agent_type="a2ui-terminal", expires_in=2
            )
        )
        md = (("authorization", f"Bearer {short.token}"),)
        watch = client.sessions.WatchSession(
            session_service_pb2.WatchSessionRequest(session_id=session_id), metadata=md
        )
        converse = client.messages.Converse(metadata=md)
        started = time.monotonic()

        async def drained(call: Any) -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async with asyncio.timeout(10):
                    async for _ in call:
                        pass
            return ended.value

        for ended in await asyncio.gather(drained(watch), drained(converse)):
            assert ended.code() == grpc.StatusCode.UNAUTHENTICATED, ended.details()
            assert "token expired" in (ended.details() or "")
        assert time.monotonic() - started > 0.9  # at its exp (whole seconds), and by itself (10 s bound)
        # a new token opens a new stream
        again = client.sessions.WatchSession(
            session_service_pb2.WatchSessionRequest(session_id=session_id), metadata=await client.md()
        )
        assert (await anext(aiter(again))).event.sequence == 1
        again.cancel()


async def test_the_agent_helper_renews_its_token_before_the_mesh_ends_its_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    replies: list[str] = []

    async def echo(dispatch: Dispatch, reply: Reply) -> None:
        replies.append(dispatch.text)
        await reply.complete(f"echo {dispatch.text}")

    async with (
        running_server(auth={"token_ttl_s": 3, "max_token_ttl_s": 3}) as client,
        running_agent(client, echo, agent_type="echo", instance_id="e-1") as agent,
    ):
        session_id = await new_session(client)
        first = await send(client, session_id, "one", data({"target_agent": "echo"}))
        assert first.state == message_types_pb2.MESSAGE_STATE_COMPLETED
        await asyncio.sleep(4.5)  # past the first token's end: renewed at 80% of its life, while idle
        assert agent.connected.is_set()
        client._tokens.clear()  # the test's own token lived 3 s too
        second = await send(client, session_id, "two", data({"target_agent": "echo"}))
        assert second.state == message_types_pb2.MESSAGE_STATE_COMPLETED, second.state_reason
        assert replies == ["one", "two"]
    # renewed while idle: the mesh never had to end its stream for an expired token
    assert not [r for r in caplog.records if "UNAUTHENTICATED" in r.getMessage()]
