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
from svantic_grpc.pb import message_service_pb2
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from tests.adapters.fake_slack import fake_slack
from tests.durability._approvals import APPROVE, approval_mesh, ask_to_delete, crm_agent, ended, pb
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


@pytest.mark.timeout(120)
async def test_an_outcome_whose_delivery_died_with_the_process_is_told_after_the_restart(
    tmp_path: Path,
) -> None:
    """Found from outside (review 6, V1): the outcome went to the adapters from memory only, so a
    kill while they retried it left the Slack message with its buttons for good and the webhook
    receiver never told the request ended."""
    hook_port = _free_port()
    async with fake_slack() as slack:
        adapters = {
            "webhook": {
                "targets": [{"url": f"http://127.0.0.1:{hook_port}/hook", "secret_env": "HOOK_OUT"}],
                "callback_token_key_env": "HOOK_TOKEN_KEY",
                "backoff_ms": 200,
            },
            "slack": {"channel": "C1", "api_base_url": slack.base_url},
        }
        mesh = approval_mesh(tmp_path, adapters=adapters)
        mesh.env.update(
            HOOK_OUT=HOOK_SECRET,
            HOOK_TOKEN_KEY=TOKEN_KEY,
            SLACK_BOT_TOKEN="xoxb-test",
            SLACK_SIGNING_SECRET="slack-signing-secret",
        )

        async def deleting(dispatch: Dispatch, reply: Reply) -> None:
            await reply.ask_approval("crm.delete_records", {"ids": [7]})
            await reply.complete()

        agent = crm_agent(mesh.target, deleting)
        running = asyncio.create_task(agent.run())
        notifications: list[dict[str, Any]] = []
        hook: Any = await _webhook_target(hook_port, notifications)
        try:
            with _server(mesh.settings, mesh.env, tmp_path / "first.log") as first:
                await _until_serving(mesh.target, first, tmp_path / "first.log")
                await asyncio.wait_for(agent.connected.wait(), WAIT)
                async with _client(mesh.target) as (channel, md):
                    [request_id] = (await ask_to_delete(channel, md, "s1")).input_request_ids

                    async def announced() -> bool:
                        return any(n["type"] == "input.required" for n in notifications) and bool(
                            slack.of("chat.postMessage")
                        )

                    await _eventually(announced, "the announcement on both surfaces")
                    await asyncio.sleep(0.3)  # where the Slack post is, remembered in the store
                    await hook.cleanup()  # the target goes down and Slack fails every call
                    hook = None
                    slack.failing = True
                    await MessageServiceStub(channel).ResolveInput(
                        message_service_pb2.ResolveInputRequest(request_id=request_id, resolution=APPROVE),
                        metadata=md,
                    )

                    async def update_tried() -> bool:
                        return bool(slack.of("chat.update"))

                    await _eventually(update_tried, "Slack's update tried")
                first.send_signal(signal.SIGKILL)  # the outcome is still being retried in memory
                await asyncio.to_thread(first.wait, WAIT)
            assert [n["type"] for n in notifications] == ["input.required"]
            slack.failing = False
            updates_before = len(slack.of("chat.update"))
            hook = await _webhook_target(hook_port, notifications)
            with _server(mesh.settings, mesh.env, tmp_path / "second.log") as second:
                await _until_serving(mesh.target, second, tmp_path / "second.log")

                async def told() -> bool:
                    return (
                        any(
                            n["type"] == "input.resolved" and n["request"]["id"] == request_id
                            for n in notifications
                        )
                        and len(slack.of("chat.update")) > updates_before
                    )

                await _eventually(told, "the outcome on both surfaces after the restart")
                update = slack.of("chat.update")[-1]
                assert "approve" in update["text"].lower(), update["text"]
                assert not any(block.get("type") == "actions" for block in update.get("blocks", []))
        finally:
            await agent.stop()
            await asyncio.wait_for(running, WAIT)
            if hook is not None:
                await hook.cleanup()
