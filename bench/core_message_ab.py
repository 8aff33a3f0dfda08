"""The core's own work per message, without gRPC: two checkouts side by side, in one run.

Run from the repository root::

    .venv/bin/python bench/core_message_ab.py --base /tmp/other-checkout          # ~1 minute
    .venv/bin/python bench/core_message_ab.py --base /tmp/other-checkout --store postgresql
    .venv/bin/python bench/core_message_ab.py --base /tmp/other-checkout --store postgresql --chat

Each child process (``PYTHONPATH`` set to one checkout, started with ``subprocess``) builds a
``Mesh`` on the memory store (or a fresh PostgreSQL schema, dropped at the end) with a scripted
transport standing in for a connected agent (it answers each dispatch with a working update, an
artifact and completed, as the connected echo agent does), opens ``--sessions`` sessions and
sends ``--messages`` messages with ``target_agent`` set (with ``--chat``: none, so the session's
chat answers, as in ``bench/replicas.py``), ``--concurrency`` at a time. It prints
the process's CPU per message (user + system, ``time.process_time``) and, on PostgreSQL, the SQL
statements sent per message (asyncpg's connection calls, counted; BEGIN and COMMIT included).
The checkouts alternate for ``--rounds`` rounds; the medians and the ratio new/base are printed
with the load average. No gRPC, no network but PostgreSQL's: this isolates the mesh's core
(routing, records, events, dispatch bookkeeping) from the transport that
``bench/message_roundtrip.py`` measures with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DSN = os.environ.get("SVANTIC_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def _child(args: argparse.Namespace) -> None:
    from svantic_grpc.core.auth import Caller, Scope, TokenSettings
    from svantic_grpc.core.dispatch import DispatchJob, DispatchUpdate
    from svantic_grpc.core.mesh import Mesh, MeshOptions
    from svantic_grpc.core.messages.model import Artifact, MessageState, Part
    from svantic_grpc.core.registry import AgentSpec
    from svantic_grpc.stores.memory import MemoryStore

    statements: Counter[str] = Counter()
    if args.store == "postgresql":
        import asyncpg

        from svantic_grpc.stores.postgres import PostgresStore

        for name in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
            original = getattr(asyncpg.connection.Connection, name)

            def counted(self: Any, *a: Any, __original: Any = original, __name: str = name, **k: Any) -> Any:
                statements[__name] += 1
                return __original(self, *a, **k)

            setattr(asyncpg.connection.Connection, name, counted)
        store: Any = PostgresStore(DSN, schema=args.schema)
    else:
        store = MemoryStore()

    class Echo:
        async def _updates(self, job: DispatchJob) -> AsyncIterator[DispatchUpdate]:
            await asyncio.sleep(0)
            yield DispatchUpdate(MessageState.WORKING)
            yield DispatchUpdate(None, artifacts=(Artifact("", (Part(text=job.message.text),), "echo"),))
            yield DispatchUpdate(MessageState.COMPLETED)

        def dispatch(self, job: DispatchJob) -> AsyncIterator[DispatchUpdate]:
            return self._updates(job)

        def protocol_for(self, agent: Any) -> str:
            return "scripted"

        def begin_stop(self) -> None:
            pass

        async def close(self) -> None:
            pass

    caller = Caller("acme", "acme-full", "bench", (Scope.FULL,), "tok_1")
    await store.connect()
    mesh = Mesh(
        store=store,
        tokens=TokenSettings(signing_key="k" * 32),
        credentials=(),
        options=MeshOptions(session_ttl_s=600),
        hosted=Echo(),
    )
    await mesh.start()
    try:
        spec = AgentSpec(agent_type="echo", instance_id="echo-1", url="http://127.0.0.1:9/a2a")
        await mesh.registry.register(caller, spec)
        sessions = [(await mesh.sessions.init(caller)).session_id for _ in range(args.sessions)]
        # --chat: no target and no skill matches, so the session's chat answers (bench/replicas.py's message)
        parts: tuple[Part, ...] = (Part(text="hello"),)
        if not args.chat:
            parts += (Part(data={"target_agent": "echo"}),)
        for session_id in sessions:  # the agent joins each session before the clock starts
            await mesh.messages.send_and_wait(caller, session_id, parts=parts)
        queue = [sessions[n % len(sessions)] for n in range(args.messages)]
        statements.clear()

        async def client(mine: list[str]) -> None:
            for session_id in mine:
                done = await mesh.messages.send_and_wait(caller, session_id, parts=parts)
                assert done.state is MessageState.COMPLETED, done.state_reason

        began_cpu, began = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client(queue[n :: args.concurrency]) for n in range(args.concurrency)))
        cpu, wall = time.process_time() - began_cpu, time.perf_counter() - began
        print(
            json.dumps(
                {
                    "cpu_ms": cpu * 1000 / args.messages,
                    "per_s": args.messages / wall,
                    "statements": sum(statements.values()) / args.messages,
                }
            )
        )
    finally:
        await mesh.stop()
        await store.close()


def _run(tree: Path, args: argparse.Namespace, schema: str) -> dict[str, float]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--role", "child", "--schema", schema]
    argv += ["--store", args.store, "--messages", str(args.messages), "--sessions", str(args.sessions)]
    argv += ["--concurrency", str(args.concurrency)] + (["--chat"] if args.chat else [])
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child in {tree} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


async def _drop(schemas: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(DSN)
    try:
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, help="the other checkout (e.g. a `git archive` of main)")
    parser.add_argument("--store", choices=("memory", "postgresql"), default="memory")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chat", action="store_true", help="messages the chat answers instead of the agent")
    parser.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    parser.add_argument("--schema", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "child":
        asyncio.run(_child(args))
        return
    trees = {"new": ROOT} if args.base is None else {"base": args.base.resolve(), "new": ROOT}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    schemas: list[str] = []
    loads = [os.getloadavg()[0]]
    try:
        for round_no in range(args.rounds):
            order = list(trees.items()) if round_no % 2 == 0 else list(reversed(trees.items()))
            for name, tree in order:
                schema = f"bench_core_{uuid.uuid4().hex[:10]}"
                schemas.append(schema)
                got = _run(tree, args, schema)
                results[name].append(got)
                print(f"  round {round_no + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()))
                loads.append(os.getloadavg()[0])
    finally:
        if args.store == "postgresql":
            asyncio.run(_drop(schemas))
    print(
        f"{args.store} store, {args.messages} messages over {args.sessions} sessions, "
        f"{args.concurrency} at a time, {args.rounds} rounds; "
        f"load average (1 min) {min(loads):.1f}-{max(loads):.1f}"
    )
    medians = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()
    }
    for name, m in medians.items():
        print(
            f"{name:5} cpu {m['cpu_ms']:.3f} ms/msg, {m['per_s']:.0f} msgs/s, "
            f"{m['statements']:.2f} statements/msg"
        )
    if "base" in medians:
        ratio = medians["new"]["cpu_ms"] / medians["base"]["cpu_ms"]
        print(f"new/base cpu per message {ratio:.2f}x")


if __name__ == "__main__":
    main()
