"""Slack in Socket Mode when Slack refuses the socket (an outage, a revoked app token): the mesh
serves all the same, posts its requests through the Web API, and stops on SIGTERM (found from
outside: slack_sdk retries the connection for ever, and the adapter's start waited for it, so the
server never served, /readyz 503 for good, and ignored SIGTERM).

A real server process against a fake Slack on loopback that answers ``apps.connections.open`` with
an error, as Slack does for a revoked token.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from svantic_grpc.connected_agent import Dispatch, Reply
from tests.adapters.fake_slack import fake_slack
from tests.durability._approvals import approval_mesh, ask_to_delete, crm_agent
from tests.durability.test_restart import WAIT, _client, _eventually, _server, _until_serving


@pytest.mark.timeout(90)
async def test_a_refused_socket_leaves_the_mesh_serving_and_stoppable(tmp_path: Path) -> None:
    async with fake_slack() as slack:
        slack.fail_next("apps.connections.open", *["invalid_auth"] * 1000)
        adapters = {"slack": {"channel": "C1", "api_base_url": slack.base_url, "mode": "socket"}}
        mesh = approval_mesh(tmp_path, adapters=adapters)
        mesh.env.update(SLACK_BOT_TOKEN="xoxb-test", SLACK_APP_TOKEN="xapp-revoked")

        async def deleting(dispatch: Dispatch, reply: Reply) -> None:
            await reply.ask_approval("crm.delete_records", {"ids": [7]})
            await reply.complete()

        agent = crm_agent(mesh.target, deleting)
        running = asyncio.create_task(agent.run())
        log = tmp_path / "server.log"
        try:
            with _server(mesh.settings, mesh.env, log) as server:
                await _until_serving(mesh.target, server, log)

                async def tried() -> bool:
                    return bool(slack.of("apps.connections.open"))

                await _eventually(tried, "a try at Slack's socket")
                ready_url = f"http://127.0.0.1:{mesh.http_port}/readyz"
                async with aiohttp.ClientSession() as http, http.get(ready_url) as ready:
                    assert ready.status == 200, await ready.text()
                await asyncio.wait_for(agent.connected.wait(), WAIT)
                async with _client(mesh.target) as (channel, md):
                    await ask_to_delete(channel, md, "s1")

                async def posted() -> bool:
                    return bool(slack.of("chat.postMessage"))

                await _eventually(posted, "the request posted through the Web API")
                server.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(server.wait, 10) == 0, log.read_text()
        finally:
            await agent.stop()
            await asyncio.wait_for(running, WAIT)
