"""What a webhook answer says: an inbound body read into a resolution, each bad key named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.inputs.model import Decision, Resolution, Surface, check_responder

__all__ = ["Answer"]


@dataclass(frozen=True)
class Answer:
    """A parsed inbound body."""

    request_id: str
    tenant_id: str
    responder: str
    decision: Decision | None
    reason: str
    values: dict[str, Any]
    confirmed: bool
    payload: dict[str, Any]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Answer:
        def text(key: str, default: str = "") -> str:
            value = body.get(key, default)
            if value is None:
                return default
            if not isinstance(value, str):
                raise InvalidArgument(key, "must be a string")
            return value

        def obj(key: str) -> dict[str, Any]:
            value = body.get(key)
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise InvalidArgument(key, "must be an object")
            return value

        decision = text("decision")
        choices = [d.value for d in Decision]
        if decision and decision not in choices:
            raise InvalidArgument("decision", f"must be one of {', '.join(choices)}")
        confirmed = body.get("confirmed", False)
        if not isinstance(confirmed, bool):
            raise InvalidArgument("confirmed", "must be true or false")
        return cls(
            request_id=text("request_id"),
            tenant_id=text("tenant_id"),
            responder=check_responder(text("responder")) or "webhook",
            decision=Decision(decision) if decision else None,
            reason=text("reason"),
            values=obj("values"),
            confirmed=confirmed,
            payload=obj("payload"),
        )

    def content(self) -> dict[str, Any]:
        """What the answer says (its target left out)."""
        return {
            "responder": self.responder,
            "decision": self.decision.value if self.decision else None,
            "reason": self.reason,
            "values": self.values,
            "confirmed": self.confirmed,
            "payload": self.payload,
        }

    @staticmethod
    def content_of(resolution: Resolution) -> dict[str, Any]:
        """``content`` of the answer that made ``resolution``."""
        return {
            "responder": resolution.resolved_by,
            "decision": resolution.decision.value if resolution.decision else None,
            "reason": resolution.reason,
            "values": resolution.values,
            "confirmed": resolution.confirmed,
            "payload": resolution.payload,
        }

    def resolution(self, now: float) -> Resolution:
        return Resolution(
            decision=self.decision,
            reason=self.reason,
            values=self.values,
            confirmed=self.confirmed,
            payload=self.payload,
            resolved_by=self.responder,
            surface=Surface.WEBHOOK,
            resolved_at=now,
        )
