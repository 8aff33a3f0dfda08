"""The memory store keeps the event payloads it knows to be immutable without copying them: each
must be one ``detach`` shares as it is (nothing mutable inside, checked by the contract suite)."""

from __future__ import annotations

from svantic_grpc.stores import _copy, memory


def test_payloads_kept_uncopied_are_those_detach_shares() -> None:
    from svantic_grpc.core.models import Session

    assert set(_copy._SHARED) >= memory._FROZEN_PAYLOADS
    assert Session in _copy._SHARED  # a session is written with its events without ``detach``


async def test_events_are_those_their_constructor_makes() -> None:
    """The store sets each Event's fields without running ``__init__``: the same event, as long as
    Event's fields are these five and its ``__init__`` only assigns them."""
    import dataclasses

    from svantic_grpc.core.events import AgentLeft, Event, StatusChanged
    from svantic_grpc.core.models import Session, SessionStatus

    assert [f.name for f in dataclasses.fields(Event)] == [
        "tenant_id",
        "session_id",
        "sequence",
        "time",
        "payload",
    ]
    assert not hasattr(Event, "__post_init__")
    store = memory.MemoryStore()
    session = Session("acme", "ses_1", SessionStatus.ACTIVE, 1.0, 1.0, 1.0)
    payloads = (
        AgentLeft("savant:chat", "chat-ses_1", "gone"),
        StatusChanged(SessionStatus.ACTIVE, SessionStatus.CLOSED),
    )
    _, first = await store.create_session_with_events(session, time=2.0, payloads=payloads[:1])
    events = await store.append_events(tenant_id="acme", session_id="ses_1", time=3.0, payloads=payloads)
    assert [*first, *events] == [
        Event("acme", "ses_1", 1, 2.0, payloads[0]),
        Event("acme", "ses_1", 2, 3.0, payloads[0]),
        Event("acme", "ses_1", 3, 3.0, payloads[1]),
    ]
    assert vars(events[0]) == vars(Event("acme", "ses_1", 2, 3.0, payloads[0]))
    assert hash(events[1]) == hash(Event("acme", "ses_1", 3, 3.0, payloads[1]))


async def test_internal_agents_events_are_built_only_when_read() -> None:
    """A session's open and close name their six internal agents' joins and leaves without building
    them (``InternalAgentsJoined`` / ``InternalAgentsLeft``); the memory store keeps them as markers
    and builds the ``Event`` of each only when it is read, equal to what building them gave."""
    from svantic_grpc.core.events import (
        AgentJoined,
        AgentLeft,
        Event,
        InternalAgentsJoined,
        InternalAgentsLeft,
        StatusChanged,
    )
    from svantic_grpc.core.evolve import evolve
    from svantic_grpc.core.models import INTERNAL_AGENTS, JoinReason, Session, SessionAgent, SessionStatus

    session = Session("acme", "ses_1", SessionStatus.ACTIVE, 1.0, 1.0, 1.0)
    opened = StatusChanged(SessionStatus.OPENING, SessionStatus.ACTIVE, "opened")
    joins = InternalAgentsJoined("ses_1", 1.0, (opened,))
    built = [
        *(
            AgentJoined(SessionAgent(agent_type, prefix + "ses_1", JoinReason.AUTO, 1.0, True))
            for agent_type, prefix in INTERNAL_AGENTS
        ),
        opened,
    ]
    assert joins == built and len(joins) == 7 and joins[-1] is opened and joins[2:4] == built[2:4]

    store = memory.MemoryStore()
    stored, events = await store.create_session_with_events(session, time=1.0, payloads=joins)
    assert events[-1] == Event("acme", "ses_1", 7, 1.0, opened)
    assert sum(e is not None for e in events._built) == 1  # type: ignore[attr-defined]  # the last only
    expected = [Event("acme", "ses_1", n, 1.0, payload) for n, payload in enumerate(built, 1)]
    assert events == expected
    assert await store.list_events(tenant_id="acme", session_id="ses_1") == expected

    closed = StatusChanged(SessionStatus.ACTIVE, SessionStatus.CLOSED, "done")
    lefts = InternalAgentsLeft("ses_1", "session closed", (closed,))
    gone = [
        AgentLeft(agent_type, prefix + "ses_1", "session closed") for agent_type, prefix in INTERNAL_AGENTS
    ]
    assert lefts == [*gone, closed]
    ended = evolve(stored, status=SessionStatus.CLOSED, closed_at=2.0)
    _, events = await store.update_session_with_events(ended, time=2.0, payloads=lefts)
    expected_left = [Event("acme", "ses_1", n, 2.0, p) for n, p in enumerate([*gone, closed], 8)]
    assert list(events) == expected_left
    assert await store.list_events(tenant_id="acme", session_id="ses_1", after_sequence=7) == expected_left

    # Joins at another time than the session's creation are kept as they are, and read back the same.
    other = Session("acme", "ses_2", SessionStatus.ACTIVE, 5.0, 5.0, 5.0)
    late = InternalAgentsJoined("ses_2", 4.0)
    _, events = await store.create_session_with_events(other, time=5.0, payloads=late)
    assert [e.payload for e in events] == list(late)
    assert [e.payload.agent.joined_at for e in events] == [4.0] * 6  # type: ignore[union-attr]
    assert await store.list_events(tenant_id="acme", session_id="ses_2") == list(events)
