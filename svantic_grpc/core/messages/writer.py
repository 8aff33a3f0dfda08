"""The single writer of one message's record while it runs.

Every change is a versioned store update and the matching session events in one
store write, so the record and the event log never disagree, even after a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from svantic_grpc.core.clock import Clock, IdGenerator
from svantic_grpc.core.errors import ResourceExhausted
from svantic_grpc.core.events import (
    ArtifactAdded,
    Event,
    EventBus,
    EventPayload,
    MessageStateChanged,
    TurnAdded,
)
from svantic_grpc.core.evolve import evolve
from svantic_grpc.core.inputs.model import InputRequest
from svantic_grpc.core.messages.model import (
    MAX_MESSAGE_BYTES,
    Artifact,
    Message,
    MessageState,
    Part,
    Role,
    Turn,
    parts_bytes,
)
from svantic_grpc.core.metrics import NO_METRICS, Metrics
from svantic_grpc.core.store import Store, as_stored

__all__ = ["MessageWriter"]

#: States in which a message stops for now; the snapshot travels with the event.
STOPPING = frozenset(MessageState) - {MessageState.SUBMITTED, MessageState.WORKING}

MessageEvent = MessageStateChanged | TurnAdded | ArtifactAdded
"""What a writer announces about its message."""


class MessageWriter:
    """Applies changes to one message and publishes them."""

    def __init__(
        self,
        message: Message,
        *,
        store: Store,
        bus: EventBus,
        clock: Clock,
        ids: IdGenerator,
        on_stop: Callable[[Message], None] | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.message = message
        self._metrics = metrics
        self._on_stop = on_stop
        self._store = store
        self._bus = bus
        self._clock = clock
        self._ids = ids
        self._pending: dict[str, Any] = {}
        """Changes written with the next save (saves a write each)."""
        self._held: list[Callable[[Message], Sequence[MessageEvent]]] = []
        """The events of held turns and artifacts (``hold=True``), announced with the next save."""
        self._carried: int | None = None
        """Bytes the message carries with what is pending (counted on the first output)."""

    async def _save(self, announce: Callable[[Message], Sequence[MessageEvent]], **changes: Any) -> Message:
        """Write ``changes`` (and what is pending or held) in one versioned update, with the events
        ``announce`` makes of the message as stored (after those of held changes) in the same store write."""
        # What is pending or held is let go only once it is written: a save that fails (a conflict,
        # the store down) leaves it for the next save instead of losing the agent's last outputs.
        pending, held = dict(self._pending), list(self._held)
        if pending:
            changes = {**pending, **changes}
        if held:
            announcers = (*held, announce)

            def announce_all(saved: Message) -> Sequence[MessageEvent]:
                return [event for made in announcers for event in made(saved)]

            announce = announce_all
        draft = evolve(self.message, updated_at=self._clock.now(), **changes)
        store = self._store

        async def write(now: float) -> tuple[Message, Sequence[Event]]:
            saved, events = await store.update_message_with_events(draft, time=now, payloads=announce)
            # Taken in here, not from what ``commit`` returns: a writer cancelled while the store
            # works still learns the version its write stored (the bus lets the write land), so its
            # last write (CANCELED) does not start from the version before and lose a race with itself.
            self._took(saved, pending, held)
            return saved, events

        await self._bus.commit(draft.tenant_id, draft.session_id, write)
        return self.message

    def _latest(self, name: str) -> Any:
        """A field as the next save writes it (with what is pending)."""
        return self._pending[name] if name in self._pending else getattr(self.message, name)

    async def assign(self, agent_type: str, instance_id: str) -> None:
        """Record which agent handles the message (written with the next change, saving a write)."""
        if (self.message.agent_type, self.message.instance_id) != (agent_type, instance_id):
            self._pending.update(agent_type=agent_type, instance_id=instance_id)

    def remote_task(self, task_id: str) -> None:
        """Remember the agent's own task id (written with the next change)."""
        if task_id and task_id != self.message.remote_task_id:
            self._pending["remote_task_id"] = task_id

    async def state(self, to: MessageState, reason: str = "", **changes: Any) -> Message:
        """Move to ``to`` (no-op if already there with the same reason); ``changes`` go in the same write."""
        current = self.message
        if current.state is to and current.state_reason == reason and not changes and not self._held:
            return current
        stopping = to in STOPPING

        def announce(saved: Message) -> tuple[MessageEvent]:
            snapshot = saved if stopping else None
            return (MessageStateChanged(saved.message_id, current.state, to, reason, snapshot),)

        saved = await self._save(announce, **changes, state=to, state_reason=reason)
        if to.terminal and not current.state.terminal:
            latency = max(saved.updated_at - saved.created_at, 0.0)
            self._metrics.message_done(state=to.value, latency_s=latency)
        if stopping and self._on_stop is not None:
            self._on_stop(saved)
        return saved

    def waiting_on(
        self, request: InputRequest
    ) -> tuple[Message, tuple[EventPayload, ...], Callable[[Message], None]]:
        """The message input-required on ``request``, written with the request as it is raised
        (``Inputs.ask``): the message to write (with what is pending or held), its events, and what
        takes the stored message in; ``stopped`` then says it stopped."""
        pending, held = dict(self._pending), list(self._held)
        current = self.message
        reason = f"waiting for a human: {request.summary}"
        draft = evolve(
            current,
            **pending,
            updated_at=self._clock.now(),
            state=MessageState.INPUT_REQUIRED,
            state_reason=reason,
            input_request_ids=(*current.input_request_ids, request.request_id),
        )
        stored = as_stored(draft)
        events: list[EventPayload] = [event for made in held for event in made(stored)]
        events.append(MessageStateChanged(current.message_id, current.state, draft.state, reason, stored))

        return draft, tuple(events), partial(self._took, pending=pending, held=held)

    def _took(
        self,
        saved: Message,
        pending: dict[str, Any],
        held: list[Callable[[Message], Sequence[MessageEvent]]],
    ) -> None:
        """``saved`` was stored with ``pending`` and ``held`` (as they were when the write was made):
        it is the message now, and those are let go (what was added since stays for the next save)."""
        self.message = saved
        for name, value in pending.items():
            if self._pending.get(name) is value:
                del self._pending[name]
        del self._held[: len(held)]

    def stopped(self) -> None:
        """The message, as written elsewhere (``waiting_on``), stopped for now."""
        if self._on_stop is not None:
            self._on_stop(self.message)

    def _carry(self, parts: Iterable[Part]) -> None:
        """Count outputs in before they are added; refuse what would make the message larger
        than ``MAX_MESSAGE_BYTES`` (nothing of it is kept)."""
        if self._carried is None:
            message = self.message
            self._carried = (
                parts_bytes(message.parts)
                + sum(parts_bytes(t.parts) for t in self._latest("history"))
                + sum(parts_bytes(a.parts) for a in self._latest("artifacts"))
            )
        carried = self._carried + parts_bytes(parts)
        if carried > MAX_MESSAGE_BYTES:
            raise ResourceExhausted(
                f"the agent's outputs would make the message carry {carried} bytes; "
                f"a message carries at most {MAX_MESSAGE_BYTES}",
                reason="MESSAGE_TOO_LARGE",
                metadata={"message_id": self.message.message_id, "limit_bytes": str(MAX_MESSAGE_BYTES)},
            )
        self._carried = carried

    async def turn(self, parts: tuple[Part, ...], *, instance_id: str, hold: bool = False) -> None:
        """Append an agent turn to the history.

        Args:
            hold: Write it with the next change instead of on its own (the caller makes that
                change next, such as the message's final state): one store write for both.
        """
        if not parts:
            return
        self._carry(parts)
        turn = Turn(Role.AGENT, parts, self._clock.now(), instance_id)
        await self._change(
            lambda saved: (TurnAdded(saved.message_id, turn),),
            hold,
            history=(*self._latest("history"), turn),
        )

    async def artifacts(self, artifacts: tuple[Artifact, ...], *, hold: bool = False) -> None:
        """Add outputs (ids are made unique within the message); ``hold`` as for ``turn``."""
        if not artifacts:
            return
        self._carry(p for a in artifacts for p in a.parts)
        current = self._latest("artifacts")
        taken = {a.artifact_id for a in current}
        fresh = tuple(
            a
            if a.artifact_id and a.artifact_id not in taken
            else evolve(a, artifact_id=self._ids.new_id("art_"))
            for a in artifacts
        )
        await self._change(
            lambda saved: tuple(ArtifactAdded(saved.message_id, a) for a in fresh),
            hold,
            artifacts=(*current, *fresh),
        )

    async def flush(self) -> None:
        """Write held turns and artifacts now: something else is about to be written (another
        record, such as the session's) that must not come before them in the event log."""
        if self._held:
            await self._save(lambda saved: ())

    async def _change(
        self, announce: Callable[[Message], Sequence[MessageEvent]], hold: bool, **changes: Any
    ) -> None:
        if hold:
            self._pending.update(changes)
            self._held.append(announce)
        else:
            await self._save(announce, **changes)
