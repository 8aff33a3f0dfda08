"""The critic: checks a result against what the skill declared it produces."""

from __future__ import annotations

from dataclasses import dataclass

from svantic_grpc.core.agents.base import InternalAgent
from svantic_grpc.core.dispatch import Outcome
from svantic_grpc.core.models import Skill

__all__ = ["Critic", "OutputModeCritic", "Verdict"]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""


class Critic(InternalAgent):
    """Reviews completed dispatches. Subclass and override ``review``."""

    role = "critic"

    async def review(self, outcome: Outcome, skill: Skill | None) -> Verdict:
        raise NotImplementedError


class OutputModeCritic(Critic):
    """A result fits when some part of it has a media type the skill declares."""

    async def review(self, outcome: Outcome, skill: Skill | None) -> Verdict:
        if skill is None or not skill.output_modes:
            return Verdict(True)
        produced = {p.media_type for p in outcome.parts} | {
            p.media_type for a in outcome.artifacts for p in a.parts
        }
        produced.discard("")
        if any(_matches(mode, kind) for mode in skill.output_modes for kind in produced):
            return Verdict(True)
        declared = ", ".join(skill.output_modes)
        got = ", ".join(sorted(produced)) or "nothing"
        return Verdict(
            False, f"critic: skill {skill.id!r} declares output {declared} but the agent produced {got}"
        )


def _matches(declared: str, produced: str) -> bool:
    if declared in ("*/*", "*", produced):
        return True
    major, _, minor = declared.partition("/")
    return minor == "*" and produced.partition("/")[0] == major
