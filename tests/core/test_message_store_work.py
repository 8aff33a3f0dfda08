"""What one message costs the store: the reads and writes a sent message makes, counted.

On PostgreSQL each is a round trip; the counts here are what every store is asked for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from svantic_grpc.core.auth import TokenSettings
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.events import MessageStateChanged
from svantic_grpc.core.mesh import Mesh, MeshOptions, MessageOptions
from svantic_grpc.core.messages.model import MessageState, Part
from svantic_grpc.core.models import AgentRegistration, Session, Skill
from svantic_grpc.core.store import Change, Changed
from svantic_grpc.stores.memory import MemoryStore
from tests.core.test_message_runtime import CALLER, ScriptedTransport, complete_with, register, target

READS = ("get_session", "get_agent", "list_agents")


class CountingStore(MemoryStore):
    """The memory store, counting the calls the mesh makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def get_session(self, *, tenant_id: str, session_id: str) -> Session | None:
        self.calls["get_session"] += 1
        return await super().get_session(tenant_id=tenant_id, session_id=session_id)

    async def get_agent(self, *, tenant_id: str, instance_id: str) -> AgentRegistration | None:
        self.calls["get_agent"] += 1
        return await super().get_agent(tenant_id=tenant_id, instance_id=instance_id)

    async def list_agents(self, *, tenant_id: str, agent_type: str = "") -> Sequence[AgentRegistration]:
        self.calls["list_agents"] += 1
        return await super().list_agents(tenant_id=tenant_id, agent_type=agent_type)

    async def update_session(self, session: Session) -> Session:
        self.calls["update_session"] += 1
        return await super().update_session(session)

    async def write(self, change: Change) -> Changed:
        self.calls["write"] += 1
        return await super().write(change)


def _mesh(clock: ManualClock, store: CountingStore, transport: ScriptedTransport) -> Mesh:
    return Mesh(
        store=store,
        tokens=TokenSettings(signing_key="k" * 32),
        credentials=(),
        options=MeshOptions(session_ttl_s=60, messages=MessageOptions()),
        clock=clock,
        hosted=transport,
    )


async def _second_message(clock: ManualClock, parts: tuple[Part, ...], **agent: Any) -> CountingStore:
    """Counts for a message sent to a session whose first message already brought the agent in."""
    store = CountingStore()
    transport = ScriptedTransport()
    transport.scripts["w1"] = complete_with
    mesh = _mesh(clock, store, transport)
    await register(mesh, "w1", **agent)
    session = await mesh.sessions.init(CALLER)
    first = await mesh.messages.send_and_wait(CALLER, session.session_id, parts=parts)
    assert first.state is MessageState.COMPLETED
    store.calls.clear()
    clock.advance(5)
    done = await mesh.messages.send_and_wait(CALLER, session.session_id, parts=parts)
    assert (done.state, done.instance_id) == (MessageState.COMPLETED, first.instance_id)
    counted = Counter(store.calls)
    stored = await mesh.sessions.get(CALLER, session.session_id)
    assert stored.last_activity_at == done.created_at  # the message pushed back the idle TTL
    store.calls = counted
    return store


async def test_a_message_to_a_named_agent_type_reads_its_agents_once(clock: ManualClock) -> None:
    store = await _second_message(clock, target("worker"), skills=(Skill(id="do", tags=("do",)),))
    assert sum(store.calls[r] for r in READS) == 1, store.calls  # the type's agents, for the skill
    assert store.calls["update_session"] == 0  # the activity went with the message's own write


async def test_a_message_to_a_named_instance_reads_that_instance_once(clock: ManualClock) -> None:
    store = await _second_message(clock, target("worker/w1"))
    assert store.calls["list_agents"] == 0, store.calls
    assert store.calls["get_agent"] == 1, store.calls


async def test_a_message_writes_the_session_only_with_its_own_records(clock: ManualClock) -> None:
    store = await _second_message(clock, target("worker"))
    # Sent, routed and working (with the session's activity), then completed with what the agent said.
    assert store.calls["update_session"] == 0
    assert store.calls["write"] == 2, store.calls


async def test_the_chat_reads_the_agents_once_per_message(clock: ManualClock) -> None:
    store = CountingStore()
    mesh = _mesh(clock, store, ScriptedTransport())
    await register(mesh, "w1", skills=(Skill(id="translate", tags=("translate",)),))
    session = await mesh.sessions.init(CALLER)
    store.calls.clear()
    done = await mesh.messages.send_and_wait(CALLER, session.session_id, parts=(Part(text="hello?"),))
    assert done.agent_type == "savant:chat"
    assert "worker: translate" in (done.history[-1].parts[0].text or "")
    assert store.calls["list_agents"] == 1, store.calls  # the orchestrator's list serves the chat
    assert store.calls["get_session"] == 0, store.calls  # the session as stored with the message
    # The session's first message here: sent (with the session's activity), then routed and
    # working (its run routes it), then completed with the chat's answer.
    assert (store.calls["write"], store.calls["update_session"]) == (3, 0), store.calls
    store.calls.clear()
    again = await mesh.messages.send_and_wait(CALLER, session.session_id, parts=(Part(text="hello?"),))
    assert again.state is MessageState.COMPLETED
    # Then routed as it is sent: stored working with the session's activity, then completed.
    assert (store.calls["write"], store.calls["list_agents"], store.calls["get_session"]) == (2, 1, 0)
    events = await mesh.store.list_events(tenant_id="acme", session_id=session.session_id)
    states = [
        (e.payload.from_state, e.payload.to_state)
        for e in events
        if isinstance(e.payload, MessageStateChanged) and e.payload.message_id == again.message_id
    ]
    assert states == [
        (None, MessageState.SUBMITTED),
        (MessageState.SUBMITTED, MessageState.WORKING),
        (MessageState.WORKING, MessageState.COMPLETED),
    ]


async def test_an_agent_registered_after_a_message_is_seen_by_the_next(clock: ManualClock) -> None:
    """The reads are remembered within one message's run only."""
    store = CountingStore()
    mesh = _mesh(clock, store, ScriptedTransport())
    session = await mesh.sessions.init(CALLER)
    first = await mesh.messages.send_and_wait(CALLER, session.session_id, parts=(Part(text="hi"),))
    assert "No remote agents are registered yet." in (first.history[-1].parts[0].text or "")
    await register(mesh, "w1", skills=(Skill(id="translate", tags=("translate",)),))
    second = await mesh.messages.send_and_wait(CALLER, session.session_id, parts=(Part(text="hi"),))
    assert "worker: translate" in (second.history[-1].parts[0].text or "")
