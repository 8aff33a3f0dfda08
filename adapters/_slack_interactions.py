"""What arrives from Slack: the signature check, and the interactions the Slack adapter acts on.

Slack's body is only looked at once its signature holds (``signed``). Each
interaction is then read into a small typed value (``Click``, ``Submission``); one
that lacks what its kind must carry raises ``Malformed`` naming the missing part, so
the HTTP door answers 400 and a Socket Mode listener logs one line, never a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "ACTION",
    "DENY_VIEW",
    "FORM_VIEW",
    "Click",
    "Malformed",
    "Refused",
    "Submission",
    "admit",
    "signed",
]

ACTION = re.compile(r"\Asvantic\.(approve|approve_for_session|deny|confirm|reject|fill)\Z")
"""Anchored with \\A and \\Z: slack-bolt searches with it, and ``$`` would also take a trailing newline."""
DENY_VIEW = "svantic.deny"
FORM_VIEW = "svantic.form"
_WINDOW_S = 5 * 60  # Slack's own replay window (slack-bolt checks the same)

T = TypeVar("T")


class Malformed(ValueError):
    """A signed interaction without what its kind must carry; the message names the part."""


def signed(secret: str, body: bytes, timestamp: str, signature: str, now: float) -> bool:
    """Whether Slack signed ``body`` (v0 signature, timestamp within five minutes of ``now``)."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > _WINDOW_S:
        return False
    base = b"v0:" + timestamp.encode() + b":" + body
    expected = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), signature.encode())


def _at(obj: Any, path: str, kind: type[T]) -> T:
    value = obj
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            value = None
    if not isinstance(value, kind) or value == "":
        raise Malformed(f"{path}: missing or not a {'string' if kind is str else kind.__name__}")
    return value


def _object(text: str, path: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise Malformed(f"{path}: not JSON") from None
    if not isinstance(value, dict):
        raise Malformed(f"{path}: not a JSON object")
    return value


@dataclass(frozen=True)
class Click:
    """A click on one of the adapter's buttons."""

    what: str
    """``approve``, ``approve_for_session``, ``deny``, ``confirm``, ``reject`` or ``fill``."""
    tenant_id: str
    request_id: str
    user: str
    channel: str
    """Where the message is ("" when Slack did not say)."""
    trigger_id: str
    """Opens a modal ("" when Slack sent none)."""
    message_ts: str = ""
    """The clicked message ("" when Slack did not say)."""

    @classmethod
    def read(cls, body: Any) -> Click:
        action_id = _at(body, "actions.0.action_id", str)
        if not ACTION.fullmatch(action_id):
            raise Malformed("actions.0.action_id: not one of this adapter's buttons")
        ref = _object(_at(body, "actions.0.value", str), "actions.0.value")
        channel = body.get("channel")
        trigger_id = body.get("trigger_id")
        container = body.get("container")
        message_ts = container.get("message_ts") if isinstance(container, dict) else None
        return cls(
            what=action_id.removeprefix("svantic."),
            tenant_id=_at(ref, "tenant_id", str),
            request_id=_at(ref, "request_id", str),
            user=_at(body, "user.id", str),
            channel=str(channel.get("id") or "") if isinstance(channel, dict) else "",
            trigger_id=trigger_id if isinstance(trigger_id, str) else "",
            message_ts=message_ts if isinstance(message_ts, str) else "",
        )

    def body(self) -> dict[str, Any]:
        """A ``block_actions`` body holding just this click (``read`` gives it back)."""
        value = json.dumps({"tenant_id": self.tenant_id, "request_id": self.request_id})
        return {
            "type": "block_actions",
            "user": {"id": self.user},
            "channel": {"id": self.channel},
            "container": {"type": "message", "message_ts": self.message_ts},
            "trigger_id": self.trigger_id,
            "actions": [{"type": "button", "action_id": f"svantic.{self.what}", "value": value}],
        }


@dataclass(frozen=True)
class Submission:
    """A submitted modal of the adapter (the Deny reason or a form)."""

    callback_id: str
    tenant_id: str
    request_id: str
    user: str
    channel: str
    state: dict[str, Any]
    """The view's ``state.values``: block id -> action id -> what was entered."""

    @classmethod
    def read(cls, body: Any) -> Submission:
        ref = _object(_at(body, "view.private_metadata", str), "view.private_metadata")
        channel = ref.get("channel")
        return cls(
            callback_id=_at(body, "view.callback_id", str),
            tenant_id=_at(ref, "tenant_id", str),
            request_id=_at(ref, "request_id", str),
            user=_at(body, "user.id", str),
            channel=channel if isinstance(channel, str) else "",
            state=_at(body, "view.state.values", dict),
        )

    def body(self) -> dict[str, Any]:
        """A ``view_submission`` body holding just this submission (``read`` gives it back)."""
        ref = {"tenant_id": self.tenant_id, "request_id": self.request_id, "channel": self.channel}
        view = {
            "type": "modal",
            "callback_id": self.callback_id,
            "private_metadata": json.dumps(ref),
            "state": {"values": self.state},
        }
        return {"type": "view_submission", "user": {"id": self.user}, "view": view}

    @property
    def reason(self) -> str:
        """The Deny modal's reason ("" if none)."""
        entered = self.state.get("reason")
        value = entered.get("value") if isinstance(entered, dict) else None
        text = value.get("value") if isinstance(value, dict) else None
        return text if isinstance(text, str) else ""


class Refused(Exception):
    """A signed body the adapter does not pass on; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def admit(payload: Any) -> dict[str, Any]:
    """The interaction to hand to slack-bolt, rebuilt from what was read; raises ``Refused``.

    Only the adapter's own buttons and modals go on, and only the parts it reads:
    slack-bolt's routing reads the rest of a body with assumptions a signed but odd
    body can break (a 500 and a traceback).
    """
    if not isinstance(payload, dict):
        raise Refused(400, "malformed interaction: the body must be a JSON object")
    try:
        kind = payload.get("type")
        if kind == "block_actions":
            actions = _at(payload, "actions", list)
            if not actions or not all(
                isinstance(a, dict) and isinstance(a.get("action_id"), str) for a in actions
            ):
                raise Malformed("actions: must be objects with an action_id, at least one")
            if any(ACTION.fullmatch(a["action_id"]) for a in actions):
                return Click.read(payload).body()
        elif kind == "view_submission" and _at(payload, "view.callback_id", str) in (DENY_VIEW, FORM_VIEW):
            return Submission.read(payload).body()
    except Malformed as exc:
        raise Refused(400, f"malformed interaction: {exc}") from None
    raise Refused(404, "unhandled request")
