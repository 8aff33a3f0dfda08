"""How long an event written on one PostgreSQL replica takes to reach a subscriber on another.

Run from the repository root (needs the PostgreSQL server of ``SVANTIC_TEST_POSTGRES_DSN``,
default the local one)::

    .venv/bin/python bench/replica_events.py --events 500

Two mesh servers run in this process on one fresh PostgreSQL schema (dropped at the end).
A subscriber on replica B follows a session; replica A publishes ``--events`` events to
it one after another, and for each the time from A's publish call until B's subscriber
holds it is recorded. The same is measured within A (the in-process path) for
comparison. Both servers share this process's event loop, so the figure includes the
commit, the NOTIFY, B's read of the log and the loop's scheduling, but not a second
process's wake-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

import asyncpg
from _child import revision

from svantic_grpc.config import parse_settings
from svantic_grpc.core.events import AgentLeft
from svantic_grpc.server import MeshServer

ENV = {"SVANTIC_SIGNING_KEY": "bench-signing-key-0123456789abcdef0123456789"}
DSN = os.environ.get("SVANTIC_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _delays(events: int) -> dict[str, list[float]]:
    schema = f"svantic_bench_{uuid.uuid4().hex[:10]}"
    data = {
        "grpc_address": "127.0.0.1:0",
        "http_address": "127.0.0.1:0",
        "store": DSN,
        "postgres": {"schema_name": schema, "pool_size": 4},
        "shutdown_grace_s": 0,
    }
    try:
        async with (
            MeshServer(parse_settings(data), env=ENV) as a,
            MeshServer(parse_settings(data), env=ENV) as b,
        ):
            results: dict[str, list[float]] = {}
            for name, reader in (("same replica", a), ("other replica", b)):
                session_id = f"bench-{name.replace(' ', '-')}"
                subscription = reader.mesh.bus.subscribe("acme", session_id)
                delays: list[float] = []
                try:
                    for i in range(events):
                        start = time.perf_counter()
                        event = await a.mesh.bus.publish("acme", session_id, AgentLeft("w", f"i{i}", "bench"))
                        while (
                            await asyncio.wait_for(subscription.next(), timeout=10)
                        ).sequence < event.sequence:
                            pass
                        delays.append((time.perf_counter() - start) * 1000)
                finally:
                    subscription.close()
                results[name] = delays
            return results
    finally:
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500)
    args = parser.parse_args()
    results = asyncio.run(_delays(args.events))
    print(f"commit {revision('svantic_grpc')}; {args.events} events each, publish -> subscriber holds it")
    print("| path | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    for name, delays in results.items():
        p50, p99 = statistics.median(delays), _percentile(delays, 0.99)
        print(f"| {name} | {p50:.2f} | {p99:.2f} | {max(delays):.2f} |")


if __name__ == "__main__":
    main()
