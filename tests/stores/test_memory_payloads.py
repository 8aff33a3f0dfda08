"""The memory store keeps the event payloads it knows to be immutable without copying them: each
must be one ``detach`` shares as it is (nothing mutable inside, checked by the contract suite)."""

from __future__ import annotations

from svantic_grpc.stores import _copy, memory


def test_payloads_kept_uncopied_are_those_detach_shares() -> None:
    assert set(_copy._SHARED) >= memory._FROZEN_PAYLOADS


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
