"""What an input request and its answer must hold, and what a late answer is told.

``check_ask`` checks a request before it is raised and ``checked_resolution`` an answer
against what the request asks (an approval's decision, a form's fields and their types);
their errors name the offending field. ``already_answered`` is what every answer after the
first gets: who answered, through which surface, when and how. ``form_number`` reads a number
field typed by a person (the console, a Slack modal) the way the gRPC API reads JSON.
"""

from __future__ import annotations

import datetime
import math
import re
from dataclasses import replace
from typing import Any

from svantic_grpc.core._validate import check_reason, json_bytes
from svantic_grpc.core.errors import AlreadyResolved, InvalidArgument
from svantic_grpc.core.inputs.model import (
    FIELD_TYPES,
    Decision,
    Form,
    InputKind,
    InputRequest,
    InputState,
    PlanItem,
    Resolution,
    ToolCall,
)

__all__ = ["already_answered", "check_ask", "checked_resolution", "form_number", "outcome_text"]

_INT64 = 2**63
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def form_number(text: str) -> int | float:
    """A number typed into a form field, exactly: an integer stays the integer written (beyond a
    double's 2**53 too), within 64 bits, and anything else must be a finite JSON number.

    Raises:
        ValueError: not a number as JSON writes one, an integer beyond 64 bits, or too large
            for a double (``1e400``); the message says which.
    """
    written = text.strip()
    if not _JSON_NUMBER.fullmatch(written):
        raise ValueError("must be a number (digits, an optional sign, fraction and exponent)")
    if written.lstrip("-").isdigit():
        number = int(written)
        if not -_INT64 <= number < _INT64:
            raise ValueError("must fit in 64 bits")
        return number
    value = float(written)
    if not math.isfinite(value):
        raise ValueError("is too large a number")
    return value


def already_answered(request: InputRequest) -> AlreadyResolved:
    resolution = request.resolution
    if resolution is not None:
        when = datetime.datetime.fromtimestamp(resolution.resolved_at, datetime.UTC).isoformat(
            timespec="seconds"
        )
        message = (
            f"input request {request.request_id!r} was already answered by {resolution.resolved_by} "
            f"via {resolution.surface.value} at {when} ({outcome_text(request)})"
        )
        metadata = {
            "resolved_by": resolution.resolved_by,
            "surface": resolution.surface.value,
            "resolved_at": when,
            "outcome": outcome_text(request),
        }
    else:
        ended = request.outcome_reason or request.state.value
        message = f"input request {request.request_id!r} already ended: {ended}"
        metadata = {"state": request.state.value}
    return AlreadyResolved(message, metadata=metadata)


def outcome_text(request: InputRequest) -> str:
    """How a request ended, in a few words (``approve``, ``deny: <reason>``, ``expired``...)."""
    resolution = request.resolution
    if request.state is not InputState.RESOLVED or resolution is None:
        return request.outcome_reason or request.state.value
    if resolution.decision is Decision.DENY:
        return f"deny: {resolution.reason}"
    if resolution.decision is not None:
        return str(resolution.decision.value)
    if request.kind is InputKind.CONFIRMATION:
        return "confirmed" if resolution.confirmed else "not confirmed"
    return "form submitted"


MAX_ASK_BYTES = 256 * 1024
"""What one input request asks at most (its tool call, form or plan): the pending queue, the
request's events and the answers that carry it stay readable with gRPC's default 4 MB limit."""
MAX_ANSWER_BYTES = 512 * 1024
"""What one answer's values and payload carry at most (as JSON; they go out twice, as a Struct
and as exact text), so the answer, its event and what the agent gets stay readable."""


def check_ask(
    kind: InputKind, tool_call: ToolCall | None, form: Form | None, plan: tuple[PlanItem, ...]
) -> None:
    asked = json_bytes((tool_call, form, plan))
    if asked > MAX_ASK_BYTES:
        raise InvalidArgument(
            "input_request", f"carries about {asked} bytes (tool call, form, plan); at most {MAX_ASK_BYTES}"
        )
    if kind in (InputKind.TOOL_APPROVAL, InputKind.CONFIRMATION) and (
        tool_call is None or not tool_call.tool_name
    ):
        raise InvalidArgument(
            "input_request.tool_call.tool_name", "is required for approvals and confirmations"
        )
    if kind is InputKind.PLAN_APPROVAL and not plan:
        raise InvalidArgument("input_request.plan", "a plan approval needs the plan's steps")
    if kind is InputKind.FORM:
        if form is None or not form.fields:
            raise InvalidArgument("input_request.form.fields", "a form needs at least one field")
        names: set[str] = set()
        for index, field in enumerate(form.fields):
            where = f"input_request.form.fields[{index}]"
            if not field.name or field.name in names:
                raise InvalidArgument(f"{where}.name", "is required and must be unique within the form")
            names.add(field.name)
            if field.type not in FIELD_TYPES:
                raise InvalidArgument(f"{where}.type", f"must be one of {', '.join(sorted(FIELD_TYPES))}")
            if field.type == "select" and not field.options:
                raise InvalidArgument(f"{where}.options", "a select field needs options")


def check_answer_size(resolution: Resolution) -> None:
    """Hold an answer, from any surface, to ``MAX_REASON_CHARS`` and ``MAX_ANSWER_BYTES``."""
    check_reason("resolution.reason", resolution.reason)
    for name in ("values", "payload"):
        carried = json_bytes(getattr(resolution, name))
        if carried > MAX_ANSWER_BYTES:
            raise InvalidArgument(
                f"resolution.{name}", f"carries about {carried} bytes; at most {MAX_ANSWER_BYTES}"
            )


def checked_resolution(request: InputRequest, resolution: Resolution) -> Resolution:
    """The resolution, validated against what the request asks; errors name the field."""
    if request.kind in (InputKind.TOOL_APPROVAL, InputKind.PLAN_APPROVAL):
        if resolution.decision is None:
            raise InvalidArgument("resolution.decision", "is required to answer an approval")
        if resolution.decision not in request.allowed_decisions:
            allowed = ", ".join(d.value for d in request.allowed_decisions)
            raise InvalidArgument(
                "resolution.decision", f"{resolution.decision.value} is not allowed here ({allowed})"
            )
        if resolution.decision is Decision.DENY and not resolution.reason.strip():
            raise InvalidArgument("resolution.reason", "a denial needs a reason the agent can act on")
        return resolution
    if request.kind is InputKind.CONFIRMATION:
        if resolution.decision is None:
            return resolution
        if resolution.decision not in request.allowed_decisions:
            raise InvalidArgument(
                "resolution.decision", "a confirmation takes approve or deny (or confirmed)"
            )
        return replace(resolution, confirmed=resolution.decision is Decision.APPROVE)
    form = request.form
    assert form is not None
    values = dict(resolution.values)
    known = {f.name for f in form.fields}
    for name in values:
        if name not in known:
            raise InvalidArgument(f"resolution.values.{name}", "is not a field of this form")
    for field in form.fields:
        where = f"resolution.values.{field.name}"
        value = values.get(field.name)
        if value is None or value == "":
            if field.required:
                raise InvalidArgument(where, "is required")
            continue
        _check_value(where, field.type, field.options, value)
    return replace(resolution, decision=None)


def _check_value(where: str, kind: str, options: tuple[str, ...], value: Any) -> None:
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(where, "must be a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(where, "must be a finite number")
        if isinstance(value, int) and not -_INT64 <= value < _INT64:
            raise InvalidArgument(where, "must fit in 64 bits")
    if kind == "checkbox" and not isinstance(value, bool):
        raise InvalidArgument(where, "must be true or false")
    if kind in ("text", "textarea", "password", "action", "select", "date") and not isinstance(value, str):
        raise InvalidArgument(where, "must be a string")
    if kind == "select" and value not in options:
        raise InvalidArgument(where, f"must be one of {', '.join(options)}")
    if kind == "date":
        try:
            datetime.date.fromisoformat(value)
        except ValueError:
            raise InvalidArgument(where, "must be a date like 2026-11-22") from None
