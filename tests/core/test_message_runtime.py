"""The message runtime against the core directly, with a scripted transport standing in for agents.

What real agents do over A2A and Connect is covered in tests/api; here the
transport is scripted so budgets, plans, the critic, the learner and session
close can be driven precisely.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from svantic_grpc.core.auth import Caller, Scope, TokenSettings
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.dispatch import DispatchJob, DispatchUpdate, NotDelivered
from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.events import AgentJoined, Event, MessageStateChanged, TurnAdded
from svantic_grpc.core.mesh import Mesh, MeshOptions, MessageOptions
from svantic_grpc.core.messages.model import Artifact, MessageState, Part, Role
from svantic_grpc.core.models import AgentRegistration, JoinReason, Skill
from svantic_grpc.core.registry import AgentSpec
from svantic_grpc.stores.memory import MemoryStore

CALLER = Caller("acme", "acme-full", "a2ui-terminal", (Scope.FULL,), "tok_1")

Script = Callable[[DispatchJob], AsyncIterator[DispatchUpdate]]


class ScriptedTransport:
    """Plays a script per instance id and records every job it was given."""

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.jobs: list[DispatchJob] = []

    def dispatch(self, job: DispatchJob) -> AsyncIterator[DispatchUpdate]:
        self.jobs.append(job)
        return self.scripts[job.agent.instance_id](job)

    def protocol_for(self, agent: AgentRegistration) -> str:
        return "scripted"

    def begin_stop(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def complete_with(job: DispatchJob, parts: tuple[Part, ...] = ()) -> AsyncIterator[DispatchUpdate]:
    yield DispatchUpdate(MessageState.WORKING)
    yield DispatchUpdate(MessageState.COMPLETED, parts or (Part(text=f"done: {job.message.text}"),))


async def hang(job: DispatchJob) -> AsyncIterator[DispatchUpdate]:
    yield DispatchUpdate(MessageState.WORKING)
    await asyncio.sleep(3600)


async def unreachable(job: DispatchJob) -> AsyncIterator[DispatchUpdate]:
    raise NotDelivered("connection refused")
    yield  # pragma: no cover


def make_mesh(clock: ManualClock, transport: ScriptedTransport, **message_options: Any) -> Mesh:
    return Mesh(
        store=MemoryStore(),
        tokens=TokenSettings(signing_key="k" * 32),
        credentials=(),
        options=MeshOptions(session_ttl_s=60, messages=MessageOptions(**message_options)),
        clock=clock,
        hosted=transport,
    )


async def register(mesh: Mesh, instance_id: str, agent_type: str = "worker", **fields: Any) -> None:
    spec = AgentSpec(agent_type=agent_type, instance_id=instance_id, url="http://127.0.0.1:9/a2a", **fields)
    await mesh.registry.register(CALLER, spec)


def target(agent_type: str = "worker") -> tuple[Part, ...]:
    return (Part(text="do it"), Part(data={"target_agent": agent_type}))


async def test_a_running_message_keeps_its_session_from_the_idle_ttl(clock: ManualClock) -> None:
    transport = ScriptedTransport()
    transport.scripts["w1"] = hang
    mesh = make_mesh(clock, transport)
    await register(mesh, "w1")
    session = await mesh.sessions.init(CALLER)
    message, task = await mesh.messages.send(CALLER, session.session_id, parts=target())
    for _ in range(50):
        await asyncio.sleep(0)
    clock.advance(61)
    assert await mesh.sessions.reaper.run_once() == 0  # still working: not idle
    assert (await mesh.sessions.get(CALLER, session.session_id)).status.value == "active"

    await mesh.messages.cancel(CALLER, session.session_id, message.message_id)
    clock.advance(61)
    assert await mesh.sessions.reaper.run_once() == 1
    assert task.done()


async def test_closing_a_session_cancels_its_running_messages(clock: ManualClock) -> None:
    transport = ScriptedTransport()
    transport.scripts["w1"] = hang
    mesh = make_mesh(clock, transport)
    await register(mesh, "w1")
    session = await mesh.sessions.init(CALLER)
    _, task = await mesh.messages.send(CALLER, session.session_id, parts=target())
    await asyncio.sleep(0.01)
    await mesh.sessions.close(CALLER, session.session_id, reason="user left")
    ended = await asyncio.wait_for(task, 2)
    assert ended.state is MessageState.CANCELED
    assert "session closed" in ended.state_reason and "user left" in ended.state_reason
    agent = await mesh.registry.get(CALLER, "w1")
    assert agent.session_ids == ()  # released


async def test_the_dispatch_budget_is_per_session(clock: ManualClock) -> None:
    transport = ScriptedTransport()
    transport.scripts["w1"] = complete_with
    mesh = make_mesh(clock, transport, max_dispatches_per_session=2)
    await register(mesh, "w1")
    first = await mesh.sessions.init(CALLER)
    for _ in range(2):
        done = await mesh.messages.send_and_wait(CALLER, first.session_id, parts=target())
        assert done.state is MessageState.COMPLETED
    over = await mesh.messages.send_and_wait(CALLER, first.session_id, parts=target())
    assert over.state is MessageState.FAILED
    assert "budget of 2 dispatches" in over.state_reason
    other = await mesh.sessions.init(CALLER)
    fresh = await mesh.messages.send_and_wait(CALLER, other.session_id, parts=target())
    assert fresh.state is MessageState.COMPLETED  # another session has its own budget


async def test_fail_over_only_when_nothing_was_delivered(clock: ManualClock) -> None:
    transport = ScriptedTransport()
    transport.scripts["w1"] = unreachable
    transport.scripts["w2"] = complete_with
    mesh = make_mesh(clock, transport)
    await register(mesh, "w1")
    await register(mesh, "w2")
    await mesh.registry.heartbeat(CALLER, "w2", status=None, current_sessions=1)  # w1 is picked first
    session = await mesh.sessions.init(CALLER)
    done = await mesh.messages.send_and_wait(CALLER, session.session_id, parts=target())
    assert done.state is MessageState.COMPLETED
    assert done.instance_id == "w2"
    agents = {a.instance_id: a for a in (await mesh.sessions.get(CALLER, session.session_id)).agents}
    assert agents["w1"].left_at is not None and agents["w2"].join_reason is JoinReason.ROUTED
    w1 = await mesh.registry.get(CALLER, "w1")
    assert w1.connection.failures == 1 and "not delivered" in w1.connection.last_error


async def test_a_plan_runs_its_steps_in_order_and_stops_at_a_failure(clock: ManualClock) -> None:
    transport = ScriptedTransport()

    async def fails_on_two(job: DispatchJob) -> AsyncIterator[DispatchUpdate]:
        if job.message.text == "two":
            yield DispatchUpdate(MessageState.FAILED, reason="cannot do two")
            return
        async for update in complete_with(job):
            yield update

    transport.scripts["w1"] = fails_on_two
    mesh = make_mesh(clock, transport)
    await register(mesh, "w1")
    session = await mesh.sessions.init(CALLER)
    plan = {"plan": [{"target_agent": "worker", "text": t} for t in ("one", "two", "three")]}
    done = await mesh.messages.send_and_wait(
        CALLER, session.session_id, parts=(Part(data={"action_data": plan}),)
    )
    assert [job.message.text for job in transport.jobs] == ["one", "two"]
    assert done.state is MessageState.FAILED
    assert done.state_reason == "plan step 2/3 (worker): cannot do two"


async def test_what_each_plan_step_said_is_logged_before_the_next_step_starts(clock: ManualClock) -> None:
    # An agent's last words come with its final state and are written with the message's next
    # change: before the next step's agent joins the session, never after it.
    transport = ScriptedTransport()
    transport.scripts["w1"] = complete_with
    transport.scripts["r1"] = complete_with
    mesh = make_mesh(clock, transport)
    await register(mesh, "w1")
    await register(mesh, "r1", agent_type="reviewer")
    session = await mesh.sessions.init(CALLER)
    steps = [{"target_agent": "worker", "text": "one"}, {"target_agent": "reviewer", "text": "two"}]
    done = await mesh.messages.send_and_wait(
        CALLER, session.session_id, parts=(Part(data={"action_data": {"plan": steps}}),)
    )
    assert done.state is MessageState.COMPLETED
    assert [t.parts[0].text for t in done.history[1:]] == ["done: one", "done: two"]
    log = await mesh.store.list_events(tenant_id=CALLER.tenant_id, session_id=session.session_id)
    seen = [line for line in map(_plan_line, log) if line]
    assert seen == ["joined w1", "said done: one", "joined r1", "said done: two", "ended completed"]


def _plan_line(event: Event) -> str:
    payload = event.payload
    if isinstance(payload, AgentJoined) and payload.agent.instance_id in ("w1", "r1"):
        return f"joined {payload.agent.instance_id}"
    if isinstance(payload, TurnAdded) and payload.turn.role is Role.AGENT:
        return f"said {payload.turn.parts[0].text}"
    if isinstance(payload, MessageStateChanged) and payload.to_state.terminal:
        return f"ended {payload.to_state.value}"
    return ""


@pytest.mark.parametrize(
    ("action_data", "field"),
    [
        ({"plan": "do things"}, "message.action_data.plan"),
        ({"plan": [{"text": "x"}]}, "message.action_data.plan[0].target_agent"),
        ({"plan": [{"target_agent": "worker"}]}, "message.action_data.plan[0].text"),
        (
            {"plan": [{"target_agent": "savant:planner", "text": "x"}]},
            "message.action_data.plan[0].target_agent",
        ),
    ],
)
async def test_a_bad_plan_is_refused_before_anything_is_stored(
    clock: ManualClock, action_data: dict[str, Any], field: str
) -> None:
    mesh = make_mesh(clock, ScriptedTransport())
    session = await mesh.sessions.init(CALLER)
    with pytest.raises(InvalidArgument) as excinfo:
        await mesh.messages.send(CALLER, session.session_id, parts=(Part(data={"action_data": action_data}),))
    assert excinfo.value.field == field
    page = await mesh.messages.list_messages(CALLER, session_id=session.session_id)
    assert page.messages == ()


async def test_the_critic_retries_then_fails_a_result_of_the_wrong_kind(clock: ManualClock) -> None:
    transport = ScriptedTransport()
    transport.scripts["w1"] = complete_with  # answers text
    mesh = make_mesh(clock, transport, critic_retries=1)
    skill = Skill(id="report", tags=("report",), output_modes=("application/json",))
    await register(mesh, "w1", skills=(skill,))
    session = await mesh.sessions.init(CALLER)
    done = await mesh.messages.send_and_wait(CALLER, session.session_id, parts=(Part(text="make a report"),))
    assert len(transport.jobs) == 2
    assert done.state is MessageState.FAILED
    assert done.state_reason.startswith("critic: skill 'report' declares output application/json")


async def test_the_critic_accepts_output_of_a_declared_kind(clock: ManualClock) -> None:
    transport = ScriptedTransport()

    async def json_report(job: DispatchJob) -> AsyncIterator[DispatchUpdate]:
        yield DispatchUpdate(artifacts=(Artifact("a1", (Part(data={"rows": 3}),)),))
        yield DispatchUpdate(MessageState.COMPLETED)

    transport.scripts["w1"] = json_report
    mesh = make_mesh(clock, transport)
    await register(
        mesh, "w1", skills=(Skill(id="report", tags=("report",), output_modes=("application/*",)),)
    )
    session = await mesh.sessions.init(CALLER)
    done = await mesh.messages.send_and_wait(CALLER, session.session_id, parts=(Part(text="make a report"),))
    assert done.state is MessageState.COMPLETED
    assert done.artifacts[0].parts[0].data == {"rows": 3}


async def test_the_learner_steers_ties_to_the_instance_that_succeeds(clock: ManualClock) -> None:
    transport = ScriptedTransport()

    async def fails(job: DispatchJob) -> AsyncIterator[DispatchUpdate]:
        yield DispatchUpdate(MessageState.FAILED, reason="broken")

    transport.scripts["a-bad"] = fails
    transport.scripts["b-good"] = complete_with
    mesh = make_mesh(clock, transport)
    await register(mesh, "a-bad")
    await register(mesh, "b-good")
    # Without history the tie goes to the lowest id; a failure there teaches routing.
    first = await mesh.sessions.init(CALLER)
    failed = await mesh.messages.send_and_wait(CALLER, first.session_id, parts=target())
    assert (failed.state, failed.instance_id) == (MessageState.FAILED, "a-bad")
    await mesh.sessions.close(CALLER, first.session_id)
    second = await mesh.sessions.init(CALLER)
    done = await mesh.messages.send_and_wait(CALLER, second.session_id, parts=target())
    assert (done.state, done.instance_id) == (MessageState.COMPLETED, "b-good")


async def test_a_dispatch_ended_by_its_final_update_is_closed_after_the_sender_has_its_answer(
    clock: ManualClock,
) -> None:
    """What a transport still does after the final update (an A2A stream's end arriving, its
    connection going back to the pool) does not delay the answer, and is still done, as is the
    instance's count of dispatches."""
    transport = ScriptedTransport()
    seen: list[str] = []

    async def answers_then_tidies(job: DispatchJob) -> AsyncIterator[DispatchUpdate]:
        try:
            yield DispatchUpdate(MessageState.COMPLETED, (Part(text="done"),))
            await asyncio.sleep(3600)  # its stream goes on after the final update
        finally:
            seen.append("stream closed")

    transport.scripts["w1"] = answers_then_tidies
    mesh = make_mesh(clock, transport)
    await register(mesh, "w1")
    session = await mesh.sessions.init(CALLER)
    done = await mesh.messages.send_and_wait(CALLER, session.session_id, parts=target())
    seen.append("answered")
    assert done.state is MessageState.COMPLETED
    for _ in range(20):  # a few turns of the event loop, no more
        await asyncio.sleep(0)
    assert seen == ["answered", "stream closed"]
    agent = await mesh.registry.get(CALLER, "w1")
    assert (agent.connection.successes, agent.connection.failures) == (1, 0)


async def test_chat_answers_with_what_the_session_can_do(clock: ManualClock) -> None:
    mesh = make_mesh(clock, ScriptedTransport())
    await register(mesh, "w1", skills=(Skill(id="translate", tags=("translate",)),))
    session = await mesh.sessions.init(CALLER)
    done = await mesh.messages.send_and_wait(CALLER, session.session_id, parts=(Part(text="hello?"),))
    assert (done.state, done.agent_type) == (MessageState.COMPLETED, "savant:chat")
    answer = done.history[-1].parts
    assert "worker: translate" in (answer[0].text or "")
    assert answer[1].data == {
        "capabilities": {"agents_in_session": [], "agent_types": {"worker": ["translate"]}}
    }
