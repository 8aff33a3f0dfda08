"""A request body that does not decode is INVALID_ARGUMENT, before auth, with no traceback logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio

from svantic_grpc.pb import agent_types_pb2, message_service_pb2, registry_service_pb2, session_service_pb2
from tests._support import Client, running_server

GARBAGE = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
"""A truncated varint: protobuf refuses to parse it."""
WAIT = 5.0

UNARY = [
    ("/svantic.v1.SessionService/GetSession", "svantic.v1.GetSessionRequest"),
    ("/svantic.v1.AuthService/GetToken", "svantic.v1.GetTokenRequest"),
    ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
]
SERVER_STREAMING = [("/svantic.v1.SessionService/WatchSession", "svantic.v1.WatchSessionRequest")]
BIDI = [
    ("/svantic.v1.MessageService/Converse", "svantic.v1.ConverseRequest"),
    ("/svantic.v1.RegistryService/Connect", "svantic.v1.ConnectRequest"),
]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    async with running_server() as client:
        yield client


def _assert_refused(error: aio.AioRpcError, type_name: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    details = error.details() or ""
    assert type_name in details
    assert "DecodeError" not in details and "Exception" not in details and "<class" not in details


def _assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert all("\n" not in r.getMessage() for r in caplog.records)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 1


def _no_token_md() -> tuple[tuple[str, str], ...]:
    return ()


@pytest.mark.parametrize(("path", "type_name"), UNARY)
async def test_unary_garbage_is_invalid_argument_before_auth(
    client: Client, caplog: pytest.LogCaptureFixture, path: str, type_name: str
) -> None:
    call = client.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    with pytest.raises(aio.AioRpcError) as excinfo:
        await asyncio.wait_for(call(GARBAGE, metadata=_no_token_md()), WAIT)
    _assert_refused(excinfo.value, type_name)
    _assert_no_traceback(caplog)


@pytest.mark.parametrize(("path", "type_name"), SERVER_STREAMING)
async def test_server_streaming_garbage_is_invalid_argument(
    client: Client, caplog: pytest.LogCaptureFixture, path: str, type_name: str
) -> None:
    call = client.channel.unary_stream(path, request_serializer=None, response_deserializer=None)
    with pytest.raises(aio.AioRpcError) as excinfo:
        async for _ in call(GARBAGE, metadata=_no_token_md(), timeout=WAIT):
            pass
    _assert_refused(excinfo.value, type_name)
    _assert_no_traceback(caplog)


@pytest.mark.parametrize(("path", "type_name"), BIDI)
async def test_bidi_garbage_first_frame_is_invalid_argument(
    client: Client, caplog: pytest.LogCaptureFixture, path: str, type_name: str
) -> None:
    call = client.channel.stream_stream(path, request_serializer=None, response_deserializer=None)
    stream = call(metadata=await client.md(), timeout=WAIT)
    await stream.write(GARBAGE)
    await stream.done_writing()
    with pytest.raises(aio.AioRpcError) as excinfo:
        async for _ in stream:
            pass
    _assert_refused(excinfo.value, type_name)
    _assert_no_traceback(caplog)


async def test_converse_garbage_after_open_ends_the_stream_with_invalid_argument(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    md = await client.md()
    await client.sessions.InitSession(
        session_service_pb2.InitSessionRequest(session_id="s-garbage"), metadata=md
    )
    call = client.channel.stream_stream(
        "/svantic.v1.MessageService/Converse",
        request_serializer=None,
        response_deserializer=message_service_pb2.ConverseResponse.FromString,
    )
    stream = call(metadata=md, timeout=WAIT)
    opening = message_service_pb2.ConverseRequest(
        open=message_service_pb2.ConverseOpen(session_id="s-garbage")
    )
    await stream.write(opening.SerializeToString())
    first = await stream.read()
    assert first.WhichOneof("payload") == "event"  # the session's history is flowing
    await stream.write(GARBAGE)
    with pytest.raises(aio.AioRpcError) as excinfo:
        while True:
            response = await stream.read()
            assert response is not aio.EOF, "the stream ended without a status"
    _assert_refused(excinfo.value, "svantic.v1.ConverseRequest")
    _assert_no_traceback(caplog)


async def test_connect_garbage_after_hello_ends_the_stream_with_invalid_argument(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    md = await client.md()
    await client.registry.RegisterAgent(
        registry_service_pb2.RegisterAgentRequest(
            instance_id="garbage-agent",
            agent_type="garbage",
            deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_CONNECTED,
        ),
        metadata=md,
    )
    call = client.channel.stream_stream(
        "/svantic.v1.RegistryService/Connect",
        request_serializer=None,
        response_deserializer=registry_service_pb2.ConnectResponse.FromString,
    )
    stream = call(metadata=md, timeout=WAIT)
    hello = registry_service_pb2.ConnectRequest(
        hello=registry_service_pb2.ConnectHello(instance_id="garbage-agent")
    )
    await stream.write(hello.SerializeToString())
    welcome = await stream.read()
    assert welcome.WhichOneof("payload") == "welcome"
    await stream.write(GARBAGE)
    with pytest.raises(aio.AioRpcError) as excinfo:
        while True:
            response = await stream.read()
            assert response is not aio.EOF, "the stream ended without a status"
    _assert_refused(excinfo.value, "svantic.v1.ConnectRequest")
    _assert_no_traceback(caplog)


async def test_a_flood_logs_at_most_one_line(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    call = client.channel.unary_unary(
        "/svantic.v1.SessionService/GetSession", request_serializer=None, response_deserializer=None
    )
    for _ in range(50):
        with pytest.raises(aio.AioRpcError) as excinfo:
            await asyncio.wait_for(call(GARBAGE), WAIT)
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    lines = [r for r in caplog.records if "decode" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
