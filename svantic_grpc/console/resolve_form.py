"""A browser form's fields turned into the core's ``Resolution`` (values typed by the contract)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.inputs.checks import form_number
from svantic_grpc.core.inputs.model import Decision, InputKind, InputRequest, Resolution

__all__ = ["FIELD_PREFIX", "resolution_from_form"]

FIELD_PREFIX = "field."


def resolution_from_form(request: InputRequest, form: Mapping[str, str]) -> Resolution:
    """The answer the operator gave; errors name the offending form field."""
    action = form.get("action", "")
    reason = form.get("reason", "").strip()
    if request.kind is InputKind.FORM:
        return Resolution(values=_values(request, form), reason=reason)
    try:
        decision = Decision(action)
    except ValueError:
        raise InvalidArgument("action", f"{action!r} is not a decision") from None
    if request.kind is InputKind.CONFIRMATION:
        return Resolution(decision=decision, reason=reason, confirmed=decision is Decision.APPROVE)
    return Resolution(decision=decision, reason=reason)


def _values(request: InputRequest, form: Mapping[str, str]) -> dict[str, Any]:
    assert request.form is not None
    values: dict[str, Any] = {}
    for field in request.form.fields:
        raw = form.get(FIELD_PREFIX + field.name)
        if field.type == "checkbox":
            values[field.name] = raw is not None
            continue
        if raw is None or raw == "":
            continue
        if field.type == "number":
            try:
                values[field.name] = form_number(raw)
            except ValueError as exc:
                raise InvalidArgument(f"resolution.values.{field.name}", str(exc)) from None
        else:
            values[field.name] = raw
    return values
