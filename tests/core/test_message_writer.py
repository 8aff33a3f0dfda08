"""The message writer keeps what it holds until it is written: a final-state save that fails
(the store down for a moment) leaves the agent's last outputs for the next save, so the message
that is then failed still carries them, with their events, in order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from svantic_grpc.core.clock import ManualClock, UuidGenerator
from svantic_grpc.core.errors import Unavailable
from svantic_grpc.core.events import ArtifactAdded, EventBus, MessageStateChanged, TurnAdded
from svantic_grpc.core.messages.model import Artifact, Message, MessageState, Part
from svantic_grpc.core.messages.writer import MessageWriter
from svantic_grpc.stores.memory import MemoryStore
from tests.stores.test_contract import make_message


class _FailingOnce(MemoryStore):
    """A memory store whose next message update fails once (as a database that went away)."""

    fail_next = False

    async def update_message_with_events(
        self, message: Message, *, time: float, payloads: Callable[[Message], Sequence[Any]]
    ) -> Any:
        if self.fail_next:
            self.fail_next = False
            raise Unavailable("the store is down for a moment")
        return await super().update_message_with_events(message, time=time, payloads=payloads)


async def test_outputs_held_for_a_final_state_that_failed_to_save_go_with_the_next_save() -> None:
    store, clock = _FailingOnce(), ManualClock(start=1000.0)
    bus = EventBus(store=store, clock=clock)
    created = await store.create_message(make_message("m1"))
    writer = MessageWriter(created, store=store, bus=bus, clock=clock, ids=UuidGenerator())
    await writer.state(MessageState.WORKING)

    # The agent's last words and artifact arrive with its final state: held for that one write.
    await writer.turn((Part(text="here you are"),), instance_id="a-1", hold=True)
    await writer.artifacts((Artifact("r1", (Part(text="the report"),), name="report"),), hold=True)
    store.fail_next = True
    with pytest.raises(Unavailable):
        await writer.state(MessageState.COMPLETED, "done")

    # What the runtime then does: fail the message. The outputs are not lost with the first write.
    failed = await writer.state(MessageState.FAILED, "could not record the outcome")
    assert [p.text for turn in failed.history for p in turn.parts] == ["here you are"]
    assert [p.text for artifact in failed.artifacts for p in artifact.parts] == ["the report"]
    stored = await store.get_message(tenant_id="acme", session_id="s1", message_id="m1")
    assert stored == failed
    log = await store.list_events(tenant_id="acme", session_id="s1")
    kinds = [type(e.payload).__name__ for e in log]
    assert kinds == ["MessageStateChanged", "TurnAdded", "ArtifactAdded", "MessageStateChanged"]
    assert isinstance(log[-1].payload, MessageStateChanged)
    assert log[-1].payload.to_state is MessageState.FAILED
    assert isinstance(log[1].payload, TurnAdded) and isinstance(log[2].payload, ArtifactAdded)
