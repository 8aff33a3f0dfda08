"""Killed at random moments under load, the mesh keeps every acknowledged write and every invariant.

A real server process on a SQLite file runs a mixed workload (sessions, invites, messages to
connected agents, tool calls a policy decides, approvals pending and answered, closes) and is
killed with SIGKILL at a random moment, then started again on the same file, round after round.
After each kill the file is read directly (the process is gone, so it holds exactly what was
committed) and checked:

- every write a client was told succeeded is there (sessions, closes, messages, invites, answers);
- an ended input request has its audit record, and (unless a policy decided it) its
  ``input_ended`` event in the session log;
- an open session is paused exactly when something in it is pending; a closed one has nothing pending;
- an agent in a session has its ``agent_joined`` event;
- a message's state is the last state its log announced;
- no request is pending for a message that has ended;
- a session's status is the last status its log announced.

Since every kill lands after a restart (and its recovery), the checks also cover what recovery
wrote. A few rounds run in the normal suite; ``SVANTIC_CRASH_ROUNDS=50`` runs more, and
``SVANTIC_CRASH_SEED`` replays one sequence of kill moments.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from grpc import aio

from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Reply
from svantic_grpc.core.events import AgentJoined, InputEnded, MessageStateChanged, StatusChanged
from svantic_grpc.core.inputs.model import InputState, Surface
from svantic_grpc.core.models import JoinReason, SessionStatus
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub
from svantic_grpc.stores.sqlite import SqliteStore
from tests.durability.test_restart import WAIT, _client, _data, _free_port, _server, _until_serving

ROUNDS = int(os.environ.get("SVANTIC_CRASH_ROUNDS", "3"))
SEED = int(os.environ.get("SVANTIC_CRASH_SEED", str(random.randrange(1 << 30))))
TENANT = "dev"


@dataclass
class Acked:
    """Writes the server acknowledged (its RPC returned OK)."""

    sessions: set[str] = field(default_factory=set)
    closed: set[str] = field(default_factory=set)
    messages: set[tuple[str, str]] = field(default_factory=set)
    invited: set[tuple[str, str]] = field(default_factory=set)
    answered: dict[str, str] = field(default_factory=dict)
    """request id -> decision given."""


async def _workload(target: str, acked: Acked, rng: random.Random, names: itertools.count[int]) -> None:
    """Clients doing a bit of everything until the server dies under them."""
    with contextlib.suppress(aio.AioRpcError):  # the server died before the client got going
        await _work(target, acked, rng, names)


async def _work(target: str, acked: Acked, rng: random.Random, names: itertools.count[int]) -> None:
    async with _client(target) as (channel, md):
        sessions, messages = SessionServiceStub(channel), MessageServiceStub(channel)
        open_now: list[str] = []

        async def step() -> None:
            choice = rng.random()
            if choice < 0.15 or not open_now:
                session_id = f"s{next(names)}"
                await sessions.InitSession(
                    session_service_pb2.InitSessionRequest(session_id=session_id), metadata=md
                )
                acked.sessions.add(session_id)
                open_now.append(session_id)
            elif choice < 0.25:
                session_id = rng.choice(open_now)
                joined = await sessions.InviteAgent(
                    session_service_pb2.InviteAgentRequest(session_id=session_id, agent_type="crm"),
                    metadata=md,
                )
                acked.invited.add((session_id, joined.agent.instance_id))
            elif choice < 0.6:
                session_id, message_id = rng.choice(open_now), f"m{next(names)}"
                text = rng.choice(["delete record 7", "delete record 8", "read record 1", "hello"])
                parts = [message_types_pb2.Part(text=text), _data({"target_agent": "crm"})]
                request = message_service_pb2.SendMessageRequest(
                    session_id=session_id,
                    message=message_service_pb2.OutgoingMessage(message_id=message_id, parts=parts),
                )
                await messages.SendMessage(request, metadata=md)
                acked.messages.add((session_id, message_id))
            elif choice < 0.92:
                pending = await messages.ListPendingInputs(
                    message_service_pb2.ListPendingInputsRequest(), metadata=md
                )
                if pending.requests:
                    request_id = rng.choice(pending.requests).request_id
                    decision = rng.choice(
                        [message_types_pb2.DECISION_APPROVE, message_types_pb2.DECISION_DENY]
                    )
                    answer = message_types_pb2.Resolution(decision=decision, reason="not now")
                    await messages.ResolveInput(
                        message_service_pb2.ResolveInputRequest(request_id=request_id, resolution=answer),
                        metadata=md,
                    )
                    acked.answered[request_id] = (
                        "approve" if decision == message_types_pb2.DECISION_APPROVE else "deny"
                    )
            else:
                session_id = open_now.pop(rng.randrange(len(open_now)))
                await sessions.CloseSession(
                    session_service_pb2.CloseSessionRequest(session_id=session_id), metadata=md
                )
                acked.closed.add(session_id)

        while True:
            try:
                await step()
            except aio.AioRpcError as error:
                if error.code().name in (
                    "UNAVAILABLE",
                    "CANCELLED",
                    "UNKNOWN",
                    "DEADLINE_EXCEEDED",
                    "INTERNAL",
                ):
                    return  # the server is gone
                # Refusals (closed session, already answered, no agent) are part of the workload.


async def _check(db: Path, acked: Acked) -> list[str]:
    """Every broken promise and invariant in the file; empty when all hold."""
    problems: list[str] = []
    store = await SqliteStore.open(db)
    try:
        all_sessions = []
        cursor = ""
        while True:
            page = await store.list_sessions(tenant_id=TENANT, page_size=500, cursor=cursor)
            all_sessions.extend(page.sessions)
            cursor = page.next_cursor
            if not cursor:
                break
        by_id = {s.session_id: s for s in all_sessions}
        inputs = []
        cursor = ""
        while True:
            ipage = await store.list_inputs(tenant_id=TENANT, page_size=500, cursor=cursor)
            inputs.extend(ipage.requests)
            cursor = ipage.next_cursor
            if not cursor:
                break
        messages = []
        cursor = ""
        while True:
            mpage = await store.list_messages(tenant_id=TENANT, page_size=500, cursor=cursor)
            messages.extend(mpage.messages)
            cursor = mpage.next_cursor
            if not cursor:
                break
        audited = {r.request_id for r in await store.list_audit(tenant_id=TENANT)}
        logs = {
            s.session_id: [
                e.payload
                for e in await store.list_events(tenant_id=TENANT, session_id=s.session_id, limit=100_000)
            ]
            for s in all_sessions
        }
        message_by_key = {(m.session_id, m.message_id): m for m in messages}
        pending_by_session: dict[str, list[str]] = defaultdict(list)
        for request in inputs:
            if request.state is InputState.PENDING:
                pending_by_session[request.session_id].append(request.request_id)

        # Acknowledged writes
        for session_id in acked.sessions - by_id.keys():
            problems.append(f"acknowledged session {session_id} is missing")
        for session_id in acked.closed:
            if session_id in by_id and by_id[session_id].status is not SessionStatus.CLOSED:
                problems.append(
                    f"acknowledged close of {session_id} is lost ({by_id[session_id].status.value})"
                )
        for key in acked.messages - message_by_key.keys():
            problems.append(f"acknowledged message {key} is missing")
        for session_id, instance_id in acked.invited:
            session = by_id.get(session_id)
            if session is None or all(a.instance_id != instance_id for a in session.agents):
                problems.append(f"acknowledged invite of {instance_id} to {session_id} is lost")
        stored_inputs = {r.request_id: r for r in inputs}
        for request_id, decision in acked.answered.items():
            request = stored_inputs.get(request_id)
            if request is None or request.state is not InputState.RESOLVED or request.resolution is None:
                problems.append(f"acknowledged answer to {request_id} is lost")
            elif request.resolution.decision is None or request.resolution.decision.value != decision:
                problems.append(
                    f"answer to {request_id} is {request.resolution.decision}, {decision} was acknowledged"
                )

        # Invariants
        for request in inputs:
            if request.state is InputState.PENDING:
                message = message_by_key.get((request.session_id, request.message_id))
                if message is not None and message.state.terminal:
                    problems.append(
                        f"{request.request_id} is pending for {message.message_id}, {message.state.value}"
                    )
                continue
            if request.request_id not in audited:
                problems.append(f"{request.request_id} ended ({request.state.value}) without an audit record")
            policy = request.resolution is not None and request.resolution.surface is Surface.POLICY
            ended = any(
                isinstance(p, InputEnded) and p.request.request_id == request.request_id
                for p in logs.get(request.session_id, ())
            )
            if not policy and not ended:
                problems.append(
                    f"{request.request_id} ended ({request.state.value}) without an input_ended event"
                )
        for session in all_sessions:
            log = logs[session.session_id]
            pending = pending_by_session.get(session.session_id, [])
            if session.status is SessionStatus.CLOSED:
                if pending:
                    problems.append(f"closed session {session.session_id} has pending {pending}")
            elif (session.status is SessionStatus.PAUSED) != bool(pending):
                problems.append(
                    f"session {session.session_id} is {session.status.value} with pending {pending}"
                )
            statuses = [p.to_status for p in log if isinstance(p, StatusChanged)]
            if not statuses or statuses[-1] is not session.status:
                problems.append(
                    f"session {session.session_id} is {session.status.value}; its log says {statuses[-1:]}"
                )
            joined = {p.agent.instance_id for p in log if isinstance(p, AgentJoined)}
            for agent in session.agents:
                if agent.instance_id not in joined:
                    problems.append(
                        f"{agent.instance_id} is in {session.session_id} without an agent_joined event"
                    )
        # An instance serves exactly the open sessions it is in (the binding is written with the join,
        # the leave and the close, never apart from them).
        for registration in await store.list_agents(tenant_id=TENANT):
            serves = set(registration.session_ids)
            present = {
                s.session_id
                for s in all_sessions
                if s.status is not SessionStatus.CLOSED
                and any(
                    a.instance_id == registration.instance_id
                    and a.left_at is None
                    and a.join_reason is not JoinReason.SELF
                    for a in s.agents
                )
            }
            if serves != present:
                problems.append(
                    f"{registration.instance_id} is bound to {sorted(serves - present)} without being in them"
                    f" and in {sorted(present - serves)} without being bound"
                )
        for message in messages:
            states = [
                p.to_state
                for p in logs.get(message.session_id, ())
                if isinstance(p, MessageStateChanged) and p.message_id == message.message_id
            ]
            if not states or states[-1] is not message.state:
                said = [s.value for s in states[-1:]]
                problems.append(f"message {message.message_id} is {message.state.value}; its log says {said}")
    finally:
        await store.close()
    return problems


def _agent(target: str, instance_id: str) -> ConnectedAgent:
    async def handler(dispatch: Dispatch, reply: Reply) -> None:
        if "delete" in dispatch.text:
            approved = await reply.ask_approval("crm.delete_records", {"ids": [7]})
            await reply.artifact(f"approved: {approved}")
        elif "read" in dispatch.text:
            await reply.ask_approval("crm.read_records", {"ids": [1]})  # a policy allows it at once
        await reply.complete("done")

    return ConnectedAgent(
        target,
        client_id="svantic",
        client_secret="your-secret",
        agent_type="crm",
        instance_id=instance_id,
        handler=handler,
        reconnect_delay_s=0.05,
    )


@pytest.mark.timeout(60 + 30 * ROUNDS)
async def test_kills_at_random_moments_lose_no_acknowledged_write_and_break_no_invariant(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    grpc_port, http_port = _free_port(), _free_port()
    target = f"127.0.0.1:{grpc_port}"
    db = tmp_path / "mesh.db"
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "grpc_address": target,
                "http_address": f"127.0.0.1:{http_port}",
                "store": f"sqlite:///{db}",
                "shutdown_grace_s": 0,
                "dispatch": {"timeout_ms": 5_000},
                "policies": [
                    {"name": "deletes", "match": {"tool": "crm.delete_*"}, "enforcement": "require_approval"},
                    {"name": "reads", "match": {"tool": "crm.read_*"}, "enforcement": "allow"},
                ],
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "SVANTIC_SIGNING_KEY"}
    log = tmp_path / "server.log"
    acked = Acked()
    names = itertools.count()
    caught: list[str] = []
    for round_ in range(ROUNDS + 1):
        # Fresh agents (and channels) each round: a channel's reconnect backoff grows with each kill.
        agents = [_agent(target, f"crm-{n}") for n in (1, 2)]
        agent_tasks: list[asyncio.Task[None]] = []
        try:
            with _server(settings, env, log) as process:
                await _until_serving(target, process, log)
                agent_tasks = [asyncio.create_task(a.run()) for a in agents]
                if round_ == ROUNDS:  # the last start: recovery only, then stop and look
                    process.send_signal(signal.SIGTERM)
                    await asyncio.to_thread(process.wait, WAIT)
                    kill_at = 0.0
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            asyncio.gather(*(a.connected.wait() for a in agents)), WAIT / 3
                        )
                    kill_at = rng.uniform(0.2, 1.5)
                    workers = [asyncio.create_task(_workload(target, acked, rng, names)) for _ in range(4)]
                    await asyncio.sleep(kill_at)  # the random moment is the point of this test
                    process.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(process.wait, WAIT)
                    await asyncio.wait_for(asyncio.gather(*workers), WAIT)
        finally:
            for agent in agents:
                await agent.stop()
            await asyncio.gather(*agent_tasks, return_exceptions=True)
        problems = await _check(db, acked)
        seen = {c.partition(": ")[2] for c in caught}
        caught += [f"round {round_} (kill after {kill_at:.2f}s): {p}" for p in problems if p not in seen]
    assert not caught, f"seed {SEED}:\n" + "\n".join(caught)
