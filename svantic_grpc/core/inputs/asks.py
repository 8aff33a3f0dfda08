"""What agents ask for, as JSON (A2A data parts) and as a free-text question.

An A2A agent that needs a human puts a data part in its input-required status:

    {"input_request": {
        "kind": "tool_approval" | "confirmation" | "form" | "plan_approval",
        "tool_call": {"tool_name": "crm.delete", "arguments": {...}},
        "form": {"title": "...", "fields": [{"name": "...", "type": "text", "label": "...",
                                             "required": true, "sensitive": false, "options": []}]},
        "plan": [{"description": "...", "agent_type": "...", "tool_name": "..."}],
        "allowed_responders": ["..."]}}

Without one, the agent's words are a question, asked as a one-field form.
"""

from __future__ import annotations

from typing import Any

from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.inputs.model import (
    Form,
    FormField,
    InputAsk,
    InputKind,
    InputRequest,
    PlanItem,
    ToolCall,
)
from svantic_grpc.core.messages.model import Part

__all__ = ["parse_ask", "question_form", "resolution_json"]


def resolution_json(request: InputRequest) -> dict[str, Any]:
    """How a request ended, as the ``input_resolution`` object agents receive."""
    answer: dict[str, Any] = {
        "request_id": request.request_id,
        "kind": request.kind.value,
        "state": request.state.value,
        "tool_name": request.tool_call.tool_name if request.tool_call else "",
    }
    resolution = request.resolution
    if resolution is not None:
        answer.update(
            approved=resolution.approved,
            decision=resolution.decision.value if resolution.decision else "",
            reason=resolution.reason,
            values=dict(resolution.values),
            confirmed=resolution.confirmed,
            payload=dict(resolution.payload),
            resolved_by=resolution.resolved_by,
        )
    return answer


def question_form(question: str) -> Form:
    """A free-text question as a form with one required ``answer`` field."""
    text = question.strip() or "The agent needs your input"
    return Form(title=text, fields=(FormField("answer", "textarea", label=text, required=True),))


def parse_ask(parts: tuple[Part, ...]) -> InputAsk | None:
    """The ``input_request`` data part among ``parts``, if any.

    Raises:
        InvalidArgument: the part is there but malformed (the field is named).
    """
    for part in parts:
        if part.data is not None and "input_request" in part.data:
            return _ask(part.data["input_request"])
    return None


def _ask(raw: Any) -> InputAsk:
    where = "input_request"
    if not isinstance(raw, dict):
        raise InvalidArgument(where, "must be an object")
    try:
        kind = InputKind(raw.get("kind", ""))
    except ValueError:
        kinds = ", ".join(k.value for k in InputKind)
        raise InvalidArgument(f"{where}.kind", f"must be one of {kinds}") from None
    tool_call = None
    if isinstance(raw.get("tool_call"), dict):
        call = raw["tool_call"]
        tool_call = ToolCall(str(call.get("tool_name", "")), dict(call.get("arguments") or {}))
    form = None
    if isinstance(raw.get("form"), dict):
        form = Form(
            title=str(raw["form"].get("title", "")),
            description=str(raw["form"].get("description", "")),
            fields=tuple(
                _field(f, f"{where}.form.fields[{i}]") for i, f in enumerate(raw["form"].get("fields", []))
            ),
        )
    plan = tuple(
        PlanItem(str(s.get("description", "")), str(s.get("agent_type", "")), str(s.get("tool_name", "")))
        for s in raw.get("plan", []) or []
        if isinstance(s, dict)
    )
    responders = tuple(str(r) for r in raw.get("allowed_responders", []) or [])
    return InputAsk(kind, tool_call, form, plan, responders)


def _field(raw: Any, where: str) -> FormField:
    if not isinstance(raw, dict):
        raise InvalidArgument(where, "must be an object")
    return FormField(
        name=str(raw.get("name", "")),
        type=str(raw.get("type", "text")),
        label=str(raw.get("label", "")),
        required=bool(raw.get("required", False)),
        sensitive=bool(raw.get("sensitive", False)),
        options=tuple(str(o) for o in raw.get("options", []) or []),
        default=raw.get("default"),
    )
