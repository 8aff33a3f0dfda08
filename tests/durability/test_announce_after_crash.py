"""A request pending across a crash is announced again after the restart (found from outside: the
announcement lived only in the process, so a kill before the webhook target or Slack was reached
left the request unannounced for good, and nobody was asked).

The webhook target is down when the approval is raised; the server is killed while its delivery
retries in memory; the target comes up and the server restarts: the target now gets the
``input.required`` (with the same ``webhook-id`` a first delivery would have had, so a receiver
that got both drops one), and its callback answers the request.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from svantic_grpc.connected_agent import Dispatch, Reply
from tests.durability._approvals import approval_mesh, ask_to_delete, crm_agent, ended, pb
from tests.durability.test_restart import (
    HOOK_SECRET,
    TOKEN_KEY,
    WAIT,
    _client,
    _eventually,
    _free_port,
    _server,
    _until_serving,
    _webhook_target,
)


@pytest.mark.timeout(120)
async def test_a_request_whose_announcement_died_with_the_process_is_announced_after_the_restart(
    tmp_path: Path,
) -> None:
    hook_port = _free_port()
    webhook = {
        "targets": [{"url": f"http://127.0.0.1:{hook_port}/hook", "secret_env": "HOOK_OUT"}],
        "callback_token_key_env": "HOOK_TOKEN_KEY",
    }
    mesh = approval_mesh(tmp_path, adapters={"webhook": webhook})
    mesh.env.update(HOOK_OUT=HOOK_SECRET, HOOK_TOKEN_KEY=TOKEN_KEY)
    decisions: list[bool] = []

    async def deleting(dispatch: Dispatch, reply: Reply) -> None:
        decisions.append(await reply.ask_approval("crm.delete_records", {"ids": [7]}))
        await reply.complete()

    agent = crm_agent(mesh.target, deleting)
    running = asyncio.create_task(agent.run())
    notifications: list[dict[str, Any]] = []
    hook: Any = None
    try:
        with _server(mesh.settings, mesh.env, tmp_path / "first.log") as first:
            await _until_serving(mesh.target, first, tmp_path / "first.log")
            await asyncio.wait_for(agent.connected.wait(), WAIT)
            async with _client(mesh.target) as (channel, md):
                [request_id] = (await ask_to_delete(channel, md, "s1")).input_request_ids
            first.send_signal(signal.SIGKILL)  # the target is down: the announcement is still retrying
            await asyncio.to_thread(first.wait, WAIT)
        assert notifications == []

        hook = await _webhook_target(hook_port, notifications)
        with _server(mesh.settings, mesh.env, tmp_path / "second.log") as second:
            await _until_serving(mesh.target, second, tmp_path / "second.log")

            async def announced() -> str:
                tokens = [
                    n["callback"]["token"]
                    for n in notifications
                    if n["type"] == "input.required" and n["request"]["id"] == request_id
                ]
                return tokens[0] if tokens else ""

            token = await _eventually(announced, "the announcement after the restart")
            answer = {"callback_token": token, "decision": "approve", "responder": "ops"}
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"http://127.0.0.1:{mesh.http_port}/webhooks/receive", json=answer) as response,
            ):
                assert response.status == 200, await response.text()
            async with _client(mesh.target) as (channel, md):
                done = await ended(channel, md, "s1")
                assert done.state == pb.MESSAGE_STATE_COMPLETED, done.state_reason
        assert decisions == [True]
    finally:
        await agent.stop()
        await asyncio.wait_for(running, WAIT)
        if hook is not None:
            await hook.cleanup()
