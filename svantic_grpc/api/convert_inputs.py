"""Conversions for input requests and their resolutions."""

from __future__ import annotations

from svantic_grpc.api._wkt import exact_object, exact_value, json_text, struct, timestamp, value
from svantic_grpc.core.dispatch import InputAsk
from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.inputs.model import (
    Decision,
    Form,
    FormField,
    InputKind,
    InputRequest,
    InputState,
    PlanItem,
    Resolution,
    Surface,
    ToolCall,
)
from svantic_grpc.pb import message_types_pb2 as pb

KIND = {
    InputKind.TOOL_APPROVAL: pb.INPUT_KIND_TOOL_APPROVAL,
    InputKind.FORM: pb.INPUT_KIND_FORM,
    InputKind.CONFIRMATION: pb.INPUT_KIND_CONFIRMATION,
    InputKind.PLAN_APPROVAL: pb.INPUT_KIND_PLAN_APPROVAL,
}
KIND_FROM_PB: dict[int, InputKind] = {int(v): k for k, v in KIND.items()}
STATE = {
    InputState.PENDING: pb.INPUT_STATE_PENDING,
    InputState.RESOLVED: pb.INPUT_STATE_RESOLVED,
    InputState.EXPIRED: pb.INPUT_STATE_EXPIRED,
    InputState.CANCELED: pb.INPUT_STATE_CANCELED,
}
DECISION = {
    Decision.APPROVE: pb.DECISION_APPROVE,
    Decision.APPROVE_FOR_SESSION: pb.DECISION_APPROVE_FOR_SESSION,
    Decision.APPROVE_ALWAYS: pb.DECISION_APPROVE_ALWAYS,
    Decision.DENY: pb.DECISION_DENY,
}
DECISION_FROM_PB: dict[int, Decision] = {int(v): k for k, v in DECISION.items()}
SURFACE = {
    Surface.GRPC: pb.SURFACE_GRPC,
    Surface.SLACK: pb.SURFACE_SLACK,
    Surface.WEBHOOK: pb.SURFACE_WEBHOOK,
    Surface.CHAT: pb.SURFACE_CHAT,
    Surface.A2A: pb.SURFACE_A2A,
    Surface.POLICY: pb.SURFACE_UNSPECIFIED,
}


def resolution_to_pb(resolution: Resolution) -> pb.Resolution:
    return pb.Resolution(
        decision=DECISION.get(resolution.decision, pb.DECISION_UNSPECIFIED)
        if resolution.decision
        else pb.DECISION_UNSPECIFIED,
        reason=resolution.reason,
        values=struct(dict(resolution.values)),
        values_json=json_text(resolution.values),
        confirmed=resolution.confirmed,
        payload=struct(dict(resolution.payload)),
        payload_json=json_text(resolution.payload),
        resolved_by=resolution.resolved_by,
        surface=SURFACE[resolution.surface],
        resolved_at=timestamp(resolution.resolved_at or None),
    )


def resolution_from_pb(resolution: pb.Resolution, field: str = "resolution") -> Resolution:
    """A caller's answer; who, where and when are set by the mesh, not taken from the caller."""
    decision = None
    if resolution.decision != pb.DECISION_UNSPECIFIED:
        decision = DECISION_FROM_PB.get(resolution.decision)
        if decision is None:
            raise InvalidArgument(f"{field}.decision", f"unknown decision {resolution.decision}")
    return Resolution(
        decision=decision,
        reason=resolution.reason,
        values=exact_object(resolution.values, resolution.values_json, f"{field}.values"),
        confirmed=resolution.confirmed,
        payload=exact_object(resolution.payload, resolution.payload_json, f"{field}.payload"),
    )


def request_to_pb(request: InputRequest, *, redact_sensitive: bool = False) -> pb.InputRequest:
    """The request for API clients (``redact_sensitive`` drops sensitive values, for outside surfaces)."""
    message = pb.InputRequest(
        request_id=request.request_id,
        session_id=request.session_id,
        message_id=request.message_id,
        kind=KIND[request.kind],
        plan=[
            pb.PlanStep(description=s.description, agent_type=s.agent_type, tool_name=s.tool_name)
            for s in request.plan
        ],
        allowed_decisions=[DECISION[d] for d in request.allowed_decisions],
        allowed_responders=request.allowed_responders,
        state=STATE[request.state],
        created_at=timestamp(request.created_at),
        expires_at=timestamp(request.expires_at),
        policy=request.policy,
        summary=request.summary,
        outcome_reason=request.outcome_reason,
    )
    if request.tool_call is not None:
        call = request.tool_call
        message.tool_call.CopyFrom(
            pb.ToolCall(
                tool_name=call.tool_name,
                arguments=struct(dict(call.arguments)),
                arguments_json=json_text(call.arguments),
                agent_type=call.agent_type,
                instance_id=call.instance_id,
            )
        )
    if request.form is not None:
        message.form.CopyFrom(_form_to_pb(request.form))
    if request.resolution is not None:
        resolution = request.resolution
        if redact_sensitive and request.sensitive:
            resolution = Resolution(
                decision=resolution.decision,
                resolved_by=resolution.resolved_by,
                surface=resolution.surface,
                resolved_at=resolution.resolved_at,
            )
        message.resolution.CopyFrom(resolution_to_pb(resolution))
    return message


def _form_to_pb(form: Form) -> pb.Form:
    fields = []
    for f in form.fields:
        field = pb.FormField(
            name=f.name,
            label=f.label,
            type=f.type,
            required=f.required,
            sensitive=f.sensitive,
            options=f.options,
        )
        if f.default is not None and not f.private:
            field.default_value.CopyFrom(value(f.default))
            field.default_value_json = json_text(f.default)
        fields.append(field)
    return pb.Form(title=form.title, description=form.description, fields=fields)


def ask_from_pb(request: pb.InputRequest, field: str = "update.input_request") -> InputAsk:
    """What a connected agent asks for, from the InputRequest it sends."""
    kind = KIND_FROM_PB.get(request.kind)
    if kind is None:
        raise InvalidArgument(f"{field}.kind", "set the kind of input the agent needs")
    tool_call = None
    if request.HasField("tool_call"):
        call = request.tool_call
        arguments = exact_object(call.arguments, call.arguments_json, f"{field}.tool_call.arguments")
        tool_call = ToolCall(call.tool_name, arguments)
    form = None
    if request.HasField("form"):
        form = Form(
            title=request.form.title,
            description=request.form.description,
            fields=tuple(
                FormField(
                    name=f.name,
                    type=f.type or "text",
                    label=f.label,
                    required=f.required,
                    sensitive=f.sensitive,
                    options=tuple(f.options),
                    default=exact_value(
                        f.default_value if f.HasField("default_value") else None,
                        f.default_value_json,
                        f"{field}.form.fields[{i}].default_value",
                    ),
                )
                for i, f in enumerate(request.form.fields)
            ),
        )
    plan = tuple(PlanItem(s.description, s.agent_type, s.tool_name) for s in request.plan)
    return InputAsk(kind, tool_call, form, plan, tuple(request.allowed_responders))
