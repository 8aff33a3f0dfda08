"""A follow-up A2A message on an input-required task, read as the answer to what it waits on.

The answer is a data part ``{"input_resolution": {...}}`` (the same object the mesh
sends hosted agents; ``{"resolution": {...}}`` is accepted too) with any of
``request_id`` (default: the request the task waits on), ``decision`` (``approve``,
``approve_for_session``, ``approve_always``, ``deny``), ``reason``, ``values`` (form
answers), ``confirmed`` and ``payload``. Plain text also answers: a question (a form
with one ``answer`` field) takes the text as its answer, an approval takes a
decision's name, a confirmation ``yes`` or ``no``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.inputs.model import Decision, InputKind, InputRequest, Resolution
from svantic_grpc.core.messages.model import Part

__all__ = ["answer_from"]

_FIELD = "message.parts"
_YES = frozenset({"yes", "y", "true", "confirm", "confirmed", "ok"})
_NO = frozenset({"no", "n", "false", "cancel"})


def answer_from(
    parts: tuple[Part, ...], waiting: InputRequest, requests: Sequence[InputRequest]
) -> tuple[str, Resolution]:
    """The request answered and the answer; ``InvalidArgument`` names what is wrong."""
    for index, part in enumerate(parts):
        if part.data is None:
            continue
        for key in ("input_resolution", "resolution"):
            if key in part.data:
                return _structured(part.data[key], f"{_FIELD}[{index}].data.{key}", waiting, requests)
    text = "\n".join(p.text for p in parts if p.text is not None).strip()
    if not text:
        raise InvalidArgument(
            _FIELD,
            f"answer input request {waiting.request_id!r} ({waiting.summary}) with text or a data part "
            '{"input_resolution": {"decision": "approve"}} (or "values" for a form)',
        )
    return waiting.request_id, _from_text(text, waiting)


def _structured(
    raw: Any, where: str, waiting: InputRequest, requests: Sequence[InputRequest]
) -> tuple[str, Resolution]:
    if not isinstance(raw, dict):
        raise InvalidArgument(where, "must be an object")
    request_id = raw.get("request_id") or waiting.request_id
    if not isinstance(request_id, str) or request_id not in {r.request_id for r in requests}:
        raise InvalidArgument(f"{where}.request_id", f"{request_id!r} is not a request of this task")
    decision = None
    if raw.get("decision"):
        try:
            decision = Decision(raw["decision"])
        except ValueError:
            names = ", ".join(d.value for d in Decision)
            raise InvalidArgument(f"{where}.decision", f"must be one of {names}") from None
    for key, kind in (("values", dict), ("payload", dict), ("reason", str), ("confirmed", bool)):
        if key in raw and not isinstance(raw[key], kind):
            raise InvalidArgument(
                f"{where}.{key}", f"must be a {'object' if kind is dict else kind.__name__}"
            )
    return request_id, Resolution(
        decision=decision,
        reason=raw.get("reason", ""),
        values=dict(raw.get("values") or {}),
        confirmed=bool(raw.get("confirmed", False)),
        payload=dict(raw.get("payload") or {}),
    )


def _from_text(text: str, request: InputRequest) -> Resolution:
    word = text.lower()
    if request.kind is InputKind.FORM and request.form is not None:
        names = [f.name for f in request.form.fields]
        if names == ["answer"]:
            return Resolution(values={"answer": text})
        raise InvalidArgument(
            _FIELD,
            f'the form asks for {", ".join(names)}: answer with a data part {{"input_resolution": '
            '{"values": {...}}}',
        )
    if request.kind is InputKind.CONFIRMATION:
        if word in _YES or word in _NO:
            return Resolution(confirmed=word in _YES)
        raise InvalidArgument(_FIELD, "answer a confirmation with yes or no")
    decisions = {d.value: d for d in request.allowed_decisions}
    first, _, reason = text.partition(":")
    decision = decisions.get(first.strip().lower())
    if decision is None:
        raise InvalidArgument(_FIELD, f"answer with one of {', '.join(decisions)} (deny: <reason>)")
    return Resolution(decision=decision, reason=reason.strip())
