"""One, two and three PostgreSQL replicas beside memory and SQLite, in one run (issue 13).

Run from the repository root (needs the PostgreSQL server of ``SVANTIC_TEST_POSTGRES_DSN``,
default the local one)::

    .venv/bin/python bench/replicas.py                    # ~2 minutes
    .venv/bin/python bench/replicas.py --ops 300 --clients 6 --rounds 3
    .venv/bin/python bench/replicas.py --instructions     # callgrind counts instead, ~5 minutes

Every replica is a real ``python -m svantic_grpc serve`` process (PostgreSQL ones on one fresh
schema per run, dropped at the end). ``--clients`` clients, each on a channel of its own, are
spread over the replicas of a setup (client ``i`` on replica ``i % n``); each does ``--ops``
InitSession + CloseSession ("session"), then ``--ops`` SendMessage answered by the session's
chat agent ("message"). The setups alternate in each round, so the machine's noise falls on all.

With clients spread (the default), one more setup runs one PostgreSQL replica with the clients
one replica of three serves (``--clients`` / 3, "x1 at 1/3"): three replicas against it is what
the replicas add to each other's work per message at the same load per replica (the issue's
question); it against one replica with every client is what a process gains from serving more
clients at once (the event loop, gRPC's threads and the group commit each serve several requests
per wake-up); the issue's ratio is the product of the two.

Reported per setup (medians over rounds): throughput, p99 latency, and the servers' CPU per
operation (user + system from /proc, summed over the replicas: what the work costs, wherever it
runs). Then, on two replicas, how long an event written on one replica takes to reach a
``WatchSession`` on the other (from the event's stamp to its arrival; the same replica beside).

``--instructions`` counts instead, with valgrind's callgrind, the instructions per message of one
replica (the first of a setup, its instrumentation switched on once every client's warm-up is
done): one replica with every client, one with a third of them, one of three. CPU time on a
machine with fewer cores than replicas (and other work) grows with the processes sharing them;
the instruction count says whether a replica's own work per message does.

Targets (issue 13): CPU per message at three replicas within 1.3x of one replica; the event
delay from one replica to another p99 under 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from _child import ROOT, revision
from grpc import aio

from svantic_grpc.pb import auth_service_pb2, message_service_pb2, message_types_pb2, session_service_pb2
from svantic_grpc.pb.auth_service_pb2_grpc import AuthServiceStub
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub

DSN = os.environ.get("SVANTIC_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TICK = os.sysconf("SC_CLK_TCK")
IDLE_S = 1.0
SETUPS = (("memory", 1), ("sqlite", 1), ("postgresql", 1), ("postgresql", 2), ("postgresql", 3))
THIRD = ("postgresql", 0)
"""One PostgreSQL replica with a third of the clients (those one replica of three serves)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    target: str
    channel: aio.Channel
    md: tuple[tuple[str, str], ...]

    def cpu_s(self) -> float:
        return _cpu_s(self.process.pid)


@asynccontextmanager
async def _replica(
    folder: Path, name: str, store: str, schema: str, callgrind: Path | None = None
) -> AsyncIterator[Replica]:
    """A ``serve`` process; with ``callgrind``, under valgrind's callgrind writing there, its
    instrumentation off until ``_instructions`` switches it on."""
    target = f"127.0.0.1:{_free_port()}"
    settings = folder / f"{name}.json"
    settings.write_text(
        json.dumps(
            {
                "grpc_address": target,
                "http_address": f"127.0.0.1:{_free_port()}",
                "store": store,
                "postgres": {"schema_name": schema, "pool_size": 10},
                "session_ttl_ms": 0,
                "shutdown_grace_s": 0,
                "log_level": "WARNING",
                "metrics": {"enabled": False},
                # Under callgrind a replica runs ~50x slower: with the default lease (10 s) one
                # on a loaded machine lost its sessions to the others mid-count.
                **({"replica": {"lease_ms": 120000}} if callgrind is not None else {}),
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "SVANTIC_SIGNING_KEY"}  # development credential
    log = (Path(os.environ.get("BENCH_LOGS", folder)) / f"{name}.log").open("ab")
    argv = [sys.executable, "-m", "svantic_grpc", "serve", "--settings", str(settings)]
    if callgrind is not None:
        argv = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={callgrind}",
            *argv,
        ]
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=env, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        async with aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            token = await AuthServiceStub(channel).GetToken(
                auth_service_pb2.GetTokenRequest(
                    client_id="svantic", client_secret="your-secret", agent_type="bench"
                ),
                wait_for_ready=True,
                timeout=30 if callgrind is None else 300,  # valgrind starts Python slowly
            )
            yield Replica(process, target, channel, (("authorization", f"Bearer {token.token}"),))
    finally:
        if process.returncode is None:
            process.terminate()  # this child only, by its own handle
            try:
                await asyncio.wait_for(process.wait(), 10 if callgrind is None else 60)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


@asynccontextmanager
async def _setup(
    folder: Path, store: str, count: int, callgrind: Path | None = None
) -> AsyncIterator[list[Replica]]:
    """``count`` replicas on one fresh schema; with ``callgrind``, the first under callgrind."""
    schema = f"svantic_bench_{uuid.uuid4().hex[:10]}"
    uri = {"memory": "memory", "sqlite": f"sqlite:///{folder / f'{schema}.db'}", "postgresql": DSN}[store]
    try:
        async with AsyncExitStack() as stack:
            replicas = []
            for n in range(count):
                replicas.append(
                    await stack.enter_async_context(
                        _replica(folder, f"{schema}-{n}", uri, schema, callgrind if n == 0 else None)
                    )
                )
            yield replicas
    finally:
        if store == "postgresql":
            conn = await asyncpg.connect(DSN)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()


def _name(setup: tuple[str, int]) -> str:
    return "postgresql x1 at 1/3" if setup == THIRD else f"{setup[0]} x{setup[1]}"


def _p(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _phase(replicas: list[Replica], clients: int, ops: int, kind: str) -> dict[str, float]:
    """``ops`` operations per client; throughput, p99 and CPU per operation over the replicas."""
    latencies: list[float] = []
    chat = message_service_pb2.OutgoingMessage(parts=[message_types_pb2.Part(text="hello")])

    async def client(replica: Replica) -> None:
        sessions, messages = SessionServiceStub(replica.channel), MessageServiceStub(replica.channel)
        session_id = ""
        if kind == "message":
            created = await sessions.InitSession(
                session_service_pb2.InitSessionRequest(), metadata=replica.md
            )
            session_id = created.session.session_id
        await ready.wait()
        for _ in range(ops):
            began = time.perf_counter()
            if kind == "session":
                created = await sessions.InitSession(
                    session_service_pb2.InitSessionRequest(), metadata=replica.md
                )
                await sessions.CloseSession(
                    session_service_pb2.CloseSessionRequest(session_id=created.session.session_id),
                    metadata=replica.md,
                )
            else:
                sent = await messages.SendMessage(
                    message_service_pb2.SendMessageRequest(session_id=session_id, message=chat),
                    metadata=replica.md,
                )
                assert sent.message.state == message_types_pb2.MESSAGE_STATE_COMPLETED
            latencies.append(time.perf_counter() - began)

    ready = asyncio.Event()
    tasks = [asyncio.create_task(client(replicas[i % len(replicas)])) for i in range(clients)]
    await asyncio.sleep(0.2)  # sessions of the message phase made before the clock starts
    # What the replicas spend doing nothing (renewals, listeners, timers): a cost per replica and
    # second, not per operation; measured over an idle second and reported apart.
    idle = [r.cpu_s() for r in replicas]
    await asyncio.sleep(IDLE_S)
    cpu = [r.cpu_s() for r in replicas]
    idle_rate = sum(c - i for c, i in zip(cpu, idle, strict=True)) / IDLE_S
    began = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    spent = sum(r.cpu_s() - c for r, c in zip(replicas, cpu, strict=True))
    done = clients * ops
    return {
        "ops/s": done / elapsed,
        "p99 ms": _p(latencies, 0.99) * 1000,
        "cpu ms/op": spent / done * 1000,
        "busy cpu ms/op": max(spent - idle_rate * elapsed, 0.0) / done * 1000,
        "idle cpu ms/s": idle_rate * 1000,
    }


async def _event_delays(replicas: list[Replica], count: int) -> dict[str, list[float]]:
    """Events of a session on replica 0 watched on replica 0 and on replica 1: stamp to arrival."""
    a, b = replicas[0], replicas[1]
    created = await SessionServiceStub(a.channel).InitSession(
        session_service_pb2.InitSessionRequest(), metadata=a.md
    )
    session_id = created.session.session_id
    delays: dict[str, list[float]] = {"same replica": [], "other replica": []}
    watching = [asyncio.Event(), asyncio.Event()]

    async def watch(replica: Replica, into: list[float], started: asyncio.Event) -> None:
        call = SessionServiceStub(replica.channel).WatchSession(
            session_service_pb2.WatchSessionRequest(session_id=session_id), metadata=replica.md
        )
        async for response in call:
            if started.is_set():
                into.append(time.time() - response.event.time.ToNanoseconds() / 1e9)
            started.set()

    watchers = [
        asyncio.create_task(watch(a, delays["same replica"], watching[0])),
        asyncio.create_task(watch(b, delays["other replica"], watching[1])),
    ]
    await asyncio.gather(*(w.wait() for w in watching))
    messages = MessageServiceStub(a.channel)
    chat = message_service_pb2.OutgoingMessage(parts=[message_types_pb2.Part(text="hello")])
    for _ in range(count):
        await messages.SendMessage(
            message_service_pb2.SendMessageRequest(session_id=session_id, message=chat), metadata=a.md
        )
    await asyncio.sleep(0.5)
    for task in watchers:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aio.AioRpcError):
            await task
    return delays


async def _callgrind_control(flag: str, pid: str) -> None:
    control = await asyncio.create_subprocess_exec(
        "callgrind_control", flag, pid, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    if await control.wait() != 0:
        raise SystemExit(f"callgrind_control {flag} {pid} failed")


async def _warmed_clients(
    replicas: Sequence[Replica], clients: int, ops: int
) -> Callable[[], Coroutine[Any, Any, None]]:
    """Start ``clients`` clients spread over ``replicas`` (client ``i`` on replica ``i % count``):
    each opens a session and sends 3 messages. Returns once every one has (and what the warm-up
    left running, the committer's linger, has ended), with what to await to let each send ``ops``
    more messages and wait for them."""
    count = len(replicas)
    chat = message_service_pb2.OutgoingMessage(parts=[message_types_pb2.Part(text="hello")])
    warmed = 0
    ready = asyncio.Event()

    async def client(n: int) -> None:
        nonlocal warmed
        replica = replicas[n % count]
        messages = MessageServiceStub(replica.channel)
        created = await SessionServiceStub(replica.channel).InitSession(
            session_service_pb2.InitSessionRequest(), metadata=replica.md
        )
        request = message_service_pb2.SendMessageRequest(session_id=created.session.session_id, message=chat)
        for _ in range(3):
            await messages.SendMessage(request, metadata=replica.md)
        warmed += 1
        await ready.wait()
        for _ in range(ops):
            await messages.SendMessage(request, metadata=replica.md)

    tasks = [asyncio.create_task(client(n)) for n in range(clients)]
    while warmed < clients:
        if failed := [t for t in tasks if t.done() and t.exception()]:
            await failed[0]
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)

    async def send() -> None:
        ready.set()
        await asyncio.gather(*tasks)

    return send


async def _instructions(folder: Path, count: int, clients: int, ops: int) -> float:
    """Callgrind instructions per message of the first of ``count`` PostgreSQL replicas, with
    ``clients`` clients spread over the replicas (client ``i`` on replica ``i % count``) sending
    ``ops`` messages each; counted from when every client's warm-up (a session and 3 messages) is
    done, so first-use work (imports, caches) is not in it."""
    out = folder / f"callgrind-{uuid.uuid4().hex[:10]}.out"
    async with _setup(folder, "postgresql", count, callgrind=out) as replicas:
        send = await _warmed_clients(replicas, clients, ops)
        pid = str(replicas[0].process.pid)
        await _callgrind_control("--instr=on", pid)
        await send()
        for flag in ("--instr=off", "--dump"):
            await _callgrind_control(flag, pid)
    dump = Path(f"{out}.1")  # the one made by --dump ("summary" is 0 there: instrumentation is off)
    total = re.search(r"^totals: (\d+)", await asyncio.to_thread(dump.read_text), re.MULTILINE)
    assert total is not None, f"no totals in {dump}"
    return int(total[1]) / (ops * len(range(0, clients, count)))  # the messages of the replica counted


async def _kernel_counts(folder: Path, count: int, clients: int, ops: int) -> dict[str, float]:
    """Per message, summed over the ``count`` PostgreSQL replicas of a setup (``clients`` clients
    spread over them, ``ops`` messages each, counted from when every client's warm-up is done):
    system calls and context switches of every thread (``perf stat``'s software events), and the
    user and system CPU milliseconds from /proc."""
    events = "raw_syscalls:sys_enter,context-switches"
    async with _setup(folder, "postgresql", count) as replicas:
        send = await _warmed_clients(replicas, clients, ops)
        outs = [folder / f"perf-{uuid.uuid4().hex[:10]}.csv" for _ in replicas]
        perfs = [
            await asyncio.create_subprocess_exec(
                "perf",
                "stat",
                "-x",
                ",",
                "-e",
                events,
                "-o",
                str(out),
                "-p",
                str(r.process.pid),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            for r, out in zip(replicas, outs, strict=True)
        ]
        await asyncio.sleep(0.5)  # perf attached
        times = [_cpu_split(r.process.pid) for r in replicas]
        await send()
        after = [_cpu_split(r.process.pid) for r in replicas]
        for perf in perfs:
            perf.send_signal(2)  # SIGINT: perf writes its counts (this child only, by its handle)
            await perf.wait()
    done = clients * ops
    got = {"syscalls": 0.0, "switches": 0.0}
    for out in outs:
        for line in out.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].isdigit():
                got["syscalls" if "syscalls" in fields[2] else "switches"] += int(fields[0])
    got = {k: v / done for k, v in got.items()}
    for n, name in enumerate(("user ms", "sys ms", "main ms", "main sleeps", "main preempted")):
        scale = 1000 if name.endswith("ms") else 1
        got[name] = sum(a[n] - b[n] for a, b in zip(after, times, strict=True)) / done * scale
    return got


def _cpu_split(pid: int) -> tuple[float, float, float, float, float]:
    """User and system CPU seconds of a process so far (tick-sampled, scaled to its run time),
    then its main thread's: run time in seconds (the scheduler's, to the nanosecond), voluntary
    and involuntary context switches."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ran = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    status = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line
    )
    return (
        int(fields[11]) / TICK,
        int(fields[12]) / TICK,
        ran,
        float(status["voluntary_ctxt_switches"]),
        float(status["nonvoluntary_ctxt_switches"]),
    )


async def kernel_counts(args: argparse.Namespace) -> None:
    """``--syscalls``: system calls, context switches and user/system CPU per message, summed over
    the replicas of each setup (one replica with every client, one with a third, three)."""
    if shutil.which("perf") is None:
        raise SystemExit("--syscalls needs perf on the PATH")
    setups = {
        "postgresql x1": (1, args.clients),
        "postgresql x1 at 1/3": (1, max(1, round(args.clients / 3))),
        "postgresql x3": (3, args.clients),
    }
    counts: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    with tempfile.TemporaryDirectory() as folder:
        for round_no in range(args.rounds):
            order = list(setups.items()) if round_no % 2 == 0 else list(reversed(setups.items()))
            for name, (count, clients) in order:
                got = await _kernel_counts(Path(folder), count, clients, args.ops)
                counts[name].append(got)
                print(
                    f"  round {round_no + 1} {name} ({clients} clients): "
                    + ", ".join(f"{k} {v:.2f}" for k, v in got.items()),
                    flush=True,
                )
    print(f"\n{revision('svantic_grpc', 'bench')}; Python {sys.version.split()[0]}; ", end="")
    print(f"{args.ops} messages per client after a warm-up; per message, summed over the replicas")
    for name, runs in counts.items():
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name:22} " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))


async def instructions(args: argparse.Namespace) -> None:
    """``--instructions``: the work per message of one replica, alone and as one of three."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (callgrind) on the PATH")
    per = args.clients_per_replica
    setups = {
        "postgresql x1": (1, per or args.clients),
        **({} if per else {"postgresql x1 at 1/3": (1, max(1, round(args.clients / 3)))}),
        "postgresql x3": (3, 3 * per if per else args.clients),
    }
    counts: dict[str, list[float]] = {name: [] for name in setups}
    with tempfile.TemporaryDirectory() as folder:
        for round_no in range(args.rounds):
            order = list(setups.items()) if round_no % 2 == 0 else list(reversed(setups.items()))
            for name, (count, clients) in order:
                got = await _instructions(Path(folder), count, clients, args.ops)
                counts[name].append(got)
                print(
                    f"  round {round_no + 1} {name} ({clients} clients): {got:,.0f} instructions per message"
                )
    print(f"\n{revision('svantic_grpc', 'bench')}; Python {sys.version.split()[0]}; ", end="")
    print(f"{args.ops} messages per client after a warm-up; callgrind on the first replica of each setup")
    median = {name: statistics.median(values) for name, values in counts.items()}
    for name, value in median.items():
        print(f"{name:22} {value:>12,.0f} instructions per message of one replica")
    one, three = median["postgresql x1"], median["postgresql x3"]
    print(f"instructions per message, one of 3 replicas / 1 replica: {three / one:.3f}x")
    if "postgresql x1 at 1/3" in median:
        third = median["postgresql x1 at 1/3"]
        print(f"  1 replica at 1/3 of the clients / with all of them: {third / one:.3f}x")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ops",
        type=int,
        default=0,
        help="operations per client, phase and round (150; 40 with --instructions)",
    )
    parser.add_argument("--clients", type=int, default=6, help="clients in all, spread over the replicas")
    parser.add_argument(
        "--clients-per-replica",
        type=int,
        default=0,
        help="instead: this many clients on each replica (the load grows with the replicas)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported")
    parser.add_argument(
        "--events", type=int, default=100, help="messages whose events are timed across replicas"
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instead: callgrind instruction counts per message of one replica (needs valgrind)",
    )
    parser.add_argument(
        "--postgres-only",
        action="store_true",
        help="only the setups of the issue's ratio: one and three PostgreSQL replicas (and one at 1/3)",
    )
    parser.add_argument(
        "--syscalls",
        action="store_true",
        help="instead: system calls, context switches and user/system CPU per message (needs perf)",
    )
    args = parser.parse_args()
    args.ops = args.ops or (40 if args.instructions else 150)
    if args.instructions:
        await instructions(args)
        return
    if args.syscalls:
        await kernel_counts(args)
        return
    setups = SETUPS if args.clients_per_replica else (*SETUPS, THIRD)
    if args.postgres_only:
        setups = tuple(s for s in setups if s[0] == "postgresql" and s[1] != 2)
    results: dict[tuple[str, int], dict[str, list[dict[str, float]]]] = {
        s: {"session": [], "message": []} for s in setups
    }
    delays: dict[str, list[float]] = {"same replica": [], "other replica": []}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as folder:
        for round_no in range(args.rounds):
            order = setups if round_no % 2 == 0 else tuple(reversed(setups))
            for store, count in order:
                async with _setup(Path(folder), store, count or 1) as replicas:
                    for kind in ("session", "message"):
                        clients = args.clients_per_replica * count or args.clients
                        if (store, count) == THIRD:
                            clients = max(1, round(args.clients / 3))
                        got = await _phase(replicas, clients, args.ops, kind)
                        results[(store, count)][kind].append(got)
                        print(
                            f"  round {round_no + 1} {_name((store, count))} {kind:7}: "
                            + ", ".join(f"{k} {v:.2f}" for k, v in got.items()),
                            flush=True,
                        )
                    if store == "postgresql" and count == 2:
                        for where, values in (await _event_delays(replicas, args.events)).items():
                            delays[where].extend(values)
                loads.append(os.getloadavg()[0])
    print(f"\n{revision('svantic_grpc', 'bench')}; Python {sys.version.split()[0]}; ", end="")
    clients = (
        f"{args.clients_per_replica} clients per replica"
        if args.clients_per_replica
        else f"{args.clients} clients spread over the replicas"
    )
    print(f"{clients} x {args.ops} ops x {args.rounds} rounds; load average (1 min) ", end="")
    print(f"{statistics.median(loads):.1f} median, {min(loads):.1f}-{max(loads):.1f} over the setups")
    head = ("setup", "operation", "ops/s", "p99 ms", "CPU ms/op", "busy", "idle ms/s")
    print("{:16} {:8} {:>7} {:>7} {:>10} {:>6} {:>10}".format(*head))
    for setup in setups:
        for kind in ("session", "message"):
            runs = results[setup][kind]
            m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            name = _name(setup)
            print(
                f"{name:16} {kind:8} {m['ops/s']:7.0f} {m['p99 ms']:7.1f} {m['cpu ms/op']:10.2f} "
                f"{m['busy cpu ms/op']:6.2f} {m['idle cpu ms/s']:10.1f}"
            )
    print("CPU ms/op: the replicas' user+system CPU per operation, summed over replicas; busy: less what")
    print("they spend idle (idle ms/s: CPU per second of all replicas doing nothing, measured just before)\n")
    for key in ("cpu ms/op", "busy cpu ms/op"):
        one = statistics.median(r[key] for r in results[("postgresql", 1)]["message"])
        three = statistics.median(r[key] for r in results[("postgresql", 3)]["message"])
        verdict = "met" if three <= 1.3 * one else "NOT met"
        print(f"{key} per message, 3 replicas / 1 replica: {three / one:.2f}x (target <= 1.3x: {verdict})")
    if THIRD in results:
        one, third, three = (
            statistics.median(r["cpu ms/op"] for r in results[s]["message"])
            for s in (("postgresql", 1), THIRD, ("postgresql", 3))
        )
        print(
            f"cpu ms/op per message, 3 replicas / 1 at the same load per replica: {three / third:.2f}x; "
            f"1 replica at 1/3 of the clients / with all of them: {third / one:.2f}x"
        )
    one = statistics.median(r["cpu ms/op"] for r in results[("postgresql", 1)]["session"])
    three = statistics.median(r["cpu ms/op"] for r in results[("postgresql", 3)]["session"])
    print(f"cpu ms/op per session create+close, 3 replicas / 1 replica: {three / one:.2f}x (no target)")
    for where, values in delays.items():
        if values:
            p50, p99 = _p(values, 0.5) * 1000, _p(values, 0.99) * 1000
            print(f"event delay to a watcher on the {where}: ", end="")
            print(f"p50 {p50:.2f} ms, p99 {p99:.2f} ms ({len(values)} events)")
    other = delays["other replica"]
    if other:
        p99 = _p(other, 0.99) * 1000
        verdict = "met" if p99 < 10 else "NOT met"
        print(f"event delay between replicas p99 {p99:.2f} ms (target < 10 ms: {verdict})")


if __name__ == "__main__":
    asyncio.run(main())
