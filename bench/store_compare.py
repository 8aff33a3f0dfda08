"""SQLite store beside the in-memory store, in one run: session create/close and a message round trip.

Run from the repository root::

    .venv/bin/python bench/store_compare.py              # ~1.5 minutes
    .venv/bin/python bench/store_compare.py --cycles 500 --concurrency 8

For each store a real server runs in this process on 127.0.0.1:0 (the SQLite one
on a fresh file in a temporary folder), and ``--concurrency`` client tasks on one
channel each do ``--cycles`` / concurrency rounds of: InitSession + CloseSession
("session"), then SendMessage answered by the session's chat agent ("message",
which writes the message record four times and five events). The stores alternate
per round so machine noise falls on both; the figures are operations per second
and the ratio SQLite/memory time per operation (target: at most 2x for sessions).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from grpc import aio

from svantic_grpc.config import parse_settings
from svantic_grpc.pb import auth_service_pb2, message_service_pb2, message_types_pb2, session_service_pb2
from svantic_grpc.pb.auth_service_pb2_grpc import AuthServiceStub
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub
from svantic_grpc.server import MeshServer

ENV = {"SVANTIC_SIGNING_KEY": "bench-signing-key-0123456789abcdef0123456789"}


async def _measure(store: str, cycles: int, concurrency: int) -> dict[str, float]:
    settings = parse_settings(
        {
            "grpc_address": "127.0.0.1:0",
            "http_address": "127.0.0.1:0",
            "store": store,
            "session_ttl_ms": 0,
            "shutdown_grace_s": 0,
            "log_level": "WARNING",
            "tenants": [
                {
                    "tenant_id": "bench",
                    "credentials": [
                        {
                            "client_id": "bench",
                            # hash of "bench-secret" at a low cost, fine for a benchmark
                            "secret_hash": _HASH,
                            "scopes": ["full"],
                        }
                    ],
                }
            ],
        }
    )
    async with MeshServer(settings, env=ENV) as server, aio.insecure_channel(server.target) as channel:
        token = await AuthServiceStub(channel).GetToken(
            auth_service_pb2.GetTokenRequest(
                client_id="bench", client_secret="bench-secret", agent_type="bench"
            )
        )
        md = (("authorization", f"Bearer {token.token}"),)
        sessions, messages = SessionServiceStub(channel), MessageServiceStub(channel)
        per_task = max(cycles // concurrency, 1)

        async def session_rounds() -> None:
            for _ in range(per_task):
                created = await sessions.InitSession(session_service_pb2.InitSessionRequest(), metadata=md)
                await sessions.CloseSession(
                    session_service_pb2.CloseSessionRequest(session_id=created.session.session_id),
                    metadata=md,
                )

        started = time.perf_counter()
        await asyncio.gather(*(session_rounds() for _ in range(concurrency)))
        session_s = time.perf_counter() - started

        chats = [
            (
                await sessions.InitSession(session_service_pb2.InitSessionRequest(), metadata=md)
            ).session.session_id
            for _ in range(concurrency)
        ]
        request = message_service_pb2.OutgoingMessage(parts=[message_types_pb2.Part(text="hello")])

        async def message_rounds(session_id: str) -> None:
            for _ in range(per_task):
                sent = await messages.SendMessage(
                    message_service_pb2.SendMessageRequest(session_id=session_id, message=request),
                    metadata=md,
                )
                assert sent.message.state == message_types_pb2.MESSAGE_STATE_COMPLETED

        started = time.perf_counter()
        await asyncio.gather(*(message_rounds(s) for s in chats))
        message_s = time.perf_counter() - started
        done = per_task * concurrency
        return {"session": done / session_s, "message": done / message_s}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1200, help="operations per store and round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"memory": [], "sqlite": []}
    with tempfile.TemporaryDirectory() as folder:
        for round_no in range(args.rounds):
            order = ["memory", "sqlite"] if round_no % 2 == 0 else ["sqlite", "memory"]
            for name in order:
                store = "memory" if name == "memory" else f"sqlite:///{Path(folder) / f'mesh-{round_no}.db'}"
                results[name].append(await _measure(store, args.cycles, args.concurrency))
                print(
                    f"  round {round_no + 1} {name:6}: "
                    + ", ".join(f"{k} {v:7.0f}/s" for k, v in results[name][-1].items())
                )
    python = sys.version.split()[0]
    print(f"\nPython {python}; {args.cycles} ops x {args.rounds} rounds, concurrency {args.concurrency}")
    print(f"{'operation':28} {'memory ops/s':>13} {'sqlite ops/s':>13} {'sqlite/memory time':>19}")
    for op, label in (("session", "session create + close"), ("message", "message round trip (chat)")):
        memory = statistics.median(r[op] for r in results["memory"])
        sqlite = statistics.median(r[op] for r in results["sqlite"])
        print(f"{label:28} {memory:13.0f} {sqlite:13.0f} {memory / sqlite:18.2f}x")


_HASH = ""

if __name__ == "__main__":
    from svantic_grpc.core.auth import hash_secret

    _HASH = hash_secret("bench-secret", cost=2**10)
    asyncio.run(main())
