"""A message to a connected agent on the session's owner against one on another replica (issue 13 item 4).

Run from the repository root (needs the PostgreSQL server of ``SVANTIC_TEST_POSTGRES_DSN``,
default the local one)::

    .venv/bin/python bench/remote_dispatch.py --messages 200 --rounds 3

Two mesh servers, A and C, run in this process on one fresh PostgreSQL schema (dropped at the
end), each with the example echo agent connected to it: ``local`` on A, ``remote`` on C. One
client on A sends ``SendMessage`` (returns when the message is completed) one after another to
sessions A owns, alternating rounds of ``--messages`` to each agent type: the local agent is
reached over A's own stream, the remote one through PostgreSQL (relay rows and NOTIFY to C, C's
stream, the updates back the same way). It prints the round trip's p50/p99 and this process's
CPU per message (user + system: both replicas, both agents and the client), and the ratios
remote/local.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg
from _child import revision
from grpc import aio

from svantic_grpc.config import parse_settings
from svantic_grpc.pb import auth_service_pb2, message_service_pb2, message_types_pb2
from svantic_grpc.pb import session_service_pb2 as session_pb
from svantic_grpc.pb.auth_service_pb2_grpc import AuthServiceStub
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub
from svantic_grpc.server import MeshServer

ROOT = Path(__file__).resolve().parent.parent
DSN = os.environ.get("SVANTIC_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
DEV_CLIENT = ("svantic", "your-secret")  # the loopback-only development credential


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _run(messages: int, rounds: int) -> dict[str, tuple[list[float], float, int]]:
    sys.path.insert(0, str(ROOT / "examples"))
    from echo_agent import echo

    from svantic_grpc.connected_agent import ConnectedAgent

    def make_agent(target: str, instance_id: str, agent_type: str) -> ConnectedAgent:
        return ConnectedAgent(
            target,
            client_id=DEV_CLIENT[0],
            client_secret=DEV_CLIENT[1],
            agent_type=agent_type,
            instance_id=instance_id,
            handler=echo,
        )

    schema = f"svantic_bench_{uuid.uuid4().hex[:10]}"
    data = {
        "grpc_address": "127.0.0.1:0",
        "http_address": "127.0.0.1:0",
        "store": DSN,
        "postgres": {"schema_name": schema, "pool_size": 4},
        "session_ttl_ms": 0,
        "shutdown_grace_s": 0,
        "log_level": "WARNING",
        "dispatch": {"max_dispatches_per_session": 0},
    }
    results: dict[str, tuple[list[float], float, int]] = {"local": ([], 0.0, 0), "remote": ([], 0.0, 0)}
    try:
        async with (
            MeshServer(parse_settings(data), env={}) as a,
            MeshServer(parse_settings(data), env={}) as c,
        ):
            agents = [make_agent(a.target, "local-1", "local"), make_agent(c.target, "remote-1", "remote")]
            tasks = [asyncio.create_task(agent.run()) for agent in agents]
            try:
                for agent in agents:
                    await asyncio.wait_for(agent.connected.wait(), 30)
                async with aio.insecure_channel(a.target) as channel:
                    token = await AuthServiceStub(channel).GetToken(
                        auth_service_pb2.GetTokenRequest(
                            client_id=DEV_CLIENT[0], client_secret=DEV_CLIENT[1], agent_type="bench"
                        )
                    )
                    md = (("authorization", f"Bearer {token.token}"),)
                    sessions = SessionServiceStub(channel)
                    stub = MessageServiceStub(channel)

                    async def one(session_id: str, target: str) -> float:
                        part = message_types_pb2.Part()
                        part.data.update({"target_agent": target})
                        request = message_service_pb2.SendMessageRequest(
                            session_id=session_id,
                            message=message_service_pb2.OutgoingMessage(
                                parts=[message_types_pb2.Part(text="hello"), part]
                            ),
                        )
                        started = time.perf_counter()
                        response = await stub.SendMessage(request, metadata=md)
                        if response.message.state != message_types_pb2.MESSAGE_STATE_COMPLETED:
                            raise RuntimeError(f"{target}: {response.message.state_reason}")
                        return time.perf_counter() - started

                    for round_ in range(rounds + 1):  # round 0 warms up
                        for target in ("local", "remote") if round_ % 2 else ("remote", "local"):
                            created = await sessions.InitSession(session_pb.InitSessionRequest(), metadata=md)
                            session_id = created.session.session_id
                            cpu = time.process_time()
                            delays = [await one(session_id, target) for _ in range(messages)]
                            cpu = time.process_time() - cpu
                            if round_:
                                kept, total, count = results[target]
                                results[target] = (kept + delays, total + cpu, count + messages)
            finally:
                for agent in agents:
                    await agent.stop()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                        await asyncio.wait_for(task, 5)
    finally:
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=200, help="messages per round and agent")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (after one warm-up)")
    args = parser.parse_args()
    results = asyncio.run(_run(args.messages, args.rounds))
    print(f"revision {revision('svantic_grpc')}, {args.rounds} rounds of {args.messages} messages each")
    print(f"{'agent':<8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'CPU ms/msg':>11}")
    figures = {}
    for name, (delays, cpu, count) in results.items():
        p50, p99 = _percentile(delays, 0.5) * 1000, _percentile(delays, 0.99) * 1000
        mean, per = statistics.fmean(delays) * 1000, cpu / count * 1000
        figures[name] = (p50, p99, per)
        print(f"{name:<8} {p50:>8.2f} {p99:>8.2f} {mean:>8.2f} {per:>11.2f}")
    (lp50, lp99, lcpu), (rp50, rp99, rcpu) = figures["local"], figures["remote"]
    print(f"remote/local: p50 {rp50 / lp50:.2f}x, p99 {rp99 / lp99:.2f}x, CPU per message {rcpu / lcpu:.2f}x")


if __name__ == "__main__":
    main()
