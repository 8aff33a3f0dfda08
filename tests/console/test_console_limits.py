"""Console sign-in is limited like GetToken: the same failed attempts count, the answer says when to retry."""

from __future__ import annotations

import httpx

from svantic_grpc.core.clock import ManualClock
from tests._support import running_server
from tests.agents_connected import WAIT
from tests.console._console import sign_in_on


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
