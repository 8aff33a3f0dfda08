"""The console behind several replicas (two servers in this process on one PostgreSQL schema):
a browser signed in on one is signed in on every one, signing out on one signs out everywhere,
and an open queue page on one replica hears of requests raised and answered on another."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from tests import _postgres
from tests._support import Client
from tests.agents_connected import WAIT, new_session, running_agent, send
from tests.agents_inputs import ToolAgent
from tests.console._console import DELETES, csrf_of, sign_in_on, tool_call_parts


@pytest.fixture
async def replicas() -> AsyncIterator[list[Client]]:
    async with _postgres.running_replicas(2, policies=[DELETES]) as servers:
        yield servers


def _browser(replica: Client, cookie: str = "") -> httpx.AsyncClient:
    cookies = {"svantic_console": cookie} if cookie else None
    return httpx.AsyncClient(base_url=replica.server.http.url, timeout=WAIT, cookies=cookies)


async def test_a_login_made_on_one_replica_holds_on_the_other_until_signed_out_there(
    replicas: list[Client],
) -> None:
    a, b = replicas
    tool = ToolAgent()
    async with running_agent(a, tool, agent_type="crm", instance_id="crm-1"), _browser(a) as on_a:
        assert (await sign_in_on(on_a, "acme-full")).status_code == 303
        cookie = on_a.cookies.get("svantic_console") or ""
        csrf = csrf_of((await on_a.get("/console/queue")).text)
        session_id = await new_session(a)
        asked = await send(a, session_id, *tool_call_parts("crm.delete_records", {"ids": ["r1"]}))
        [request_id] = asked.input_request_ids
        async with _browser(b, cookie) as on_b:
            queue = await on_b.get("/console/queue")
            assert queue.status_code == 200 and request_id in queue.text  # no new sign-in on b
            assert csrf_of(queue.text) == csrf
            answered = await on_b.post(
                f"/console/inputs/{request_id}/resolve", data={"csrf": csrf, "action": "approve"}
            )
            assert answered.status_code == 200 and "approve" in answered.text, answered.text
            out = await on_b.post("/console/logout", data={"csrf": csrf})
            assert out.status_code == 303
        again = await on_a.get("/console/queue")  # the same cookie, on the other replica
        assert again.status_code == 303 and again.headers["location"] == "/console/login"
        assert (await on_a.post("/console/logout", data={"csrf": csrf})).status_code == 401


async def test_a_forged_or_foreign_cookie_is_not_a_login(replicas: list[Client]) -> None:
    a, _ = replicas
    async with _browser(a) as on_a:
        assert (await sign_in_on(on_a, "acme-full")).status_code == 303
        cookie = on_a.cookies.get("svantic_console") or ""
    header, payload, signature = cookie.split(".")
    tampered = f"{header}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    for forged in (tampered, f"{header}.{payload}.", "not-a-login"):
        async with _browser(a, forged) as browser:
            page = await browser.get("/console/queue")
            assert page.status_code == 303 and page.headers["location"] == "/console/login"


async def test_an_open_queue_on_one_replica_hears_of_a_request_raised_on_the_other(
    replicas: list[Client],
) -> None:
    a, b = replicas
    tool = ToolAgent()
    async with running_agent(a, tool, agent_type="crm", instance_id="crm-1"), _browser(b) as on_b:
        assert (await sign_in_on(on_b, "acme-full")).status_code == 303
        received: list[str] = []
        changed = asyncio.Event()

        async def follow() -> None:
            async with on_b.stream("GET", "/console/queue/events") as response:
                assert response.status_code == 200
                async for chunk in response.aiter_text():
                    received.append(chunk)
                    if "event: queue" in chunk:
                        changed.set()

        reader = asyncio.create_task(follow())
        try:
            await asyncio.sleep(0.5)  # the page is open before the request is raised
            session_id = await new_session(a)
            asked = await send(a, session_id, *tool_call_parts("crm.delete_records", {"ids": ["r1"]}))
            [request_id] = asked.input_request_ids
            await asyncio.wait_for(changed.wait(), WAIT)
            items = await on_b.get("/console/queue/items")
            assert request_id in items.text
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
