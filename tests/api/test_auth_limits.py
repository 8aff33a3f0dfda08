"""GetToken's limit of failed attempts and its memory of verified secrets, against a real server.

The server's clock is a ``ManualClock``: a retry delay is waited out by moving it, not by
sleeping. Every call comes from 127.0.0.1, so it is one peer throughout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from svantic_grpc.api._context import peer_host
from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Reply
from svantic_grpc.core.auth import Credential, hash_secret
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.pb import auth_service_pb2
from tests._support import SECRET, Client, code_of, error_details, running_server, tenant_settings
from tests.test_metrics import scrape, value


def _limits(per_client_id: tuple[int, float], per_peer: tuple[int, float]) -> dict[str, Any]:
    return {
        "failed_attempts": {
            "per_client_id": {"burst": per_client_id[0], "refill_s": per_client_id[1]},
            "per_peer": {"burst": per_peer[0], "refill_s": per_peer[1]},
        }
    }


@asynccontextmanager
async def _server(
    clock: ManualClock, per_client_id: tuple[int, float], per_peer: tuple[int, float]
) -> AsyncIterator[Client]:
    async with running_server(clock=clock, auth=_limits(per_client_id, per_peer)) as client:
        yield client


async def _get_token(client: Client, client_id: str = "acme-full", secret: str = SECRET) -> str:
    response = await client.auth.GetToken(
        auth_service_pb2.GetTokenRequest(client_id=client_id, client_secret=secret, agent_type="worker")
    )
    return response.token


async def _refused(client: Client, client_id: str = "acme-full", secret: str = SECRET) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _get_token(client, client_id, secret)
    return code_of(excinfo)


async def _retry_delay(client: Client, client_id: str = "acme-full", secret: str = SECRET) -> float:
    """The retry delay of a refused attempt: RetryInfo and the pushback trailer, which agree."""
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _get_token(client, client_id, secret)
    assert code_of(excinfo) == grpc.StatusCode.RESOURCE_EXHAUSTED, excinfo.value.details()
    assert error_details(excinfo)[0] == "TOO_MANY_FAILED_ATTEMPTS"
    trailers = dict(excinfo.value.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    [retry] = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    info = error_details_pb2.RetryInfo()
    retry.Unpack(info)
    delay_ms = info.retry_delay.ToMilliseconds()
    assert delay_ms > 0
    assert int(trailers["grpc-retry-pushback-ms"]) == delay_ms
    return delay_ms / 1000


async def test_a_client_id_is_refused_with_a_retry_delay_after_its_failures_and_others_are_not(
    clock: ManualClock,
) -> None:
    async with _server(clock, per_client_id=(3, 60.0), per_peer=(100, 1.0)) as client:
        for _ in range(3):
            assert await _refused(client, secret="wrong") == grpc.StatusCode.UNAUTHENTICATED
        # Refused now, even with the right secret: the limit is checked before the secret.
        delay = await _retry_delay(client)
        assert 0 < delay <= 60
        # Other client ids are untouched, the same tenant's and another's.
        assert await _get_token(client, "acme-read")
        assert await _get_token(client, "globex-full")
        clock.advance(delay)
        assert await _get_token(client)  # the right secret works once the delay has passed


async def test_an_unknown_client_id_is_limited_like_a_known_one(clock: ManualClock) -> None:
    async with _server(clock, per_client_id=(2, 60.0), per_peer=(100, 1.0)) as client:
        for client_id in ("acme-full", "nobody"):
            for _ in range(2):
                assert await _refused(client, client_id, "wrong") == grpc.StatusCode.UNAUTHENTICATED
        known = await _retry_delay(client, "acme-full", "wrong")
        unknown = await _retry_delay(client, "nobody", "wrong")
        assert known == unknown


async def test_a_peer_is_refused_after_its_failures_whatever_the_client_id(clock: ManualClock) -> None:
    async with _server(clock, per_client_id=(100, 60.0), per_peer=(3, 10.0)) as client:
        for client_id in ("nobody", "acme-read", "globex-full"):  # one failure each: no id is limited
            assert await _refused(client, client_id, "wrong") == grpc.StatusCode.UNAUTHENTICATED
        delay = await _retry_delay(client, "acme-full")  # this peer is, even with a right secret
        assert 0 < delay <= 10
        clock.advance(delay)
        assert await _get_token(client, "acme-full")


async def test_failures_stop_counting_once_the_bucket_refills(clock: ManualClock) -> None:
    async with _server(clock, per_client_id=(2, 30.0), per_peer=(100, 1.0)) as client:
        for _ in range(10):  # one failure per refill period never reaches the limit
            assert await _refused(client, secret="wrong") == grpc.StatusCode.UNAUTHENTICATED
            clock.advance(30)
        assert await _get_token(client)


async def test_a_remembered_secret_is_refused_once_the_stored_hash_changes(clock: ManualClock) -> None:
    async with _server(clock, per_client_id=(100, 1.0), per_peer=(100, 1.0)) as client:
        assert await _get_token(client)  # verified once: remembered
        assert await _get_token(client)
        rotated = "a-new-secret-after-rotation"
        credentials = [
            Credential(t["tenant_id"], c["client_id"], hash_secret(rotated, cost=2**10))
            for t in tenant_settings()
            for c in t["credentials"]
            if c["client_id"] == "acme-full"
        ]
        client.server.mesh.tokens.replace_credentials(credentials)
        assert await _refused(client) == grpc.StatusCode.UNAUTHENTICATED
        assert await _get_token(client, secret=rotated)
        assert await _refused(client, "acme-read") == grpc.StatusCode.UNAUTHENTICATED  # removed


async def test_a_wrong_secret_is_never_accepted_after_the_right_one_was_remembered(
    clock: ManualClock,
) -> None:
    other_secret = "globex-has-its-own-secret"
    tenants = tenant_settings()
    tenants[1]["credentials"][0]["secret_hash"] = hash_secret(other_secret, cost=2**10)
    async with running_server(clock=clock, tenants=tenants, auth=_limits((100, 1.0), (100, 1.0))) as client:
        assert await _get_token(client, "acme-full")
        assert await _get_token(client, "globex-full", other_secret)
        wrong = ["", SECRET[:-1], SECRET + "x", SECRET.upper(), other_secret, " " + SECRET]
        for secret in wrong:
            if not secret:
                continue  # empty is INVALID_ARGUMENT before any check
            assert await _refused(client, "acme-full", secret) == grpc.StatusCode.UNAUTHENTICATED
        # Right secret, wrong client: acme's remembered secret is not globex's.
        assert await _refused(client, "globex-full", SECRET) == grpc.StatusCode.UNAUTHENTICATED
        assert await _get_token(client, "acme-full")


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:50123", "127.0.0.1"),
        ("ipv6:%5B::1%5D:50123", "::1"),
        ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
        ("unix:/run/mesh.sock", "unix:/run/mesh.sock"),
        ("", ""),
    ],
)
def test_the_peer_is_counted_by_its_host_not_its_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


async def test_a_connected_agent_refused_for_too_many_failures_waits_as_long_as_it_is_told(
    clock: ManualClock,
) -> None:
    async with _server(clock, per_client_id=(1, 30.0), per_peer=(100, 1.0)) as client:

        async def handler(dispatch: Dispatch, reply: Reply) -> None:
            await reply.complete()

        agent = ConnectedAgent(
            client.server.target,
            client_id="acme-full",
            client_secret="wrong",
            agent_type="worker",
            instance_id="w-1",
            handler=handler,
            reconnect_delay_s=0.05,
        )
        running = asyncio.create_task(agent.run())
        try:
            await asyncio.sleep(1.0)  # 20 reconnections' worth at its own delay
        finally:
            await agent.stop()
            await asyncio.wait_for(running, 5)
        samples = await scrape(client)
        method = "/svantic.v1.AuthService/GetToken"
        failed = value(
            samples,
            "grpc_server_call_duration_seconds_count",
            grpc_method=method,
            grpc_status="UNAUTHENTICATED",
        )
        limited = value(
            samples,
            "grpc_server_call_duration_seconds_count",
            grpc_method=method,
            grpc_status="RESOURCE_EXHAUSTED",
        )
        # One wrong secret, one refusal naming a 30 s wait, then it waited instead of hammering.
        assert (failed, limited) == (1, 1)
