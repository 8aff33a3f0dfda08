"""``evolve``: the fast ``dataclasses.replace`` of the hot path gives the very same records."""

from __future__ import annotations

import dataclasses

import pytest

from svantic_grpc.core.evolve import evolve
from svantic_grpc.core.frozen import FrozenDict
from svantic_grpc.core.messages.model import Message, MessageState, Part, Role
from svantic_grpc.core.models import AgentRegistration, DeploymentMode, Session, SessionStatus

MESSAGE = Message("acme", "s1", "m1", Role.USER, (Part(text="hi"),), MessageState.WORKING, 1.0, 1.0)


def test_an_evolved_record_equals_the_replaced_one_and_leaves_the_original_alone() -> None:
    evolved = evolve(MESSAGE, state=MessageState.COMPLETED, version=3)
    assert evolved == dataclasses.replace(MESSAGE, state=MessageState.COMPLETED, version=3)
    assert (MESSAGE.state, MESSAGE.version) == (MessageState.WORKING, 0)
    assert type(evolved) is Message and evolved is not MESSAGE
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolved.version = 4  # type: ignore[misc]
    session = Session("acme", "s1", SessionStatus.ACTIVE, 1.0, 1.0, 1.0, user_id="me")
    assert evolve(session, last_activity_at=5.0) == dataclasses.replace(session, last_activity_at=5.0)


def test_a_field_that_does_not_exist_is_refused_like_replace_does() -> None:
    with pytest.raises(TypeError, match="stat"):
        evolve(MESSAGE, stat=MessageState.COMPLETED)


def test_records_whose_init_does_more_than_assign_still_go_through_it() -> None:
    agent = AgentRegistration("acme", "echo", "e1", DeploymentMode.CONNECTED, 1.0, 1.0)
    evolved = evolve(agent, agent_card={"name": "echo"})
    assert isinstance(evolved.agent_card, FrozenDict)  # __post_init__ froze it


def test_a_slotted_record_evolves_like_replace() -> None:
    session = Session("acme", "s1", SessionStatus.ACTIVE, 1.0, 1.0, 1.0, user_id="me", version=2)
    evolved = evolve(session, last_activity_at=5.0, version=3)
    assert evolved == dataclasses.replace(session, last_activity_at=5.0, version=3)
    assert (session.last_activity_at, session.version) == (1.0, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolved.version = 4  # type: ignore[misc]
