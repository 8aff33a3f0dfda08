"""Input requests and their resolutions."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from svantic_grpc.core._validate import check_unicode
from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.frozen import freeze

__all__ = [
    "APPROVAL_DECISIONS",
    "FIELD_TYPES",
    "MAX_RESPONDER_CHARS",
    "Decision",
    "Form",
    "FormField",
    "InputAsk",
    "InputKind",
    "InputRequest",
    "InputState",
    "PlanItem",
    "Resolution",
    "Surface",
    "ToolCall",
    "check_responder",
    "responder_allowed",
]

MAX_RESPONDER_CHARS = 256
"""Longest name of who answers (a webhook body's ``responder``, a subject, a Slack user): it is
kept in the request, its audit entry and its event, shown in Slack and sent to webhooks."""


def check_responder(responder: str, *, field: str = "responder") -> str:
    """``responder`` if it is a name of at most ``MAX_RESPONDER_CHARS``, else ``InvalidArgument``."""
    if len(responder) > MAX_RESPONDER_CHARS:
        raise InvalidArgument(field, f"is {len(responder)} characters long; at most {MAX_RESPONDER_CHARS}")
    return check_unicode(field, responder)


class InputKind(enum.Enum):
    TOOL_APPROVAL = "tool_approval"
    FORM = "form"
    CONFIRMATION = "confirmation"
    PLAN_APPROVAL = "plan_approval"


class InputState(enum.Enum):
    PENDING = "pending"
    RESOLVED = "resolved"
    EXPIRED = "expired"
    CANCELED = "canceled"


class Decision(enum.Enum):
    APPROVE = "approve"
    APPROVE_FOR_SESSION = "approve_for_session"
    APPROVE_ALWAYS = "approve_always"
    DENY = "deny"

    @property
    def approves(self) -> bool:
        return self is not Decision.DENY


class Surface(enum.Enum):
    """Where a resolution came from."""

    GRPC = "grpc"
    SLACK = "slack"
    WEBHOOK = "webhook"
    CHAT = "chat"
    A2A = "a2a"
    """A follow-up A2A message on the input-required task (the mesh's A2A ingress)."""
    CONSOLE = "console"
    """The operator console (browser pages on the HTTP server)."""
    POLICY = "policy"
    """Decided by a policy (allow, block, yolo, an earlier grant) without a human."""


APPROVAL_DECISIONS = (Decision.APPROVE, Decision.APPROVE_FOR_SESSION, Decision.APPROVE_ALWAYS, Decision.DENY)
GRANTING_DECISIONS = (Decision.APPROVE_FOR_SESSION, Decision.APPROVE_ALWAYS)
"""Answers that outlive their request: later calls of the tool (in the session, or ever) need no human."""
FIELD_TYPES = frozenset({"action", "text", "select", "number", "password", "textarea", "checkbox", "date"})


@dataclass(frozen=True)
class ToolCall:
    """A tool call awaiting approval or confirmation."""

    tool_name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    agent_type: str = ""
    instance_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "arguments", freeze(self.arguments))


@dataclass(frozen=True)
class FormField:
    name: str
    type: str = "text"
    label: str = ""
    required: bool = False
    sensitive: bool = False
    options: tuple[str, ...] = ()
    default: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "default", freeze(self.default))

    @property
    def private(self) -> bool:
        """Never shown outside the mesh (Slack, webhooks): flagged sensitive, or a password."""
        return self.sensitive or self.type == "password"


@dataclass(frozen=True)
class Form:
    title: str = ""
    description: str = ""
    fields: tuple[FormField, ...] = ()

    @property
    def sensitive(self) -> bool:
        """True when any field must never leave the mesh (Slack, webhooks); passwords always."""
        return any(f.private for f in self.fields)


@dataclass(frozen=True)
class PlanItem:
    """One step of a plan awaiting sign-off."""

    description: str
    agent_type: str = ""
    tool_name: str = ""


@dataclass(frozen=True)
class InputAsk:
    """What an agent asks a human for (with an ``input-required`` update)."""

    kind: InputKind
    tool_call: ToolCall | None = None
    form: Form | None = None
    plan: tuple[PlanItem, ...] = ()
    allowed_responders: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resolution:
    """A human's (or a policy's) answer."""

    decision: Decision | None = None
    reason: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    confirmed: bool = False
    payload: dict[str, Any] = field(default_factory=dict)
    resolved_by: str = ""
    surface: Surface = Surface.GRPC
    resolved_at: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", freeze(self.values))
        object.__setattr__(self, "payload", freeze(self.payload))

    @property
    def approved(self) -> bool:
        """Whether the agent may go ahead (approvals, confirmations, plans; a form counts as given)."""
        if self.decision is not None:
            return self.decision.approves
        return self.confirmed or bool(self.values)


@dataclass(frozen=True)
class InputRequest:
    """What a message waits on while it is input-required."""

    tenant_id: str
    request_id: str
    session_id: str
    message_id: str
    kind: InputKind
    created_at: float
    expires_at: float
    tool_call: ToolCall | None = None
    form: Form | None = None
    plan: tuple[PlanItem, ...] = ()
    allowed_decisions: tuple[Decision, ...] = APPROVAL_DECISIONS
    allowed_responders: tuple[str, ...] = ()
    policy: str = ""
    state: InputState = InputState.PENDING
    resolution: Resolution | None = None
    outcome_reason: str = ""
    """Why it ended when nobody resolved it (expired, canceled)."""
    outcome_told: bool = False
    """Ended, and every adapter has been told its outcome. An ended request is written untold (in
    the write that ends it) and marked told once the adapters returned, so that one whose outcome
    was in flight when the process died is told again after the restart (at least once)."""
    version: int = 0

    def may_answer(self, responder: str, surface: Surface) -> bool:
        """Whether ``responder`` may answer this request through ``surface``: anyone when it names
        no responders."""
        return not self.allowed_responders or responder_allowed(responder, self.allowed_responders, surface)

    @property
    def grants_always(self) -> bool:
        """Answered ``approve_always``: the tenant's grant, kept when its session is deleted."""
        return self.resolution is not None and self.resolution.decision is Decision.APPROVE_ALWAYS

    @property
    def sensitive(self) -> bool:
        """Must be answered through the API or chat, never shown on Slack or webhooks."""
        return self.form is not None and self.form.sensitive

    def for_watchers(self) -> InputRequest:
        """The request as its session's events carry it (to every watcher, read-only ones too, and
        into the stored event log): without what was entered in its private fields (sensitive or
        password) nor their defaults. Only the agent's own dispatch gets those, read from the store."""
        if not self.sensitive or self.form is None:
            return self
        private = {f.name for f in self.form.fields if f.private}
        form = replace(
            self.form,
            fields=tuple(replace(f, default=None) if f.private else f for f in self.form.fields),
        )
        resolution = self.resolution
        if resolution is not None and private & set(resolution.values):
            values = {k: v for k, v in resolution.values.items() if k not in private}
            resolution = replace(resolution, values=values)
        return replace(self, form=form, resolution=resolution)

    @property
    def summary(self) -> str:
        """One line for a person: what is asked."""
        if self.kind is InputKind.TOOL_APPROVAL and self.tool_call:
            return f"approve tool call {self.tool_call.tool_name}"
        if self.kind is InputKind.CONFIRMATION and self.tool_call:
            return f"confirm tool call {self.tool_call.tool_name}"
        if self.kind is InputKind.PLAN_APPROVAL:
            return f"sign off a plan of {len(self.plan)} steps"
        if self.form is not None and [f.name for f in self.form.fields] == ["answer"]:
            return f"answer: {self.form.title}"  # an agent's free-text question
        return f"fill in {self.form.title if self.form and self.form.title else 'a form'}"


def speaks_for(responder: str) -> Surface | None:
    """The surface ``responder`` names as its prefix (``slack:U123``), if it names one.

    A responder so named may answer only through that surface: an answer through a webhook that
    calls itself ``slack:UBOSS`` would otherwise pass for that Slack user wherever the request's
    allowed responders name them, and the audit would record it so.
    """
    prefix, colon, _ = responder.partition(":")
    if not colon:
        return None
    try:
        return Surface(prefix)
    except ValueError:
        return None


def responder_allowed(responder: str, allowed: Iterable[str], surface: Surface) -> bool:
    """Whether ``responder``, answering through ``surface``, is one of ``allowed``.

    An entry ``surface:name`` (``slack:U123``) names a responder of that surface only; an entry
    without a surface (``U123``, ``ops@acme``) names one on every surface, including the name a
    webhook answer gives. The responder's own prefix of the answer's surface belongs to the
    surface (``slack:U123`` through Slack is ``U123``); anything else is part of its name, so a
    webhook answer calling itself ``x:slack:U123`` is never Slack's ``U123``.
    """
    own = f"{surface.value}:"
    name = responder[len(own) :] if responder.startswith(own) else responder
    qualified = own + name
    return any(a == qualified or (a == name and speaks_for(a) is None) for a in allowed)
