"""A client in another language: Node's @grpc/grpc-js, with @grpc/proto-loader reading the
repository's own .proto files, against a real server (``tests/node/client.js``).

It takes a token, is refused without one, opens a session and sees its internal agents, gets
``ALREADY_EXISTS`` and ``INVALID_ARGUMENT`` (with the rich error details in the trailers),
registers a connected agent written in Node and answers a message on its ``Connect`` stream,
sends to an agent that does not exist, lists, closes, and watches every event in order.

The Node packages are pinned by ``tests/node/package-lock.json`` and installed on first use
(``tests/_node.py``). Where node or npm is missing, or the packages cannot be installed, the
test is skipped saying why; under ``CI=true`` it fails instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests._node import require_node, run_node
from tests._support import SECRET, Client

PROTO_DIR = Path(__file__).parent.parent / "proto"


async def _run_node(client: Client) -> dict[str, dict[str, Any]]:
    steps = await run_node("client.js", str(PROTO_DIR), client.server.target, "acme-full", SECRET)
    return {step.pop("step"): step for step in steps}


async def test_a_node_client_and_a_node_connected_agent_use_the_mesh(client: Client) -> None:
    require_node("the Node client test")
    steps = await _run_node(client)

    assert steps["token"] == {"token_type": "Bearer", "tenant_id": "acme", "scopes": ["full"]}
    assert steps["no_token"]["code"] == "UNAUTHENTICATED" and steps["no_token"]["has_details"]
    init = steps["init"]
    assert init["status"] == "SESSION_STATUS_ACTIVE"
    assert len(init["agents"]) == 6 and {r for _, r in init["agents"]} == {"JOIN_REASON_AUTO"}
    assert steps["duplicate"]["code"] == "ALREADY_EXISTS" and steps["duplicate"]["has_details"]
    bad = steps["bad_id"]
    assert bad["code"] == "INVALID_ARGUMENT" and bad["has_details"]
    assert bad["message"].startswith("session_id:")  # the offending field first

    assert steps["connect"]["instance_id"] == "node-echo-1" and steps["connect"]["heartbeat_ms"] > 0
    assert steps["echo"] == {"state": "MESSAGE_STATE_COMPLETED", "outputs": ["node heard: ping"]}
    assert steps["send"]["state"] == "MESSAGE_STATE_FAILED" and "nobody-here" in steps["send"]["reason"]

    assert steps["list"] == {"found": True}
    assert steps["close"] == {"status": "SESSION_STATUS_CLOSED", "closed_now": True}
    watch = steps["watch"]
    assert watch["in_order"] and watch["first"] == 1
    assert {"agent_joined", "agent_left", "artifact_added", "message_state_changed", "status_changed"} <= set(
        watch["kinds"]
    )
    # Everything the session's log holds reached the Node watcher, once each.
    stored = await client.server.mesh.store.list_events(
        tenant_id="acme", session_id=init["session_id"], limit=1000
    )
    assert watch["count"] == len(stored)
