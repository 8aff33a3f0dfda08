"""The planner: turns an explicit multi-step plan into ordered dispatches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from svantic_grpc.core._validate import check_id
from svantic_grpc.core.agents.base import InternalAgent
from svantic_grpc.core.errors import InvalidArgument

__all__ = ["MAX_PLAN_STEPS", "PlanStep", "Planner", "SequentialPlanner", "parse_plan"]

MAX_PLAN_STEPS = 50


@dataclass(frozen=True)
class PlanStep:
    """One step: what to send to which agent."""

    agent_type: str
    text: str
    instance_id: str = ""


def parse_plan(action_data: dict[str, Any], *, field: str = "action_data") -> tuple[PlanStep, ...]:
    """Read ``action_data.plan``: a list of ``{"target_agent": "type[/instance]", "text": "..."}``.

    ``agent_type`` and ``input`` are accepted as synonyms. Every problem names its field.
    """
    plan = action_data.get("plan")
    if not isinstance(plan, list) or not plan:
        raise InvalidArgument(f"{field}.plan", "must be a non-empty array of steps")
    if len(plan) > MAX_PLAN_STEPS:
        raise InvalidArgument(f"{field}.plan", f"has {len(plan)} steps; at most {MAX_PLAN_STEPS}")
    steps = []
    for index, raw in enumerate(plan):
        where = f"{field}.plan[{index}]"
        if not isinstance(raw, dict):
            raise InvalidArgument(where, "must be an object with target_agent and text")
        target = raw.get("target_agent", raw.get("agent_type"))
        text = raw.get("text", raw.get("input"))
        if not isinstance(target, str) or not target:
            raise InvalidArgument(
                f"{where}.target_agent", "is required (an agent type, optionally /instance)"
            )
        if not isinstance(text, str) or not text:
            raise InvalidArgument(f"{where}.text", "is required")
        agent_type, _, instance_id = target.partition("/")
        check_id(f"{where}.target_agent", agent_type)
        if agent_type == "savant:planner":
            raise InvalidArgument(f"{where}.target_agent", "a plan step cannot be another plan")
        steps.append(PlanStep(agent_type, text, instance_id))
    return tuple(steps)


class Planner(InternalAgent):
    """Plans multi-step work. Subclass and override ``plan``."""

    role = "planner"

    async def plan(self, action_data: dict[str, Any]) -> tuple[PlanStep, ...]:
        raise NotImplementedError


class SequentialPlanner(Planner):
    """Runs the steps it is given, in order."""

    async def plan(self, action_data: dict[str, Any]) -> tuple[PlanStep, ...]:
        return parse_plan(action_data)
