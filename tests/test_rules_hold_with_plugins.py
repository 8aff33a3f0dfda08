"""A settings file that replaces every internal agent cannot switch a rule off.

The server is started from a settings.json on disk naming, for each role, a class that does
as little as it may (``tests/plugins_bare.py``); its executor overrides every hook that is
left and tries to skip the rules through them (it shapes a ``yolo_mode`` into what the agent
receives, ranks nothing, and still defines the old ``dispatch`` that ended work at once).
Tool policies (block, require_approval), approvals, the tool-call budget and the dispatch
budget of a session hold all the same, as a client and a real connected agent see them; so do
plan policies, and a plan signed off runs on the agents it names even when the orchestrator
would send its steps elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from grpc import aio

from svantic_grpc.config import load_settings
from svantic_grpc.pb import message_types_pb2
from svantic_grpc.server import MeshServer
from tests._support import SIGNING_ENV, Client, tenant_settings
from tests.agents_connected import data, new_session, running_agent, send, wait_for_state
from tests.agents_inputs import ToolAgent, artifact_texts, pending, pending_ids, resolve
from tests.plugins_bare import DETOURING, EVERY_ROLE, RuleBreakingExecutor

pb = message_types_pb2

DROP_TABLE = {"tool": "db.drop_table", "arguments": {"table": "customers"}}
DELETE_RECORDS = {"tool": "crm.delete_records", "arguments": {"ids": ["r1"]}}
READ_RECORDS = {"tool": "crm.read_records", "arguments": {"ids": ["r1"]}}


@asynccontextmanager
async def server_from_file(tmp_path: Path, settings: dict[str, Any]) -> AsyncIterator[Client]:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    server = MeshServer(load_settings(path), env=SIGNING_ENV)
    async with server, aio.insecure_channel(server.target) as channel:
        yield Client(server, channel)


def tool_calls(*calls: dict[str, Any]) -> list[Any]:
    """Parts sending ``calls`` to the crm agent, which asks approval for each."""
    return ["please run these tools", data({"target_agent": "crm"}), data({"calls": list(calls)})]


async def test_policies_budgets_and_approvals_hold_when_every_internal_agent_is_replaced(
    tmp_path: Path,
) -> None:
    RuleBreakingExecutor.bypasses.clear()
    settings = {
        "grpc_address": "127.0.0.1:0",
        "http_address": "127.0.0.1:0",
        "shutdown_grace_s": 0,
        "tenants": tenant_settings(),
        "internal_agents": EVERY_ROLE,
        "policies": [
            {"name": "no-drops", "match": {"tool": "db.drop_*"}, "enforcement": "block"},
            {"name": "deletes", "match": {"tool": "crm.delete_*"}, "enforcement": "require_approval"},
        ],
        "guardrails": {"max_tool_calls_per_session": 3},
        "dispatch": {"max_dispatches_per_session": 2},
    }
    async with server_from_file(tmp_path, settings) as client:
        tool = ToolAgent()
        async with running_agent(client, tool, agent_type="crm", instance_id="crm-1"):
            session_id = await new_session(client)

            # A blocked tool is denied by its policy; one that needs approval waits for a human,
            # whatever the executor told the agent.
            first = await send(client, session_id, *tool_calls(DROP_TABLE, DELETE_RECORDS))
            assert first.state == pb.MESSAGE_STATE_INPUT_REQUIRED, first.state_reason
            assert {"yolo_mode": True} in tool.dispatches[0].data  # the executor's hooks did run
            [listed] = (await pending(client, session_id)).requests
            assert (listed.tool_call.tool_name, listed.policy) == ("crm.delete_records", "deletes")
            assert tool.approved == [False]

            # The approval holds: only a human's answer lets the call go on.
            await resolve(client, listed.request_id, decision=pb.DECISION_APPROVE)
            first = await wait_for_state(client, session_id, first.message_id, pb.MESSAGE_STATE_COMPLETED)
            assert artifact_texts(first) == [
                "db.drop_table: denied (blocked by policy 'no-drops')",
                "crm.delete_records: approved",
            ]
            assert [a.resolved_by for a in tool.answers] == ["policy:no-drops", "acme-full"]

            # The session's third tool call is its last: the fourth is denied by the budget.
            second = await send(client, session_id, *tool_calls(READ_RECORDS, READ_RECORDS))
            assert second.state == pb.MESSAGE_STATE_COMPLETED, second.state_reason
            texts = artifact_texts(second)
            assert texts[0] == "crm.read_records: approved"
            assert texts[1].startswith("crm.read_records: denied (guardrail")
            assert "budget of 3 tool calls" in tool.answers[-1].reason

            # Two dispatches made: the session's third message fails on the dispatch budget.
            third = await send(client, session_id, *tool_calls(READ_RECORDS))
            assert third.state == pb.MESSAGE_STATE_FAILED
            assert "budget of 2 dispatches" in third.state_reason
            assert len(tool.dispatches) == 2
            assert await pending_ids(client) == []

            # Another session has budgets of its own, and the policies still ask there.
            other = await new_session(client)
            asked = await send(client, other, *tool_calls(DELETE_RECORDS))
            assert asked.state == pb.MESSAGE_STATE_INPUT_REQUIRED, asked.state_reason
            await resolve(client, asked.input_request_ids[0], decision=pb.DECISION_DENY, reason="no")
            denied = await wait_for_state(client, other, asked.message_id, pb.MESSAGE_STATE_COMPLETED)
            assert artifact_texts(denied) == ["crm.delete_records: denied (no)"]
    assert RuleBreakingExecutor.bypasses == []  # the old way around the rules is never taken


def plan(*agent_types: str) -> list[Any]:
    steps = [{"target_agent": t, "text": f"step {i} for {t}"} for i, t in enumerate(agent_types, 1)]
    return ["run this plan", data({"action_data": {"plan": steps}})]


async def test_plan_policies_and_sign_off_hold_when_every_internal_agent_is_replaced(tmp_path: Path) -> None:
    settings = {
        "grpc_address": "127.0.0.1:0",
        "http_address": "127.0.0.1:0",
        "shutdown_grace_s": 0,
        "tenants": tenant_settings(),
        "internal_agents": DETOURING,
        "policies": [
            {"name": "no-db-plans", "scope": "plan", "match": {"agent_type": "db"}, "enforcement": "block"},
            {
                "name": "crm-plans",
                "scope": "plan",
                "match": {"agent_type": "crm"},
                "enforcement": "require_approval",
            },
        ],
    }
    async with server_from_file(tmp_path, settings) as client:
        crm, decoy = ToolAgent(), ToolAgent()
        async with (
            running_agent(client, crm, agent_type="crm", instance_id="crm-1"),
            running_agent(client, decoy, agent_type="decoy", instance_id="decoy-1"),
        ):
            session_id = await new_session(client)
            blocked = await send(client, session_id, *plan("db"))
            assert blocked.state == pb.MESSAGE_STATE_REJECTED
            assert "plan blocked by policy 'no-db-plans'" in blocked.state_reason

            asked = await send(client, session_id, *plan("crm", "crm"))
            assert asked.state == pb.MESSAGE_STATE_INPUT_REQUIRED, asked.state_reason
            [listed] = (await pending(client, session_id)).requests
            assert (listed.kind, listed.policy) == (pb.INPUT_KIND_PLAN_APPROVAL, "crm-plans")
            assert crm.dispatches == [] and decoy.dispatches == []

            await resolve(client, listed.request_id, decision=pb.DECISION_APPROVE)
            done = await wait_for_state(client, session_id, asked.message_id, pb.MESSAGE_STATE_COMPLETED)
            assert done.state_reason == "plan of 2 steps done"
            assert [d.text for d in crm.dispatches] == ["step 1 for crm", "step 2 for crm"]
            assert decoy.dispatches == []  # the orchestrator's detour was not taken
