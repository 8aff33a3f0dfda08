"""The webhook receiver reads bodies under the mesh's one rule for JSON (``svantic_grpc._json``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from standardwebhooks import Webhook

from svantic_grpc.core.inputs.model import InputState
from tests.adapters.test_webhook import INBOUND, Build, build, tool_request

__all__ = ["build"]  # the fixture, shared with test_webhook


async def test_a_number_beyond_a_double_is_refused_400_and_changes_nothing(build: Build) -> None:
    h = await build()
    await h.announce(tool_request())
    text = '{"request_id": "r1", "tenant_id": "acme", "decision": "approve", "payload": {"n": 1e999}}'
    stamp = int(time.time())
    signature = Webhook(INBOUND).sign("msg_big", datetime.fromtimestamp(stamp, tz=UTC), text)
    headers = {"webhook-id": "msg_big", "webhook-timestamp": str(stamp), "webhook-signature": signature}
    status, body = await h.post(text, headers)
    assert (status, body["error"]["reason"]) == (400, "MALFORMED_JSON")
    assert "1e999" in body["error"]["message"] and "double" in body["error"]["message"]
    assert h.mesh.state("r1").state is InputState.PENDING
