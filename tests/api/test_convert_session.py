"""convert.session sets the internal agents straight from the session: the same message as
converting each agent of ``Session.all_agents()``."""

from __future__ import annotations

from dataclasses import replace

import pytest

from svantic_grpc.api import convert
from svantic_grpc.core.models import JoinReason, Session, SessionAgent, SessionStatus
from svantic_grpc.pb import session_types_pb2

NOW = 1_765_000_000.123456


def _reference(record: Session, expires_at: float | None) -> session_types_pb2.Session:
    """The session converted without its agents, then each agent of ``all_agents()`` one by one."""
    message = convert.session(record, expires_at=expires_at, include_agents=False)
    message.agents.extend(convert.session_agent(a) for a in record.all_agents())
    return message


REMOTE = (
    SessionAgent("worker", "w-1", JoinReason.SELF, NOW),
    SessionAgent("helper", "h-1", JoinReason.INVITED, NOW + 2.5, left_at=NOW + 3.25),
    SessionAgent("router", "r-1", JoinReason.ROUTED, NOW + 4),
)
OPEN = Session("acme", "ses_0123", SessionStatus.ACTIVE, NOW, NOW + 4, NOW + 4, version=3)
CLOSED = Session(
    "acme",
    "ses_0456",
    SessionStatus.CLOSED,
    NOW,
    NOW + 9,
    NOW + 4,
    user_id="user-1",
    created_by="acme-full",
    creator_agent_type="a2ui-terminal",
    closed_at=NOW + 9,
    close_reason="closed by acme-full",
    agents=tuple(a if a.left_at else replace(a, left_at=NOW + 9) for a in REMOTE),
    version=7,
)


@pytest.mark.parametrize(
    ("record", "expires_at"),
    [
        (OPEN, NOW + 600),
        (Session("acme", "ses_0789", SessionStatus.PAUSED, NOW, NOW, NOW, agents=REMOTE, version=2), None),
        (CLOSED, None),
    ],
)
def test_a_session_converts_as_each_of_its_agents_does(record: Session, expires_at: float | None) -> None:
    converted = convert.session(record, expires_at=expires_at)
    assert converted == _reference(record, expires_at)
    assert converted.SerializeToString(deterministic=True) == _reference(
        record, expires_at
    ).SerializeToString(deterministic=True)
    assert [a.instance_id for a in converted.agents][:6] == [a.instance_id for a in record.internal_agents]


@pytest.mark.parametrize("closed", [False, True])
def test_internal_agents_convert_the_same_for_ids_of_every_length(closed: bool) -> None:
    # Their encoding comes from a template per id length (a length byte may be a "%"), and ids
    # too long for one-byte lengths are set field by field: every allowed length, both ways.
    for length in range(1, 129):
        session_id = ("s%" * 64)[:length]
        record = replace(CLOSED if closed else OPEN, session_id=session_id)
        converted = convert.session(record, expires_at=None if closed else NOW + 600)
        assert converted.SerializeToString(deterministic=True) == _reference(
            record, None if closed else NOW + 600
        ).SerializeToString(deterministic=True), length
