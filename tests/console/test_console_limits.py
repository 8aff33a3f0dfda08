"""Console sign-in is limited like GetToken: the same failed attempts count, the answer says when to retry."""

from __future__ import annotations

import contextlib

import httpx

from svantic_grpc.core.clock import ManualClock
from svantic_grpc.pb import session_service_pb2
from tests._support import running_server
from tests.agents_connected import WAIT
from tests.console._console import sign_in_on, signed_in


async def test_sign_in_after_too_many_wrong_secrets_is_429_with_retry_after(clock: ManualClock) -> None:
    limits = {
        "failed_attempts": {
            "per_client_id": {"burst": 2, "refill_s": 45},
            "per_peer": {"burst": 50, "refill_s": 1},
        }
    }
    async with (
        running_server(clock=clock, auth=limits) as client,
        httpx.AsyncClient(base_url=client.server.http.url, timeout=WAIT) as http,
    ):
        for _ in range(2):
            assert (await sign_in_on(http, "acme-full", secret="wrong")).status_code == 401
        refused = await sign_in_on(http, "acme-full")
        assert refused.status_code == 429
        assert "too many failed attempts" in refused.text
        delay = int(refused.headers["retry-after"])
        assert 0 < delay <= 45
        assert (await sign_in_on(http, "acme-read")).status_code == 303  # another credential is not limited
        clock.advance(delay)
        assert (await sign_in_on(http, "acme-full")).status_code == 303


_reading: list[object] = []


async def _first_chunk(http: httpx.AsyncClient, path: str, stack: contextlib.AsyncExitStack) -> str:
    """The stream's first chunk; the stream stays open until ``stack`` closes."""
    response = await stack.enter_async_context(http.stream("GET", path))
    assert response.status_code == 200
    chunks = response.aiter_text()
    _reading.append(chunks)  # an iterator let go of would close the response with it
    stack.callback(_reading.remove, chunks)
    return await anext(chunks)


async def test_the_consoles_live_streams_count_against_the_tenants_allowance() -> None:
    """Found from outside (review 7, W8): the queue's stream was not counted (500 held by one read
    credential, ~35 KB each), and a session's stream past the limit ended in silence, reopened by
    the browser every two seconds. Both count now, and a refusal is said on the stream."""
    async with running_server(max_streams_per_tenant=2) as client, signed_in(client, "acme-read") as web:
        session_id = (
            await client.sessions.InitSession(
                session_service_pb2.InitSessionRequest(), metadata=await client.md()
            )
        ).session.session_id
        async with contextlib.AsyncExitStack() as held:
            for _ in range(2):
                assert "retry:" in await _first_chunk(web.http, "/console/queue/events", held)
            # Refused, each stream says why and ends (the page's script stops following).
            queue = (await web.http.get("/console/queue/events")).text
            assert queue.startswith("event: refused\n") and "max_streams_per_tenant" in queue
            timeline = (await web.http.get(f"/console/sessions/{session_id}/events")).text
            assert "event: refused\n" in timeline and "event: end" not in timeline
        async with contextlib.AsyncExitStack() as again:  # the places were given back
            assert "retry:" in await _first_chunk(web.http, "/console/queue/events", again)
            assert "retry:" in await _first_chunk(web.http, f"/console/sessions/{session_id}/events", again)
