"""What the webhook adapter sends: an input request as a receiver sees it, never a sensitive value."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from svantic_grpc.core.inputs.model import Form, InputRequest, InputState

__all__ = ["OUTCOME_TYPES", "SENSITIVE_NOTE", "dumps", "iso", "request_json"]

SENSITIVE_NOTE = "This request has sensitive fields; complete it through the API or chat, not a webhook."
OUTCOME_TYPES = {
    InputState.RESOLVED: "input.resolved",
    InputState.EXPIRED: "input.expired",
    InputState.CANCELED: "input.canceled",
}
"""The notification type of each way a request ends."""


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _form_json(form: Form | None) -> dict[str, Any] | None:
    if form is None:
        return None
    fields = []
    for f in form.fields:
        if f.private:
            continue  # nothing of a sensitive field leaves the mesh, not even its label
        item: dict[str, Any] = {
            "name": f.name,
            "type": f.type,
            "label": f.label,
            "required": f.required,
            "sensitive": f.sensitive,
            "options": list(f.options),
        }
        if f.default is not None:
            item["default"] = f.default
        fields.append(item)
    return {
        "title": form.title,
        "description": form.description,
        "sensitive": form.sensitive,
        "fields": fields,
    }


def _public_values(request: InputRequest, values: Mapping[str, Any]) -> dict[str, Any]:
    """Form values minus those of sensitive fields."""
    hidden = {f.name for f in request.form.fields if f.private} if request.form else set()
    return {k: v for k, v in values.items() if k not in hidden}


def request_json(request: InputRequest) -> dict[str, Any]:
    """The request as a webhook receiver sees it; never a sensitive default or value."""
    call = request.tool_call
    data: dict[str, Any] = {
        "id": request.request_id,
        "tenant": request.tenant_id,
        "session": request.session_id,
        "message": request.message_id,
        "kind": request.kind.value,
        "summary": request.summary,
        "state": request.state.value,
        "created_at": iso(request.created_at),
        "expires_at": iso(request.expires_at),
        "tool_call": None
        if call is None
        else {"name": call.tool_name, "arguments": call.arguments, "agent_type": call.agent_type},
        "plan": [
            {"description": p.description, "agent_type": p.agent_type, "tool_name": p.tool_name}
            for p in request.plan
        ],
        "form": _form_json(request.form),
        "allowed_decisions": [d.value for d in request.allowed_decisions],
        "allowed_responders": list(request.allowed_responders),
        "policy": request.policy,
        "sensitive": request.sensitive,
    }
    if request.state is not InputState.PENDING:
        r = request.resolution
        data["outcome_reason"] = request.outcome_reason
        data["resolution"] = (
            None
            if r is None
            else {
                "decision": r.decision.value if r.decision else None,
                "reason": r.reason,
                "confirmed": r.confirmed,
                "values": _public_values(request, r.values),
                "payload": r.payload,
                "resolved_by": r.resolved_by,
                "surface": r.surface.value,
                "resolved_at": iso(r.resolved_at),
            }
        )
    return data


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)
