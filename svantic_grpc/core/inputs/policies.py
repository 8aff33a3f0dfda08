"""Tool policies, session grants, tenant overrides and guardrail budgets.

A tool call is checked against the policies whose scope, tool pattern and agent
type match; the lowest priority number wins, and a policy with an evaluator
counts only when the evaluator fires (for example "more than N items"). No
matching policy means ``allow``. ``approve_for_session`` grants a tool for the
rest of one session; ``approve_always`` turns a policy's ``require_approval``
into ``allow`` for the tenant. ``yolo_mode`` approves what would need approval,
never what is blocked.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from svantic_grpc.core.inputs.model import ToolCall

__all__ = ["BulkEvaluator", "Enforcement", "Policy", "PolicyEngine", "Verdict", "approved_always"]


class Enforcement(enum.Enum):
    BLOCK = "block"
    ALLOW = "allow"
    REQUIRE_APPROVAL = "require_approval"
    AUDIT = "audit"
    NOTIFY = "notify"


@dataclass(frozen=True)
class BulkEvaluator:
    """Fires when the call touches more than ``threshold`` items.

    The count is the length of the list argument ``argument`` (or its value when
    it is a number). An argument it cannot count (missing, a string such as ``"all"``,
    an object such as a filter) fires too: the calls that touch everything are the
    ones an approval exists for, and the agent chooses the shape.
    """

    argument: str
    threshold: int

    def fires(self, call: ToolCall) -> bool:
        value: Any = call.arguments.get(self.argument)
        if isinstance(value, list):
            return len(value) > self.threshold
        if isinstance(value, int | float) and not isinstance(value, bool):
            return bool(value > self.threshold)
        return True


def approved_always(policy: str) -> str:
    """Why a tool call a policy gates runs without a human: the tenant approved it always."""
    return f"policy {policy!r} approved always for the tenant"


@dataclass(frozen=True)
class Policy:
    """One rule about tool calls (scope ``tool``) or plans (scope ``plan``)."""

    name: str
    enforcement: Enforcement
    scope: str = "tool"
    tool: str = "*"
    """Tool name pattern (``fnmatch``), e.g. ``crm.delete_*``."""
    agent_type: str = "*"
    """Agent type pattern."""
    priority: int = 100
    approvers: tuple[str, ...] = ()
    """Who may answer an approval this policy asks for; empty means anyone in the tenant."""
    evaluator: BulkEvaluator | None = None

    def matches(self, call: ToolCall) -> bool:
        return (
            fnmatch.fnmatchcase(call.tool_name, self.tool)
            and fnmatch.fnmatchcase(call.agent_type or "", self.agent_type)
            and (self.evaluator is None or self.evaluator.fires(call))
        )


@dataclass(frozen=True)
class Verdict:
    """What happens to a tool call."""

    enforcement: Enforcement
    policy: Policy | None = None
    reason: str = ""

    @property
    def needs_human(self) -> bool:
        return self.enforcement is Enforcement.REQUIRE_APPROVAL

    @property
    def blocked(self) -> bool:
        return self.enforcement is Enforcement.BLOCK


class PolicyEngine:
    """Decides tool calls and plans; holds grants (applied again from stored answers at start-up,
    see ``Inputs.recover``) and per-session budgets (in this process only)."""

    def __init__(self, policies: Iterable[Policy], *, max_tool_calls_per_session: int = 0) -> None:
        self._policies = sorted(policies, key=lambda p: p.priority)
        self._max_calls = max_tool_calls_per_session
        self._session_grants: dict[tuple[str, str], set[str]] = {}
        """Per session: the tools approved for it (dropped whole when it closes, not searched for)."""
        self._tenant_allows: set[tuple[str, str]] = set()
        self._calls: dict[tuple[str, str], int] = {}

    def decide_tool(self, tenant_id: str, session_id: str, call: ToolCall, *, yolo: bool = False) -> Verdict:
        """The verdict for a tool call; counts it against the session's budget."""
        key = (tenant_id, session_id)
        used = self._calls.get(key, 0)
        if self._max_calls and used >= self._max_calls:
            return Verdict(
                Enforcement.BLOCK,
                None,
                f"guardrail: this session used its budget of {self._max_calls} tool calls",
            )
        self._calls[key] = used + 1
        policy = next((p for p in self._policies if p.scope == "tool" and p.matches(call)), None)
        if policy is None:
            return Verdict(Enforcement.ALLOW)
        if policy.enforcement is not Enforcement.REQUIRE_APPROVAL:
            reason = f"blocked by policy {policy.name!r}" if policy.enforcement is Enforcement.BLOCK else ""
            return Verdict(policy.enforcement, policy, reason)
        if (tenant_id, policy.name) in self._tenant_allows:
            return Verdict(Enforcement.ALLOW, policy, approved_always(policy.name))
        if call.tool_name in self._session_grants.get(key, ()):
            return Verdict(Enforcement.ALLOW, policy, f"{call.tool_name} approved for this session")
        if yolo:
            return Verdict(Enforcement.ALLOW, policy, "yolo_mode")
        return Verdict(Enforcement.REQUIRE_APPROVAL, policy)

    def plan_policy(self, agent_types: Iterable[str]) -> Policy | None:
        """The plan-scope policy (block or require_approval) for a plan over these agent types."""
        types = list(agent_types)
        deciding = (Enforcement.BLOCK, Enforcement.REQUIRE_APPROVAL)
        for policy in self._policies:
            if policy.scope != "plan" or policy.enforcement not in deciding:
                continue
            if any(fnmatch.fnmatchcase(t, policy.agent_type) for t in types):
                return policy
        return None

    def grant_for_session(self, tenant_id: str, session_id: str, tool_name: str) -> None:
        self._session_grants.setdefault((tenant_id, session_id), set()).add(tool_name)

    def allow_always(self, tenant_id: str, policy_name: str) -> None:
        self._tenant_allows.add((tenant_id, policy_name))

    def forget_session(self, tenant_id: str, session_id: str) -> None:
        """Drop a closed session's grants and budget."""
        key = (tenant_id, session_id)
        self._calls.pop(key, None)
        self._session_grants.pop(key, None)  # every close: one pop, not a new set of every other grant

    @staticmethod
    def from_settings(items: Iterable[Mapping[str, Any]]) -> list[Policy]:
        """Policies from validated settings objects (see ``config.PolicySettings``)."""
        policies = []
        for item in items:
            evaluator = item.get("evaluator")
            policies.append(
                Policy(
                    name=item["name"],
                    enforcement=Enforcement(item["enforcement"]),
                    scope=item.get("scope", "tool"),
                    tool=item.get("match", {}).get("tool", "*"),
                    agent_type=item.get("match", {}).get("agent_type", "*"),
                    priority=item.get("priority", 100),
                    approvers=tuple(item.get("approvers", ())),
                    evaluator=BulkEvaluator(evaluator["argument"], evaluator["threshold"])
                    if evaluator
                    else None,
                )
            )
        return policies
