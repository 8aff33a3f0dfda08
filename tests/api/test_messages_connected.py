"""Messages to connected-mode agents over ``RegistryService.Connect``, against a real server.

Agents are real ``svantic_grpc.connected_agent.ConnectedAgent`` instances running
in the test's loop, or a raw ``Connect`` stream the test drives by hand (stream
drops, hello checks, replacement). Assertions are on what users see: message
state, reason, artifacts and history; the session's agents; GetAgent's
connection state; the events of WatchSession, SendStreamingMessage and Converse.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import json_format
from grpc import aio

from svantic_grpc.api.registry_service import BATCH_MAX, BATCH_MAX_BYTES, _frames
from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Reply
from svantic_grpc.core.dispatch import DispatchJob, Outbound
from svantic_grpc.core.messages.model import Message, MessageState, Part, Role
from svantic_grpc.core.models import AgentRegistration, DeploymentMode
from svantic_grpc.pb import (
    agent_types_pb2,
    auth_service_pb2,
    event_types_pb2,
    message_service_pb2,
    message_service_pb2_grpc,
    message_types_pb2,
    registry_service_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    session_types_pb2,
)
from tests._support import SECRET, Client, closes_failing, code_of, error_details, rpc_error, running_server
from tests.agents_connected import (
    WAIT,
    RawAgent,
    data,
    eventually,
    get_agent,
    get_message,
    invite,
    new_session,
    outgoing,
    raw_agent,
    register_connected,
    run_agent,
    running_agent,
    send,
    session_agents,
    skill,
    text,
    wait_for_state,
)

SUBMITTED = message_types_pb2.MESSAGE_STATE_SUBMITTED
WORKING = message_types_pb2.MESSAGE_STATE_WORKING
INPUT_REQUIRED = message_types_pb2.MESSAGE_STATE_INPUT_REQUIRED
COMPLETED = message_types_pb2.MESSAGE_STATE_COMPLETED
TERMINAL = (
    message_types_pb2.MESSAGE_STATE_COMPLETED,
    message_types_pb2.MESSAGE_STATE_FAILED,
    message_types_pb2.MESSAGE_STATE_CANCELED,
    message_types_pb2.MESSAGE_STATE_REJECTED,
)
FAILED = message_types_pb2.MESSAGE_STATE_FAILED
CANCELED = message_types_pb2.MESSAGE_STATE_CANCELED
REJECTED = message_types_pb2.MESSAGE_STATE_REJECTED
ROUTED = agent_types_pb2.JOIN_REASON_ROUTED
INVITED = agent_types_pb2.JOIN_REASON_INVITED
AVAILABLE = agent_types_pb2.AGENT_STATUS_AVAILABLE
BUSY = agent_types_pb2.AGENT_STATUS_BUSY
UNKNOWN = agent_types_pb2.AGENT_STATUS_UNKNOWN

ECHO_SKILLS = [skill("echo", "echo", "repeat")]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "echo_agent.py"


def dispatch_job(dispatch_id: str, *, text: str = "hi", sign: Callable[[], str] = lambda: "") -> DispatchJob:
    """A job for the connected instance raw-1, as the executor hands it to the Connect stream."""
    agent = AgentRegistration("acme", "echo", "raw-1", DeploymentMode.CONNECTED, 0.0, 0.0)
    message = Message(
        "acme", "s1", f"m-{dispatch_id}", Role.USER, (Part(text=text),), MessageState.WORKING, 0.0, 0.0
    )
    return DispatchJob(dispatch_id, "acme", "s1", agent, message, sign, 0.0)


# --- handlers -------------------------------------------------------------------


async def echo(dispatch: Dispatch, reply: Reply) -> None:
    await reply.artifact(f"echo: {dispatch.text}", name="echo")
    await reply.complete()


class Recorder:
    """Echoes and records every dispatch it gets."""

    def __init__(self, *, say: bool = False) -> None:
        self.dispatches: list[Dispatch] = []
        self._say = say

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        self.dispatches.append(dispatch)
        if self._say:
            await reply.say(f"working on {dispatch.text}")
        await reply.artifact(f"echo: {dispatch.text}", name="echo")
        await reply.complete()


class Slow:
    """Starts, then works until cancelled (records both)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.dispatch_ids: list[str] = []

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        self.dispatch_ids.append(dispatch.dispatch_id)
        self.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


# --- helpers --------------------------------------------------------------------


def event_kind(event: event_types_pb2.SessionEvent) -> tuple[Any, ...]:
    """A compact, comparable view of an event."""
    which = event.WhichOneof("event")
    if which == "message_state_changed":
        return ("state", event.message_state_changed.to_state)
    if which == "turn_added":
        return ("turn", " ".join(p.text for p in event.turn_added.turn.parts))
    if which == "artifact_added":
        return ("artifact", " ".join(p.text for p in event.artifact_added.artifact.parts))
    if which == "agent_joined":
        return ("joined", event.agent_joined.agent.instance_id)
    if which == "agent_left":
        return ("left", event.agent_left.instance_id)
    if which == "status_changed":
        return ("status", event.status_changed.to_status)
    return (which,)


def message_id_of(event: event_types_pb2.SessionEvent) -> str:
    which = event.WhichOneof("event")
    if which in ("message_state_changed", "turn_added", "artifact_added"):
        return getattr(event, which).message_id  # type: ignore[no-any-return]
    return ""


def is_state(message_id: str, *states: int) -> Callable[[event_types_pb2.SessionEvent], bool]:
    def match(event: event_types_pb2.SessionEvent) -> bool:
        return (
            event.WhichOneof("event") == "message_state_changed"
            and event.message_state_changed.message_id == message_id
            and event.message_state_changed.to_state in states
        )

    return match


def artifact_texts(message: message_types_pb2.Message) -> list[str]:
    return [p.text for a in message.artifacts for p in a.parts]


async def collect(call: Any) -> list[Any]:
    """Every response of a server stream until it ends, bounded."""

    async def read_all() -> list[Any]:
        responses = []
        while (response := await call.read()) is not aio.EOF:
            responses.append(response)
        return responses

    return await asyncio.wait_for(read_all(), WAIT)


async def watch_to_end(client: Client, session_id: str, after_sequence: int = 0) -> list[Any]:
    """WatchSession of a closed session: its whole log, then the stream ends."""
    call = client.sessions.WatchSession(
        session_service_pb2.WatchSessionRequest(session_id=session_id, after_sequence=after_sequence),
        metadata=await client.md(),
    )
    return [r.event for r in await collect(call)]


async def close_session(client: Client, session_id: str) -> None:
    await client.sessions.CloseSession(
        session_service_pb2.CloseSessionRequest(session_id=session_id), metadata=await client.md()
    )


async def cancel_message(
    client: Client, session_id: str, message_id: str, reason: str = ""
) -> message_types_pb2.Message:
    response: message_service_pb2.CancelMessageResponse = await client.messages.CancelMessage(
        message_service_pb2.CancelMessageRequest(session_id=session_id, message_id=message_id, reason=reason),
        metadata=await client.md(),
    )
    return response.message


class Conversation:
    """A Converse stream fed from a queue, so the test decides what is sent when."""

    def __init__(self, client: Client, md: tuple[tuple[str, str], ...]) -> None:
        self._requests: asyncio.Queue[message_service_pb2.ConverseRequest | None] = asyncio.Queue()
        self.call = client.messages.Converse(self._iterate(), metadata=md)
        self.responses: list[message_service_pb2.ConverseResponse] = []

    async def _iterate(self) -> AsyncIterator[message_service_pb2.ConverseRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    def request(self, **action: Any) -> None:
        self._requests.put_nowait(message_service_pb2.ConverseRequest(**action))

    def open(self, session_id: str, after_sequence: int = 0) -> None:
        self.request(
            open=message_service_pb2.ConverseOpen(session_id=session_id, after_sequence=after_sequence)
        )

    def send(self, *parts: message_types_pb2.Part | str, message_id: str = "") -> None:
        self.request(send=outgoing(*parts, message_id=message_id))

    def cancel(self, message_id: str, reason: str = "") -> None:
        self.request(cancel=message_service_pb2.ConverseCancel(message_id=message_id, reason=reason))

    @property
    def events(self) -> list[event_types_pb2.SessionEvent]:
        return [r.event for r in self.responses if r.WhichOneof("payload") == "event"]

    async def next(self) -> message_service_pb2.ConverseResponse | None:
        """The next response, or ``None`` when the stream ended."""
        response = await asyncio.wait_for(self.call.read(), WAIT)
        if response is aio.EOF:
            return None
        self.responses.append(response)
        return response  # type: ignore[no-any-return]

    async def until_event(self, match: Callable[[event_types_pb2.SessionEvent], bool]) -> None:
        while True:
            response = await self.next()
            assert response is not None, "the Converse stream ended early"
            if response.WhichOneof("payload") == "event" and match(response.event):
                return

    async def error(self) -> message_service_pb2.ConverseError:
        while True:
            response = await self.next()
            assert response is not None, "the Converse stream ended early"
            if response.WhichOneof("payload") == "error":
                return response.error

    async def until_end(self) -> None:
        while await self.next() is not None:
            pass

    def close(self) -> None:
        self._requests.put_nowait(None)
        self.call.cancel()


@contextlib.asynccontextmanager
async def conversation(client: Client, md: Any = None) -> AsyncIterator[Conversation]:
    conv = Conversation(client, md or await client.md())
    try:
        yield conv
    finally:
        conv.close()


async def acknowledge(client: Client, raw: RawAgent, dispatch: registry_service_pb2.Dispatch) -> None:
    """Take the dispatch (state working, with a turn) and wait until the mesh recorded it."""
    turn = message_types_pb2.Turn(role=message_types_pb2.ROLE_AGENT, parts=[text("on it")])
    raw.update(dispatch.dispatch_id, WORKING, turn=turn)
    session_id, message_id = dispatch.session_id, dispatch.message.message_id

    async def recorded() -> bool:
        message = await get_message(client, session_id, message_id)
        return any(p.text == "on it" for t in message.history for p in t.parts)

    await eventually(recorded)


# --- delivery and routing ---------------------------------------------------------


async def test_connected_echo_agent_completes_a_skill_routed_message() -> None:
    recorder = Recorder()
    async with (
        running_server() as client,
        running_agent(client, recorder, instance_id="echo-1", skills=ECHO_SKILLS, verify_dispatches=True),
    ):
        session_id = await new_session(client)
        message = await send(client, session_id, "please echo hello there")

        assert message.state == COMPLETED, message.state_reason
        assert artifact_texts(message) == ["echo: please echo hello there"]
        assert message.artifacts[0].name == "echo"
        assert (message.agent_type, message.instance_id) == ("echo", "echo-1")
        assert message.history[0].role == message_types_pb2.ROLE_USER
        assert message.history[0].parts[0].text == "please echo hello there"

        # The handler saw one dispatch with a verified token about this session and instance.
        [dispatch] = recorder.dispatches
        assert dispatch.session_id == session_id
        assert dispatch.message.message_id == message.message_id
        claims = dispatch.claims
        assert claims["tenant_id"] == "acme"
        assert claims["session_id"] == session_id
        assert claims["aud"] == "echo-1"
        assert claims["agent_type"] == "echo"
        assert claims["dispatch_id"] == dispatch.dispatch_id
        assert claims["exp"] > claims["iat"]

        # The instance joined the session as routed; GetAgent shows the stream and the success.
        joined = [a for a in await session_agents(client, session_id) if a.instance_id == "echo-1"]
        assert [(a.agent_type, a.join_reason) for a in joined] == [("echo", ROUTED)]
        agent = await get_agent(client, "echo-1")
        assert agent.connection.transport == "connect-stream"
        assert agent.connection.connected
        assert agent.connection.HasField("connected_since")
        assert agent.connection.HasField("last_dispatch_at")
        assert (agent.connection.successes, agent.connection.failures) == (1, 0)
        assert list(agent.session_ids) == [session_id]


async def test_explicit_target_agent_data_part_picks_the_type_and_the_instance() -> None:
    first, second = Recorder(), Recorder()
    async with (
        running_server() as client,
        running_agent(client, first, agent_type="worker", instance_id="w-1"),
        running_agent(client, second, agent_type="worker", instance_id="w-2"),
    ):
        # No skills declared: without target_agent the chat agent would answer.
        session_id = await new_session(client)
        message = await send(client, session_id, "do the thing", data({"target_agent": "worker/w-2"}))
        assert message.state == COMPLETED, message.state_reason
        assert (message.agent_type, message.instance_id) == ("worker", "w-2")
        assert artifact_texts(message) == ["echo: do the thing"]
        assert len(second.dispatches) == 1 and not first.dispatches

        other = await new_session(client)
        by_type = await send(client, other, "anything", data({"target_agent": "worker"}))
        assert by_type.state == COMPLETED, by_type.state_reason
        assert by_type.agent_type == "worker"
        assert by_type.instance_id in ("w-1", "w-2")


async def test_session_affinity_keeps_the_same_instance_for_the_second_message() -> None:
    one, two = Recorder(), Recorder()
    async with (
        running_server() as client,
        running_agent(client, one, instance_id="echo-1", skills=ECHO_SKILLS),
        running_agent(client, two, instance_id="echo-2", skills=ECHO_SKILLS),
    ):
        session_id = await new_session(client)
        first = await send(client, session_id, "echo one")
        assert first.state == COMPLETED, first.state_reason
        chosen = first.instance_id
        other = "echo-2" if chosen == "echo-1" else "echo-1"
        # The chosen instance now serves one session, the other none: least-loaded would
        # pick the other one, affinity must not.
        assert len((await get_agent(client, chosen)).session_ids) == 1
        assert len((await get_agent(client, other)).session_ids) == 0

        second = await send(client, session_id, "echo two")
        assert second.state == COMPLETED, second.state_reason
        assert second.instance_id == chosen
        echoes = [a.instance_id for a in await session_agents(client, session_id) if a.agent_type == "echo"]
        assert echoes == [chosen]
        assert len(one.dispatches) + len(two.dispatches) == 2
        assert {d.session_id for d in one.dispatches + two.dispatches} == {session_id}


async def test_routing_picks_the_least_loaded_of_three_connected_instances() -> None:
    recorders = {name: Recorder() for name in ("echo-1", "echo-2", "echo-3")}
    async with running_server() as client, contextlib.AsyncExitStack() as stack:
        # echo-3 connects first, so it is the least recently seen: only its load can win it the pick.
        for name in ("echo-3", "echo-1", "echo-2"):
            await stack.enter_async_context(
                running_agent(client, recorders[name], instance_id=name, skills=ECHO_SKILLS)
            )
        busy_a, busy_b, busy_c = [await new_session(client) for _ in range(3)]
        await invite(client, busy_a, "echo", "echo-1")
        await invite(client, busy_b, "echo", "echo-1")
        await invite(client, busy_c, "echo", "echo-2")

        session_id = await new_session(client)
        message = await send(client, session_id, "echo least loaded")
        assert message.state == COMPLETED, message.state_reason
        assert message.instance_id == "echo-3"
        assert [d.session_id for d in recorders["echo-3"].dispatches] == [session_id]
        assert not recorders["echo-1"].dispatches and not recorders["echo-2"].dispatches
        joined = [a for a in await session_agents(client, session_id) if not a.internal]
        assert [(a.instance_id, a.join_reason) for a in joined] == [("echo-3", ROUTED)]
        assert list((await get_agent(client, "echo-3")).session_ids) == [session_id]


async def test_an_instance_at_capacity_is_busy_and_the_message_fails_with_a_reason() -> None:
    recorder = Recorder()
    async with (
        running_server() as client,
        running_agent(client, recorder, instance_id="echo-1", skills=ECHO_SKILLS, max_concurrent_sessions=1),
    ):
        elsewhere = await new_session(client)
        await invite(client, elsewhere, "echo", "echo-1")
        assert (await get_agent(client, "echo-1")).status == BUSY

        session_id = await new_session(client)
        message = await send(client, session_id, "echo please")  # bounded: it must not hang
        assert message.state == FAILED
        assert "'echo'" in message.state_reason and "busy" in message.state_reason
        assert not recorder.dispatches
        assert not [a for a in await session_agents(client, session_id) if not a.internal]


async def test_no_agent_of_the_type_fails_the_message_naming_the_type(client: Client) -> None:
    session_id = await new_session(client)
    message = await send(client, session_id, "hello", data({"target_agent": "ghost-writer"}))
    assert message.state == FAILED
    assert "'ghost-writer'" in message.state_reason
    assert "none is registered" in message.state_reason


async def test_registered_but_never_connected_instance_fails_over_or_fails_clearly(client: Client) -> None:
    await register_connected(client, "echo-0", skills=ECHO_SKILLS)  # no Connect stream

    alone = await new_session(client)
    message = await send(client, alone, "echo anyone")
    assert message.state == FAILED
    assert "echo-0" in message.state_reason and "not connected" in message.state_reason
    assert (await get_agent(client, "echo-0")).connection.failures == 1

    async with running_agent(client, echo, instance_id="echo-1", skills=ECHO_SKILLS):
        session_id = await new_session(client)
        await invite(client, session_id, "echo", "echo-0")
        message = await send(client, session_id, "echo anyone")
        assert message.state == COMPLETED, message.state_reason
        assert message.instance_id == "echo-1"
        agents = {a.instance_id: a for a in await session_agents(client, session_id, include_departed=True)}
        assert agents["echo-0"].HasField("left_at")
        assert agents["echo-1"].join_reason == ROUTED and not agents["echo-1"].HasField("left_at")


# --- outcomes the agent decides -------------------------------------------------------


async def test_an_agent_that_times_out_fails_the_message_and_its_handler_is_cancelled() -> None:
    slow = Slow()
    async with (
        running_server(dispatch={"timeout_ms": 300}) as client,
        running_agent(client, slow, instance_id="echo-1", skills=ECHO_SKILLS),
    ):
        session_id = await new_session(client)
        message = await send(client, session_id, "echo slowly")
        assert message.state == FAILED
        assert "echo-1" in message.state_reason
        assert "did not finish within 0.3s" in message.state_reason
        # The mesh sent DispatchCancel: the agent's handler stopped.
        await asyncio.wait_for(slow.cancelled.wait(), WAIT)
        agent = await get_agent(client, "echo-1")
        assert (agent.connection.successes, agent.connection.failures) == (0, 1)
        assert "did not finish within" in agent.connection.last_error
        assert agent.connection.connected  # a slow dispatch does not cost the stream


async def test_an_agent_whose_handler_raises_fails_the_message_with_the_error() -> None:
    async def broken(dispatch: Dispatch, reply: Reply) -> None:
        raise RuntimeError("the database is down")

    async with (
        running_server() as client,
        running_agent(client, broken, instance_id="echo-1", skills=ECHO_SKILLS),
    ):
        session_id = await new_session(client)
        message = await send(client, session_id, "echo this")
        assert message.state == FAILED
        assert message.state_reason == "RuntimeError: the database is down"
        agent = await get_agent(client, "echo-1")
        assert agent.connection.failures == 1
        assert "the database is down" in agent.connection.last_error
        assert agent.connection.connected  # a failing handler does not cost the stream


async def test_reject_and_input_required_end_the_send_with_the_agents_words() -> None:
    async def picky(dispatch: Dispatch, reply: Reply) -> None:
        if "refuse" in dispatch.text:
            await reply.reject("I only echo polite requests")
        else:
            await reply.input_required("Which account should I use?")

    async with (
        running_server() as client,
        running_agent(client, picky, instance_id="echo-1", skills=ECHO_SKILLS),
    ):
        session_id = await new_session(client)
        refused = await send(client, session_id, "echo refuse this")
        assert refused.state == REJECTED
        assert refused.state_reason == "I only echo polite requests"

        asking = await send(client, session_id, "echo my balance")
        assert asking.state == INPUT_REQUIRED
        assert asking.state_reason == "waiting for a human: answer: Which account should I use?"
        assert len(asking.input_request_ids) == 1
        assert asking.history[-1].role == message_types_pb2.ROLE_AGENT
        assert asking.history[-1].parts[0].text == "Which account should I use?"
        assert asking.history[-1].instance_id == "echo-1"
        # A message waiting for input is not terminal: it can be cancelled.
        canceled = await cancel_message(client, session_id, asking.message_id, "never mind")
        assert (canceled.state, canceled.state_reason) == (CANCELED, "never mind")


async def test_cancel_while_working_cancels_the_handler_and_a_terminal_cancel_is_refused() -> None:
    slow = Slow()

    async def handler(dispatch: Dispatch, reply: Reply) -> None:
        if "slow" in dispatch.text:
            await slow(dispatch, reply)
        else:
            await echo(dispatch, reply)

    async with (
        running_server() as client,
        running_agent(client, handler, instance_id="echo-1", skills=ECHO_SKILLS),
    ):
        session_id = await new_session(client)
        sending = asyncio.create_task(send(client, session_id, "echo slow", message_id="m-slow"))
        await asyncio.wait_for(slow.started.wait(), WAIT)
        assert (await get_message(client, session_id, "m-slow")).state == WORKING

        canceled = await cancel_message(client, session_id, "m-slow", "the user changed their mind")
        assert (canceled.state, canceled.state_reason) == (CANCELED, "the user changed their mind")
        assert (await sending).state == CANCELED
        await asyncio.wait_for(slow.cancelled.wait(), WAIT)

        with pytest.raises(aio.AioRpcError) as again:
            await cancel_message(client, session_id, "m-slow")
        assert code_of(again) == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(again)[0] == "MESSAGE_TERMINAL"

        done = await send(client, session_id, "echo quick")
        assert done.state == COMPLETED, done.state_reason
        with pytest.raises(aio.AioRpcError) as terminal:
            await cancel_message(client, session_id, done.message_id)
        assert code_of(terminal) == grpc.StatusCode.FAILED_PRECONDITION
        assert (await get_message(client, session_id, done.message_id)).state == COMPLETED


async def test_closing_the_session_cancels_the_running_dispatch() -> None:
    slow = Slow()
    async with (
        running_server() as client,
        running_agent(client, slow, instance_id="echo-1", skills=ECHO_SKILLS),
    ):
        session_id = await new_session(client)
        sending = asyncio.create_task(send(client, session_id, "echo forever", message_id="m-1"))
        await asyncio.wait_for(slow.started.wait(), WAIT)
        await close_session(client, session_id)
        message = await sending
        assert message.state == CANCELED
        assert "session closed" in message.state_reason
        await asyncio.wait_for(slow.cancelled.wait(), WAIT)
        assert list((await get_agent(client, "echo-1")).session_ids) == []


# --- the Connect stream itself ----------------------------------------------------------


@pytest.mark.parametrize("how", ["half-close", "cancel"])
async def test_a_stream_that_drops_mid_dispatch_fails_the_message(how: str) -> None:
    async with running_server() as client, raw_agent(client, "raw-1") as raw:
        session_id = await new_session(client)
        sending = asyncio.create_task(send(client, session_id, "work", data({"target_agent": "echo"})))
        dispatch = await raw.dispatch()
        assert dispatch.session_id == session_id
        assert dispatch.deadline.seconds > 0
        await acknowledge(client, raw, dispatch)
        if how == "half-close":
            raw.end()
            assert await raw.ended()  # the mesh closes its side too
        else:
            raw.call.cancel()

        message = await sending
        assert message.state == FAILED
        assert "raw-1" in message.state_reason
        assert "stream dropped mid-dispatch" in message.state_reason
        agent = await get_agent(client, "raw-1")
        assert not agent.connection.connected
        assert agent.connection.failures == 1
        assert "stream dropped" in agent.connection.last_error


async def test_a_stream_that_drops_before_acknowledging_fails_over_then_reconnects() -> None:
    recorder = Recorder()
    async with running_server() as client, raw_agent(client, "raw-1") as raw:
        async with running_agent(client, recorder, instance_id="echo-2"):
            session_id = await new_session(client)
            await invite(client, session_id, "echo", "raw-1")  # affinity sends the dispatch to raw-1
            sending = asyncio.create_task(send(client, session_id, "work", data({"target_agent": "echo"})))
            dispatch = await raw.dispatch()
            raw.end()  # never acknowledged: nothing was delivered, so failing over is safe

            message = await sending
            assert message.state == COMPLETED, message.state_reason
            assert message.instance_id == "echo-2"
            assert artifact_texts(message) == ["echo: work"]
            assert [d.message.message_id for d in recorder.dispatches] == [dispatch.message.message_id]
            agents = {
                a.instance_id: a for a in await session_agents(client, session_id, include_departed=True)
            }
            assert agents["raw-1"].join_reason == INVITED and agents["raw-1"].HasField("left_at")
            assert agents["echo-2"].join_reason == ROUTED and not agents["echo-2"].HasField("left_at")

            dropped = await get_agent(client, "raw-1")
            assert not dropped.connection.connected
            assert dropped.connection.transport == "connect-stream"
            assert "stream" in dropped.connection.last_error

        # Reconnecting (a new hello) resumes the instance: connected and routable again.
        async with raw_agent(client, "raw-1", register=False) as again:
            back = await get_agent(client, "raw-1")
            assert back.connection.connected
            assert back.connection.connected_since.ToNanoseconds() > 0
            other = await new_session(client)
            sending = asyncio.create_task(send(client, other, "again", data({"target_agent": "echo/raw-1"})))
            dispatch = await again.dispatch()
            again.update(dispatch.dispatch_id, WORKING)
            again.update(
                dispatch.dispatch_id,
                COMPLETED,
                artifacts=[message_types_pb2.Artifact(parts=[text("raw says hi")])],
            )
            message = await sending
            assert message.state == COMPLETED, message.state_reason
            assert message.instance_id == "raw-1"
            assert artifact_texts(message) == ["raw says hi"]


@pytest.mark.parametrize("asked", [True, False])
async def test_dispatches_are_signed_only_for_an_agent_whose_hello_asks(asked: bool) -> None:
    async with running_server() as client, raw_agent(client, "raw-1", dispatch_tokens=asked) as raw:
        session_id = await new_session(client)
        sending = asyncio.create_task(send(client, session_id, "work", data({"target_agent": "echo"})))
        dispatch = await raw.dispatch()
        if asked:
            keys = await client.auth.GetDispatchKeys(auth_service_pb2.GetDispatchKeysRequest())
            [jwk] = json_format.MessageToDict(keys.jwks)["keys"]
            claims = jwt.decode(
                dispatch.dispatch_token,
                jwt.PyJWK(jwk).key,
                algorithms=["EdDSA"],
                audience="raw-1",
                issuer=keys.issuer,
            )
            assert (claims["dispatch_id"], claims["session_id"]) == (dispatch.dispatch_id, session_id)
        else:
            assert dispatch.dispatch_token == ""
        raw.update(dispatch.dispatch_id, COMPLETED)
        assert (await sending).state == COMPLETED


async def test_updates_for_several_dispatches_in_one_batch_frame_are_each_applied_in_order() -> None:
    async with running_server() as client, raw_agent(client, "raw-1") as raw:
        assert raw.welcomed.update_batches  # the mesh says it reads them
        sessions = [await new_session(client) for _ in range(2)]
        sending = [
            asyncio.create_task(send(client, s, f"work {n}", data({"target_agent": "echo/raw-1"})))
            for n, s in enumerate(sessions)
        ]
        dispatches = [await raw.dispatch(), await raw.dispatch()]
        first, second = sorted(dispatches, key=lambda d: d.message.parts[0].text)

        def update(dispatch: registry_service_pb2.Dispatch, state: int, **fields: Any) -> Any:
            return registry_service_pb2.DispatchUpdate(
                dispatch_id=dispatch.dispatch_id, state=state, **fields
            )

        artifact = message_types_pb2.Artifact(parts=[text("made in a batch")])
        batch = registry_service_pb2.DispatchUpdateBatch(
            updates=[
                update(first, WORKING),
                update(second, WORKING),
                update(first, 0, artifacts=[artifact]),
                update(first, COMPLETED),
                update(second, FAILED, reason="cannot do work 1"),
                update(second, COMPLETED),  # after the terminal one: ignored
            ]
        )
        raw.send(registry_service_pb2.ConnectRequest(update_batch=batch))
        done, failed = await asyncio.gather(*sending)
        assert done.state == COMPLETED and artifact_texts(done) == ["made in a batch"]
        assert failed.state == FAILED and "cannot do work 1" in failed.state_reason


async def test_dispatches_queued_together_go_out_in_one_frame_for_an_agent_that_reads_batches() -> None:
    signed: list[str] = []

    def job(dispatch_id: str) -> DispatchJob:
        def sign() -> str:
            signed.append(dispatch_id)
            return f"token-{dispatch_id}"

        return dispatch_job(dispatch_id, sign=sign)

    def queued() -> asyncio.Queue[Outbound | None]:
        outbox: asyncio.Queue[Outbound | None] = asyncio.Queue()
        for out in (
            Outbound("d1", job("d1")),
            Outbound("d2", job("d2")),
            Outbound("d1", cancel_reason="withdrawn"),
            Outbound("d3", job("d3")),
            None,
            Outbound("d4", job("d4")),  # after the end: never sent
        ):
            outbox.put_nowait(out)
        return outbox

    def shape(frame: registry_service_pb2.ConnectResponse) -> Any:
        kind = frame.WhichOneof("payload")
        if kind == "dispatch_batch":
            return [d.dispatch_id for d in frame.dispatch_batch.dispatches]
        return frame.dispatch.dispatch_id if kind == "dispatch" else (kind, frame.cancel.dispatch_id)

    batching = registry_service_pb2.ConnectHello(dispatch_batches=True)
    frames = [f async for f in _frames(queued(), batching)]
    assert [shape(f) for f in frames] == [["d1", "d2"], ("cancel", "d1"), "d3"]
    assert all(d.dispatch_token == "" for d in frames[0].dispatch_batch.dispatches) and signed == []

    one_by_one = registry_service_pb2.ConnectHello(dispatch_tokens=True)
    frames = [f async for f in _frames(queued(), one_by_one)]
    assert [shape(f) for f in frames] == ["d1", "d2", ("cancel", "d1"), "d3"]
    assert frames[0].dispatch.dispatch_token == "token-d1" and signed == ["d1", "d2", "d3"]


async def test_a_second_connect_for_the_same_instance_replaces_the_first() -> None:
    async with running_server() as client, raw_agent(client, "raw-1") as first:
        session_id = await new_session(client)
        sending = asyncio.create_task(send(client, session_id, "work", data({"target_agent": "echo/raw-1"})))
        dispatch = await first.dispatch()
        await acknowledge(client, first, dispatch)

        async with raw_agent(client, "raw-1", register=False) as second:
            assert await first.ended()  # the older stream is closed by the mesh
            message = await sending  # what the old stream was working on fails with the cause
            assert message.state == FAILED
            assert "replaced by a newer stream" in message.state_reason

            # The old stream's own end must not mark the instance disconnected.
            first.end()
            await asyncio.sleep(0.05)
            assert (await get_agent(client, "raw-1")).connection.connected

            # New work goes to the new stream.
            other = await new_session(client)
            sending = asyncio.create_task(send(client, other, "more", data({"target_agent": "echo/raw-1"})))
            fresh = await second.dispatch()
            second.update(fresh.dispatch_id, COMPLETED, turn=message_types_pb2.Turn(parts=[text("done")]))
            message = await sending
            assert message.state == COMPLETED, message.state_reason
            assert message.history[-1].parts[0].text == "done"


async def test_connect_hello_checks(client: Client) -> None:
    await register_connected(client, "raw-1")
    await client.registry.RegisterAgent(
        registry_service_pb2.RegisterAgentRequest(
            agent_type="hosted", instance_id="hosted-1", url="http://127.0.0.1:9"
        ),
        metadata=await client.md(),
    )
    md = await client.md()

    async def connect_error(first: Callable[[RawAgent], None], metadata: Any = md) -> aio.AioRpcError:
        raw = RawAgent(client, metadata, "raw-1")
        try:
            first(raw)
            with pytest.raises(aio.AioRpcError) as excinfo:
                await raw.receive()
            return rpc_error(excinfo)
        finally:
            raw.close()

    not_hello = await connect_error(lambda raw: raw.heartbeat())
    assert not_hello.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(not_hello) == ("INVALID_ARGUMENT", "hello")

    unknown = await connect_error(lambda raw: raw.hello("nobody"))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND

    hosted = await connect_error(lambda raw: raw.hello("hosted-1"))
    assert hosted.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(hosted)[0] == "NOT_A_CONNECTED_AGENT"

    read_only = await connect_error(lambda raw: raw.hello(), await client.md("acme-read"))
    assert read_only.code() == grpc.StatusCode.PERMISSION_DENIED

    other_tenant = await connect_error(lambda raw: raw.hello(), await client.md("globex-full"))
    assert other_tenant.code() == grpc.StatusCode.NOT_FOUND

    anonymous = await connect_error(lambda raw: raw.hello(), ())
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED

    # None of these touched the instance's connection state.
    assert not (await get_agent(client, "raw-1")).connection.connected

    # A stream the agent ends before saying anything just ends.
    raw = RawAgent(client, md, "raw-1")
    raw.end()
    assert await raw.ended()
    assert await raw.call.code() == grpc.StatusCode.OK


async def test_an_invalid_update_fails_the_dispatch_with_the_cause(client: Client) -> None:
    async with raw_agent(client, "raw-1") as raw:
        session_id = await new_session(client)
        sending = asyncio.create_task(send(client, session_id, "work", data({"target_agent": "echo"})))
        dispatch = await raw.dispatch()
        raw.update("dsp_unknown", COMPLETED)  # an update for no dispatch in flight is ignored
        raw.update(dispatch.dispatch_id, WORKING)
        bad_part = message_types_pb2.Part(
            file=message_types_pb2.FilePart(name="x.bin")
        )  # neither bytes nor uri
        raw.update(dispatch.dispatch_id, artifacts=[message_types_pb2.Artifact(parts=[bad_part])])
        message = await sending
        assert message.state == FAILED
        assert "the agent sent an invalid update" in message.state_reason
        assert "update.artifacts[0].parts[0].file" in message.state_reason
        assert (await get_agent(client, "raw-1")).connection.connected


async def test_heartbeats_on_the_stream_update_the_instance() -> None:
    async with running_server(heartbeat_timeout_ms=450) as client:
        async with running_agent(client, echo, instance_id="echo-1"):
            connected = await get_agent(client, "echo-1")
            assert connected.reported_status == UNKNOWN
            since = connected.last_seen_at.ToNanoseconds()

            async def beaten() -> bool:
                agent = await get_agent(client, "echo-1")
                return agent.reported_status == AVAILABLE and agent.last_seen_at.ToNanoseconds() > since

            await eventually(beaten)  # the helper heartbeats every heartbeat_timeout/3 on its own

        async with raw_agent(client, "raw-1") as raw:
            before = (await get_agent(client, "raw-1")).last_seen_at.ToNanoseconds()
            raw.heartbeat(status=BUSY, current_sessions=3)

            async def busy() -> bool:
                agent = await get_agent(client, "raw-1")
                return agent.reported_status == BUSY and agent.last_seen_at.ToNanoseconds() > before

            await eventually(busy)
            agent = await get_agent(client, "raw-1")
            assert (agent.status, agent.reported_sessions) == (BUSY, 3)
            raw.heartbeat(status=AVAILABLE, current_sessions=0)

            async def available() -> bool:
                return (await get_agent(client, "raw-1")).status == AVAILABLE

            await eventually(available)


async def test_an_invalid_heartbeat_on_the_stream_is_reported_to_the_agent(client: Client) -> None:
    async with raw_agent(client, "raw-1") as raw:
        raw.heartbeat(status=99)  # not an AgentStatus
        with pytest.raises(aio.AioRpcError) as excinfo:
            await raw.receive()
        assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(excinfo)[1] == "heartbeat.status"


async def test_the_helper_agent_resumes_after_the_mesh_restarts() -> None:
    recorder = Recorder()
    async with running_server() as client:
        port = client.server.port
        agent = ConnectedAgent(
            client.server.target,
            client_id="acme-full",
            client_secret=SECRET,
            agent_type="echo",
            instance_id="echo-1",
            handler=recorder,
            skills=ECHO_SKILLS,
            reconnect_delay_s=0.05,
        )
        task = asyncio.create_task(agent.run())
        try:
            await asyncio.wait_for(agent.connected.wait(), WAIT)
        except BaseException:
            await agent.stop()
            task.cancel()
            raise
    try:

        async def disconnected() -> bool:
            return not agent.connected.is_set()

        await eventually(disconnected)
        # The same address, a fresh process: nothing registered, a new dispatch signing key.
        async with running_server(grpc_address=f"127.0.0.1:{port}") as client:
            await asyncio.wait_for(agent.connected.wait(), 5.0)  # 1 s was too tight at load 7
            assert (await get_agent(client, "echo-1")).connection.connected
            session_id = await new_session(client)
            message = await send(client, session_id, "echo after restart")
            assert message.state == COMPLETED, message.state_reason
            await agent.stop()
    finally:
        await agent.stop()
        await asyncio.wait_for(task, WAIT)


# --- isolation ----------------------------------------------------------------------------


async def test_two_sessions_sharing_one_instance_never_see_each_other() -> None:
    recorder = Recorder(say=True)
    async with (
        running_server() as client,
        running_agent(client, recorder, instance_id="echo-1", skills=ECHO_SKILLS, verify_dispatches=True),
    ):
        alpha, bravo = await new_session(client), await new_session(client)
        a1 = await send(client, alpha, "echo alpha secret one")
        b1 = await send(client, bravo, "echo bravo secret one")
        a2 = await send(client, alpha, "echo alpha secret two")
        assert {m.state for m in (a1, b1, a2)} == {COMPLETED}
        assert {m.instance_id for m in (a1, b1, a2)} == {"echo-1"}
        assert sorted((await get_agent(client, "echo-1")).session_ids) == sorted([alpha, bravo])

        # Each dispatch carried its own session, in the dispatch and in its signed token.
        seen = [(d.session_id, d.claims["session_id"], d.text) for d in recorder.dispatches]
        assert seen == [
            (alpha, alpha, "echo alpha secret one"),
            (bravo, bravo, "echo bravo secret one"),
            (alpha, alpha, "echo alpha secret two"),
        ]
        for dispatch in recorder.dispatches:
            history_text = " ".join(p.text for t in dispatch.message.history for p in t.parts)
            other = "bravo" if dispatch.session_id == alpha else "alpha"
            assert other not in history_text

        md = await client.md()
        listed = await client.messages.ListMessages(
            message_service_pb2.ListMessagesRequest(session_id=alpha), metadata=md
        )
        assert [m.message_id for m in listed.messages] == [a1.message_id, a2.message_id]
        listed = await client.messages.ListMessages(
            message_service_pb2.ListMessagesRequest(session_id=bravo), metadata=md
        )
        assert [m.message_id for m in listed.messages] == [b1.message_id]

        await close_session(client, alpha)
        events = await watch_to_end(client, alpha)
        mentioned = {message_id_of(e) for e in events} - {""}
        assert mentioned == {a1.message_id, a2.message_id}
        turns = [event_kind(e)[1] for e in events if e.WhichOneof("event") == "turn_added"]
        assert turns == ["working on echo alpha secret one", "working on echo alpha secret two"]
        assert all(e.session_id == alpha for e in events)


# --- streams of events ------------------------------------------------------------------------


async def test_send_streaming_message_yields_only_its_own_events_in_order() -> None:
    beta_started = asyncio.Event()

    async def streaming(dispatch: Dispatch, reply: Reply) -> None:
        if "beta" in dispatch.text:
            beta_started.set()
            await reply.say("beta working")
            await reply.artifact("beta output")
            return
        await reply.say("alpha step 1")
        await asyncio.wait_for(beta_started.wait(), WAIT)
        await asyncio.sleep(0.05)  # let beta's events land in the session log in between
        await reply.artifact("alpha part 1")
        await reply.say("alpha step 2")
        await reply.artifact("alpha part 2")
        await reply.complete("alpha done")

    async with (
        running_server() as client,
        running_agent(client, streaming, instance_id="echo-1", skills=ECHO_SKILLS),
    ):
        session_id = await new_session(client)
        call = client.messages.SendStreamingMessage(
            message_service_pb2.SendStreamingMessageRequest(
                session_id=session_id, message=outgoing("echo alpha", message_id="alpha")
            ),
            metadata=await client.md(),
        )
        events: list[event_types_pb2.SessionEvent] = []
        while not events or event_kind(events[-1]) != ("turn", "alpha step 1"):
            response = await asyncio.wait_for(call.read(), WAIT)
            assert response is not aio.EOF
            events.append(response.event)
        beta = await send(client, session_id, "echo beta", message_id="beta")
        assert beta.state == COMPLETED, beta.state_reason
        events += [r.event for r in await collect(call)]
        assert await call.code() == grpc.StatusCode.OK

        assert {message_id_of(e) for e in events} == {"alpha"}
        assert [event_kind(e) for e in events] == [
            ("state", SUBMITTED),
            ("state", WORKING),
            ("turn", "alpha step 1"),
            ("artifact", "alpha part 1"),
            ("turn", "alpha step 2"),
            ("artifact", "alpha part 2"),
            ("turn", "alpha done"),
            ("state", COMPLETED),
        ]
        sequences = [e.sequence for e in events]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
        assert sequences[-1] - sequences[0] > len(sequences) - 1  # beta's events were in between
        final = events[-1].message_state_changed.message
        assert final.state == COMPLETED
        assert artifact_texts(final) == ["alpha part 1", "alpha part 2"]


async def test_send_streaming_message_with_bad_input_is_invalid_argument(client: Client) -> None:
    session_id = await new_session(client)
    call = client.messages.SendStreamingMessage(
        message_service_pb2.SendStreamingMessageRequest(session_id=session_id, message=outgoing()),
        metadata=await client.md(),
    )
    with pytest.raises(aio.AioRpcError) as excinfo:
        await collect(call)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(excinfo)[1] == "message.parts"


async def test_a_slow_subscriber_is_cut_off_and_the_session_goes_on() -> None:
    turns = 60

    async def chatty(dispatch: Dispatch, reply: Reply) -> None:
        for index in range(turns):
            await reply.say(f"{index:03} " + "x" * 4000)
        await reply.complete()

    async with (
        running_server(subscriber_buffer=8) as client,
        running_agent(client, chatty, instance_id="echo-1", skills=ECHO_SKILLS),
        # A client that does not read: without BDP probing its receive window stays small,
        # so the server's writes (and the subscriber's buffer) back up.
        aio.insecure_channel(client.server.target, options=[("grpc.http2.bdp_probe", 0)]) as channel,
    ):
        md = await client.md()
        session_id = await new_session(client)
        watching = session_service_pb2_grpc.SessionServiceStub(channel).WatchSession(
            session_service_pb2.WatchSessionRequest(session_id=session_id), metadata=md
        )
        streaming = message_service_pb2_grpc.MessageServiceStub(channel).SendStreamingMessage(
            message_service_pb2.SendStreamingMessageRequest(
                session_id=session_id, message=outgoing("echo a lot", message_id="m-1")
            ),
            metadata=md,
        )
        try:

            async def exists() -> bool:
                listed = await client.messages.ListMessages(
                    message_service_pb2.ListMessagesRequest(session_id=session_id), metadata=md
                )
                return bool(listed.messages)

            await eventually(exists)
            # The message finishes while neither subscriber reads: the session is not held back.
            message = await wait_for_state(client, session_id, "m-1", COMPLETED, FAILED)
            assert message.state == COMPLETED, message.state_reason
            assert len(message.history) == turns + 1

            for call, total in ((streaming, turns + 3), (watching, turns + 11)):
                received = 0
                with pytest.raises(aio.AioRpcError) as excinfo:
                    while await asyncio.wait_for(call.read(), WAIT) is not aio.EOF:
                        received += 1
                assert code_of(excinfo) == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error_details(excinfo)[0] == "SUBSCRIBER_TOO_SLOW"
                assert "after_sequence=" in rpc_error(excinfo).details()
                assert received < total
        finally:
            watching.cancel()
            streaming.cancel()


# --- Converse ---------------------------------------------------------------------------------


async def test_converse_carries_two_messages_and_a_cancel_then_ends_with_the_session() -> None:
    slow = Slow()
    talker = Recorder(say=True)

    async def handler(dispatch: Dispatch, reply: Reply) -> None:
        if "slow" in dispatch.text:
            await slow(dispatch, reply)
        else:
            await talker(dispatch, reply)

    async with (
        running_server() as client,
        running_agent(client, handler, instance_id="echo-1", skills=ECHO_SKILLS),
        conversation(client) as conv,
    ):
        session_id = await new_session(client)
        conv.open(session_id)
        conv.send("echo one", message_id="m1")
        await conv.until_event(is_state("m1", COMPLETED))
        conv.send("echo two", message_id="m2")
        await conv.until_event(is_state("m2", COMPLETED))
        conv.send("echo slow", message_id="m3")
        await asyncio.wait_for(slow.started.wait(), WAIT)
        conv.cancel("m3", "changed my mind")
        await conv.until_event(is_state("m3", CANCELED))
        await asyncio.wait_for(slow.cancelled.wait(), WAIT)

        await close_session(client, session_id)  # from another call: the stream ends
        await conv.until_end()
        assert await conv.call.code() == grpc.StatusCode.OK

        events = conv.events
        assert not [r for r in conv.responses if r.WhichOneof("payload") == "error"]
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert all(e.session_id == session_id for e in events)

        def kinds(message_id: str) -> list[tuple[Any, ...]]:
            return [event_kind(e) for e in events if message_id_of(e) == message_id]

        for message_id, said in (("m1", "echo one"), ("m2", "echo two")):
            assert kinds(message_id) == [
                ("state", SUBMITTED),
                ("state", WORKING),
                ("turn", f"working on {said}"),
                ("artifact", f"echo: {said}"),
                ("state", COMPLETED),
            ]
        assert kinds("m3") == [("state", SUBMITTED), ("state", WORKING), ("state", CANCELED)]
        canceled = next(e for e in events if is_state("m3", CANCELED)(e))
        assert canceled.message_state_changed.reason == "changed my mind"
        assert ("joined", "echo-1") in [event_kind(e) for e in events]  # routed in by m1
        assert event_kind(events[-1]) == ("status", 4)  # SESSION_STATUS_CLOSED

        # It is every event of the session: the same log WatchSession replays.
        watched = await watch_to_end(client, session_id)
        assert [(e.sequence, event_kind(e)) for e in watched] == [(e.sequence, event_kind(e)) for e in events]

        # Converse with after_sequence replays from there (here: after m1 completed).
        after = next(e.sequence for e in events if is_state("m1", COMPLETED)(e))
        async with conversation(client) as replay:
            replay.open(session_id, after_sequence=after)
            await replay.until_end()
            assert [(e.sequence, event_kind(e)) for e in replay.events] == [
                (e.sequence, event_kind(e)) for e in events if e.sequence > after
            ]
            assert replay.events[0].message_state_changed.message_id == "m2"


async def test_converse_reports_bad_actions_without_closing_the_stream() -> None:
    async with (
        running_server() as client,
        running_agent(client, echo, instance_id="echo-1", skills=ECHO_SKILLS),
        conversation(client) as conv,
    ):
        session_id = await new_session(client)
        conv.open(session_id)

        conv.send()  # no parts
        error = await conv.error()
        assert (error.code, error.reason, error.field) == (
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
            "INVALID_ARGUMENT",
            "send.parts",  # the field's path in the Converse request
        )
        assert error.message

        conv.send("hi", data({"target_agent": 7}), message_id="m-bad")
        error = await conv.error()
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert error.field == "send.parts[1].data.target_agent"
        # Each error names the action and the id it named: with several in flight, the client
        # knows which one failed.
        assert (error.action, error.subject_id) == ("send", "m-bad")

        conv.cancel("no-such-message")
        error = await conv.error()
        assert error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert (error.action, error.subject_id) == ("cancel", "no-such-message")

        conv.open(session_id)  # already bound
        error = await conv.error()
        assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "open")
        assert (error.action, error.subject_id) == ("open", "")

        # Still open: a good message goes through on the same stream.
        conv.send("echo still here", message_id="ok")
        await conv.until_event(is_state("ok", COMPLETED))
        message = await get_message(client, session_id, "ok")
        assert artifact_texts(message) == ["echo: echo still here"]


async def test_converse_must_start_with_open_and_name_a_session_of_the_tenant(client: Client) -> None:
    session_id = await new_session(client)
    async with conversation(client) as conv:
        conv.send("hello")
        with pytest.raises(aio.AioRpcError) as excinfo:
            await conv.next()
        assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(excinfo)[1] == "open"

    async with conversation(client, await client.md("globex-full")) as conv:
        conv.open(session_id)
        with pytest.raises(aio.AioRpcError) as excinfo:
            await conv.next()
        assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND


# --- the example agent ------------------------------------------------------------------------


async def test_the_example_echo_agent_works_against_a_development_server() -> None:
    spec = importlib.util.spec_from_file_location("echo_agent_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    async with running_server(env={}, tenants=[]) as client:
        token = await client.auth.GetToken(
            auth_service_pb2.GetTokenRequest(
                client_id="svantic", client_secret="your-secret", agent_type="a2ui-terminal"
            )
        )
        md = (("authorization", f"Bearer {token.token}"),)
        async with run_agent(example.make_agent(client.server.target, "echo-1")):
            session_id = await new_session(client, md=md)
            by_skill = await send(client, session_id, "please echo this", md=md)
            assert by_skill.state == COMPLETED, by_skill.state_reason
            assert artifact_texts(by_skill) == ["echo: please echo this"]
            assert by_skill.artifacts[0].name == "echo"

            by_target = await send(client, session_id, "hi", data({"target_agent": "echo"}), md=md)
            assert by_target.state == COMPLETED, by_target.state_reason
            assert artifact_texts(by_target) == ["echo: hi"]
            assert by_target.instance_id == "echo-1"


async def test_a_number_json_cannot_hold_is_invalid_argument_naming_the_part(client: Client) -> None:
    session_id = await new_session(client)
    nan = message_types_pb2.Part()
    nan.data.update({"score": float("nan")})
    with pytest.raises(aio.AioRpcError) as excinfo:
        await client.messages.SendMessage(
            message_service_pb2.SendMessageRequest(session_id=session_id, message=outgoing(text("hi"), nan)),
            metadata=await client.md(),
        )
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(excinfo) == ("INVALID_ARGUMENT", "message.parts[1].data")
    listed = await client.messages.ListMessages(
        message_service_pb2.ListMessagesRequest(session_id=session_id), metadata=await client.md()
    )
    assert list(listed.messages) == []  # nothing half-accepted


async def test_batched_frames_stay_far_below_grpcs_message_limit() -> None:
    def job(n: int, text_size: int) -> Outbound:
        return Outbound(f"d{n}", dispatch_job(f"d{n}", text="x" * text_size))

    hello = registry_service_pb2.ConnectHello(dispatch_batches=True)
    for outs, sizes in (
        ([job(n, 600_000) for n in range(3)], [1, 1, 1]),  # two of them would pass 1 MiB
        ([job(n, 10) for n in range(BATCH_MAX + 6)], [BATCH_MAX, 6]),
    ):
        outbox: asyncio.Queue[Outbound | None] = asyncio.Queue()
        for out in [*outs, None]:
            outbox.put_nowait(out)
        frames = [f async for f in _frames(outbox, hello)]
        counts = [len(f.dispatch_batch.dispatches) if f.HasField("dispatch_batch") else 1 for f in frames]
        assert counts == sizes
        assert all(f.ByteSize() < BATCH_MAX_BYTES + 700_000 for f in frames)

    # The helper's updates: the same limits.
    agent_side = ConnectedAgent(
        "127.0.0.1:9", client_id="c", client_secret="s", agent_type="echo", instance_id="e1", handler=echo
    )

    async def frames_for(*sizes: int) -> list[int]:
        for n, size in enumerate(sizes):
            update = registry_service_pb2.DispatchUpdate(
                dispatch_id=f"d{n}", artifacts=[message_types_pb2.Artifact(parts=[text("y" * size)])]
            )
            agent_side._outbox.put_nowait(registry_service_pb2.ConnectRequest(update=update))
        agent_side._outbox.put_nowait(None)
        sent = [r async for r in agent_side._requests()]
        return [len(r.update_batch.updates) if r.HasField("update_batch") else 1 for r in sent]

    agent_side._batch_updates = True  # the mesh's welcome said it reads update batches
    assert await frames_for(600_000, 600_000, 600_000) == [1, 1, 1]
    assert await frames_for(10, 10, 10) == [3]
    agent_side._batch_updates = False  # a mesh that did not say so gets one update a frame
    assert await frames_for(10, 10, 10) == [1, 1, 1]


async def test_the_helper_folds_what_one_dispatch_says_in_one_frame_as_the_mesh_would() -> None:
    # An echo's acknowledgement, artifact and completion, queued together, go as one update (the
    # mesh reads one instead of three); the mesh makes the same updates of either.
    from svantic_grpc.api.convert_messages import update_from_pb
    from svantic_grpc.core.dispatch._connected import _merged

    agent_side = ConnectedAgent(
        "127.0.0.1:9", client_id="c", client_secret="s", agent_type="echo", instance_id="e1", handler=echo
    )
    agent_side._batch_updates = True
    working, completed = message_types_pb2.MESSAGE_STATE_WORKING, message_types_pb2.MESSAGE_STATE_COMPLETED

    def update(dispatch_id: str, **fields: Any) -> registry_service_pb2.DispatchUpdate:
        return registry_service_pb2.DispatchUpdate(dispatch_id=dispatch_id, **fields)

    def artifact(name: str) -> message_types_pb2.Artifact:
        return message_types_pb2.Artifact(name=name, parts=[text(name)])

    queued = [
        update("d1", state=working),
        update("d2", state=working),
        update("d1", artifacts=[artifact("a")]),
        update("d1", state=completed),
        update("d2", artifacts=[artifact("b")]),
        update("d2", turn=message_types_pb2.Turn(parts=[text("hi")]), state=completed),  # stays apart
        update("d3", state=working, reason="on it"),
    ]
    for item in [*queued, None]:
        agent_side._outbox.put_nowait(item)
    [frame] = [r async for r in agent_side._requests()]
    sent = list(frame.update_batch.updates)
    assert [(u.dispatch_id, u.state, [a.name for a in u.artifacts], u.HasField("turn")) for u in sent] == [
        ("d1", completed, ["a"], False),
        ("d2", message_types_pb2.MESSAGE_STATE_UNSPECIFIED, ["b"], False),
        ("d2", completed, [], True),
        ("d3", working, [], False),
    ]
    for dispatch_id in ("d1", "d2", "d3"):
        as_queued = _merged([update_from_pb(u) for u in queued if u.dispatch_id == dispatch_id])
        as_sent = _merged([update_from_pb(u) for u in sent if u.dispatch_id == dispatch_id])
        assert as_sent == as_queued
    assert queued[0].state == working and not queued[2].HasField("turn")  # what the handler sent: as it was


async def test_messages_sent_while_their_session_closes_all_end() -> None:
    # found from outside: a SendMessage racing a CloseSession answered UNAVAILABLE ("moved to another
    # replica") and its message stayed submitted in the closed session for ever (7 of 20 rounds)
    async with running_server() as client:
        md = await client.md()
        for _ in range(20):
            session_id = await new_session(client)
            sends = [
                client.messages.SendMessage(
                    message_service_pb2.SendMessageRequest(
                        session_id=session_id, message=outgoing(f"hi {i}")
                    ),
                    metadata=md,
                    timeout=WAIT,
                )
                for i in range(4)
            ]
            close = client.sessions.CloseSession(
                session_service_pb2.CloseSessionRequest(session_id=session_id), metadata=md, timeout=WAIT
            )
            results = await asyncio.gather(*sends, close, return_exceptions=True)
            for result in results[:-1]:
                if isinstance(result, grpc.aio.AioRpcError):
                    assert result.code() == grpc.StatusCode.FAILED_PRECONDITION, result  # "closed"
                else:
                    assert result.message.state in TERMINAL, result.message.state_reason
            listed = await client.messages.ListMessages(
                message_service_pb2.ListMessagesRequest(session_id=session_id), metadata=md
            )
            assert all(m.state in TERMINAL for m in listed.messages), [
                (m.state, m.state_reason) for m in listed.messages
            ]


async def test_after_a_close_that_failed_to_be_written_the_open_session_takes_messages_again() -> None:
    async with running_server() as client:
        session_id = await new_session(client)
        with closes_failing(client), pytest.raises(aio.AioRpcError):
            await client.sessions.CloseSession(
                session_service_pb2.CloseSessionRequest(session_id=session_id),
                metadata=await client.md(),
                timeout=WAIT,
            )
        # The session is still open and a message sent to it runs (it ended canceled for a minute).
        response = await client.sessions.GetSession(
            session_service_pb2.GetSessionRequest(session_id=session_id), metadata=await client.md()
        )
        assert response.session.status != session_types_pb2.SESSION_STATUS_CLOSED
        message = await send(client, session_id, "hello", data({"target_agent": "savant:chat"}))
        assert message.state == COMPLETED, message.state_reason


@pytest.mark.parametrize("waiting", [False, True], ids=["working", "input-required"])
async def test_the_agent_is_told_why_its_work_was_canceled(waiting: bool) -> None:
    # found from outside: the message's reason was the caller's, the agent's DispatchCancel said
    # "canceled by the mesh"
    async with running_server() as client, raw_agent(client, "raw-1") as raw:
        session_id = await new_session(client)
        sending = asyncio.create_task(send(client, session_id, "work", data({"target_agent": "echo"})))
        dispatch = await raw.dispatch()
        await acknowledge(client, raw, dispatch)
        if waiting:
            raw.update(
                dispatch.dispatch_id, INPUT_REQUIRED, turn=message_types_pb2.Turn(parts=[text("which?")])
            )
            await wait_for_state(client, session_id, dispatch.message.message_id, INPUT_REQUIRED)
        canceled = await cancel_message(client, session_id, dispatch.message.message_id, "changed my mind")
        assert (canceled.state, canceled.state_reason) == (CANCELED, "changed my mind")
        told = await raw.receive()
        assert told.WhichOneof("payload") == "cancel"
        assert (told.cancel.dispatch_id, told.cancel.reason) == (dispatch.dispatch_id, "changed my mind")
        await sending
