"""Streams at scale (issue 12, items 4 and 5): server memory per stream, and fan-out to 1,000 watchers.

Run from the repository root::

    .venv/bin/python bench/scale_streams.py                     # both parts, ~2 minutes
    .venv/bin/python bench/scale_streams.py --part memory --streams 1000 --rounds 2
    .venv/bin/python bench/scale_streams.py --part fanout --subscribers 1000 --events 100
    .venv/bin/python bench/scale_streams.py --part fanout --client lean   # a client with less CPU per message
    .venv/bin/python bench/scale_streams.py --part fanout-instructions --count-in server,client

Every server and client runs in its own process (``subprocess``), all on 127.0.0.1.

**memory**: each kind of stream gets a fresh server process: the mesh (``MeshServer``,
memory store) for ``Connect`` and ``WatchSession``, a bare ``grpc.aio`` server with two
generic methods, a bidirectional stream and a server stream (each sends one frame when
opened and then idles), for the other two. A client process per kind first does its
setup (the mesh: registers its connected instances / creates the session), opens and
closes ``--warm`` streams, then the parent reads the server's RSS (``VmRSS`` after
``gc.collect()`` and ``malloc_trim(0)`` in the server), the client opens ``--streams``
streams and waits until each got its first frame (the ``Connect`` welcome, the ``WatchSession``
replay of the session's first events, the bare servers' frame), and the parent reads
the RSS again. Cost per stream = RSS growth / streams. The mesh's own cost is the
mesh's figure minus the bare stream of the same shape (``Connect`` - bidi,
``WatchSession`` - server stream), against the targets 8 KB and 4 KB. The rounds
alternate the order of the four kinds; the verdict uses the medians.

**fanout**: a fresh mesh server; ``--subscribers`` ``WatchSession`` streams on one
session, spread over ``--watcher-processes`` client processes. The parent, as the writer,
calls ``InviteAgent`` once every ``--interval-ms``, in ``--blocks`` alternating blocks: on
the watched session, and on a twin session nobody watches (its record grows the same
way), ``--events`` calls each. Each invite appends one ``agent_joined`` event. Each
watcher process notes, for every event, when it read it (``time.time()``) minus the
event's own ``time`` (stamped by the server when it wrote the event; same machine, same
clock), the largest over its streams, and checks that every stream got every sequence
number once and in order. The delay to the last subscriber of an event is the largest
over all processes; its p50/p99 over the events is set against the target (p99 <= 50 ms).
The writer's ``InviteAgent`` latency (p50) on the watched session over its latency on
the unwatched one, measured in alternating blocks of the same run, is set against 1.5x.
The server's CPU time (``/proc``, user+system) during the watched blocks is printed per
subscriber and event. The same run first does all of this against the bare server
(a log of stamped frames that each of its server streams reads, with the same pacing
and the same watcher processes): what ``grpc.aio`` itself costs on this machine.

The delay is measured where the client reads the event, so it includes the client
processes' own event loops (1,000 streams over four Python processes on the same
2 cores as the server). Each watcher process also reports its own CPU (user+system) over
the run, printed per message read. ``--client asyncio`` (the default, the first client)
reads each stream with ``async for`` through a generator of its own on asyncio's loop;
``--client lean`` is a real client with less Python per message: uvloop, and ``read()``
in the stream's own loop. Both servers run on ``--loop`` (the mesh's ``event_loop``
setting; default uvloop, as ``serve``).

**fanout-instructions** (``--part fanout-instructions``): the same setup with the server
(``--count-in server``) or the first watcher process (``client``) under callgrind; after a
warm-up, ``--count-events`` watched writes one at a time, each once every watcher process
got it, then as many writes on the unwatched session. Printed per subscriber and event:
the instructions of the counted process (by binary), and for the server, what the writes
alone cost and the fan-out (the difference): a count that does not move with the machine's
load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from _child import Child, callgrind_counts, revision, say, start_role, watchdog
from grpc import aio

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
HOST = "127.0.0.1"
BIDI = "/bench.Streams/Bidi"
SERVER_STREAM = "/bench.Streams/Server"
BARE_WATCH = "/bench.Streams/Watch"
BARE_PUBLISH = "/bench.Streams/Publish"
DEV_CLIENT = ("svantic", "your-secret")  # the loopback-only development credential
KINDS = ("connect", "bidi", "watch", "server")
BARE_OF = {"connect": "bidi", "watch": "server"}
TARGET_KB = {"connect": 8.0, "watch": 4.0}

# --------------------------------------------------------------------------- children


def _rss() -> int:
    """This process's resident memory, after a collection and after giving freed heap back (glibc)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(
            0
        )  # e.g. scrypt's 16 MB from signing in, freed in a thread arena
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _serve_commands() -> None:
    """Answer ``RSS`` lines from the parent until it closes our stdin."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"RSS":
            say(f"RSS {_rss()}")


async def run_bare_server(args: argparse.Namespace) -> None:
    async def bidi(requests: Any, context: aio.ServicerContext) -> Any:
        yield b"hi"
        async for _ in requests:
            pass

    async def server_stream(request: bytes, context: aio.ServicerContext) -> Any:
        yield b"hi"
        await asyncio.Event().wait()  # until the client cancels

    # The fan-out floor: a log of stamped frames, every watcher reads all of it, then follows.
    log: list[bytes] = []
    changed = asyncio.Event()

    async def watch(request: bytes, context: aio.ServicerContext) -> Any:
        position = 0
        while True:
            while position < len(log):
                position += 1
                yield log[position - 1]
            await changed.wait()

    quiet: list[bytes] = []  # the log nobody watches, for the writer's calls without watchers

    async def publish(request: bytes, context: aio.ServicerContext) -> bytes:
        if request.startswith(b"q"):
            quiet.append(f"{len(quiet) + 1} {time.time():.6f} ".encode() + request)
            return b""
        log.append(f"{len(log) + 1} {time.time():.6f} ".encode() + request)
        asyncio.get_running_loop().call_soon(_wake)  # as the mesh does: after the writer's step
        return b""

    def _wake() -> None:
        changed.set()
        changed.clear()

    handler = grpc.method_handlers_generic_handler(
        "bench.Streams",
        {
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            "Server": grpc.unary_stream_rpc_method_handler(server_stream),
            "Watch": grpc.unary_stream_rpc_method_handler(watch),
            "Publish": grpc.unary_unary_rpc_method_handler(publish),
        },
    )
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    say(f"PORT {port}")
    await _serve_commands()
    await server.stop(0)


async def run_mesh_server(args: argparse.Namespace) -> None:
    from svantic_grpc.config import parse_settings
    from svantic_grpc.server import MeshServer

    settings = parse_settings(
        {
            "grpc_address": f"{HOST}:0",
            "http_address": f"{HOST}:0",
            "session_ttl_ms": 0,
            "shutdown_grace_s": 0,
            "store": "memory",
            "log_level": "WARNING",
            "event_loop": args.loop,
        }
    )
    server = MeshServer(settings, env={})  # development signing key: loopback only
    await server.start()
    say(f"PORT {server.port}")
    try:
        await _serve_commands()
    finally:
        await server.stop(0)


class _Mesh:
    """A client of the mesh with a token."""

    def __init__(self, channel: aio.Channel) -> None:
        from svantic_grpc.pb import registry_service_pb2_grpc, session_service_pb2_grpc

        self.channel = channel
        self.registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        self.sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        self.md: tuple[tuple[str, str], ...] = ()

    async def sign_in(self) -> None:
        from svantic_grpc.pb import auth_service_pb2, auth_service_pb2_grpc

        token = await auth_service_pb2_grpc.AuthServiceStub(self.channel).GetToken(
            auth_service_pb2.GetTokenRequest(
                client_id=DEV_CLIENT[0], client_secret=DEV_CLIENT[1], agent_type="bench"
            )
        )
        self.md = (("authorization", f"Bearer {token.token}"),)

    async def register(self, instance_ids: Sequence[str], *, connected: bool) -> None:
        from svantic_grpc.pb import agent_types_pb2
        from svantic_grpc.pb import registry_service_pb2 as pb

        mode = (
            agent_types_pb2.DEPLOYMENT_MODE_CONNECTED if connected else agent_types_pb2.DEPLOYMENT_MODE_HOSTED
        )
        url = "" if connected else f"http://{HOST}:9/"  # never called: nothing is sent to it
        for instance_id in instance_ids:
            await self.registry.RegisterAgent(
                pb.RegisterAgentRequest(
                    agent_type="bench-agent", instance_id=instance_id, url=url, deployment_mode=mode
                ),
                metadata=self.md,
            )

    async def new_session(self) -> str:
        from svantic_grpc.pb import session_service_pb2 as pb

        created = await self.sessions.InitSession(pb.InitSessionRequest(), metadata=self.md)
        return created.session.session_id

    async def invite(self, session_id: str, instance_id: str) -> None:
        from svantic_grpc.pb import session_service_pb2 as pb

        await self.sessions.InviteAgent(
            pb.InviteAgentRequest(session_id=session_id, agent_type="bench-agent", instance_id=instance_id),
            metadata=self.md,
        )


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _idle() -> Any:
    """A request stream that sends nothing until cancelled."""
    await asyncio.Event().wait()
    yield b""


async def run_streams_client(args: argparse.Namespace) -> None:
    """Open ``--count`` streams of ``--kind`` on the parent's signal; hold them until stdin closes."""
    from svantic_grpc.pb import registry_service_pb2 as reg_pb
    from svantic_grpc.pb import session_service_pb2 as ses_pb

    stdin = await _stdin_lines()
    async with aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        mesh = _Mesh(channel)
        kind = args.kind
        session_id = ""
        prefix = f"c{os.getpid()}"
        if kind in ("connect", "watch"):
            await mesh.sign_in()
        if kind == "connect":
            await mesh.register([f"{prefix}-{i}" for i in range(args.count + args.warm)], connected=True)
        elif kind == "watch":
            session_id = await mesh.new_session()
        calls: list[Any] = []
        outboxes: list[asyncio.Queue[Any]] = []

        async def open_one(index: int) -> None:
            if kind == "connect":
                outbox: asyncio.Queue[Any] = asyncio.Queue()
                outbox.put_nowait(
                    reg_pb.ConnectRequest(hello=reg_pb.ConnectHello(instance_id=f"{prefix}-{index}"))
                )
                outboxes.append(outbox)

                async def requests() -> Any:
                    while (item := await outbox.get()) is not None:
                        yield item

                call = mesh.registry.Connect(requests(), metadata=mesh.md)
            elif kind == "watch":
                call = mesh.sessions.WatchSession(
                    ses_pb.WatchSessionRequest(session_id=session_id), metadata=mesh.md
                )
            elif kind == "bidi":
                call = channel.stream_stream(BIDI)(_idle())
            else:
                call = channel.unary_stream(SERVER_STREAM)(b"")
            calls.append(call)
            await call.read()

        async def open_many(first: int, count: int) -> None:
            await asyncio.gather(*(open_one(i) for i in range(first, first + count)))

        async def close_all() -> None:
            for outbox in outboxes:
                outbox.put_nowait(None)
            for call in calls:
                call.cancel()
            calls.clear()
            outboxes.clear()
            await asyncio.sleep(0.5)

        if args.warm:
            await open_many(args.count, args.warm)
            await close_all()
        say("SETUP")
        await stdin.readline()  # GO
        await open_many(0, args.count)
        say("OPEN")
        await stdin.read()  # until the parent closes it
        await close_all()


async def run_watchers(args: argparse.Namespace) -> None:
    """``--count`` watch streams (``--kind`` mesh or bare); per event, the largest delay, and the order."""
    from svantic_grpc.pb import session_service_pb2 as ses_pb

    stdin = await _stdin_lines()
    async with aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        mesh = _Mesh(channel)
        mesh.md = (("authorization", f"Bearer {args.token}"),)
        delays: dict[int, float] = {}
        firsts: dict[int, float] = {}
        """Per event, the smallest delay: to the first of this process's streams."""
        counts: dict[int, int] = {}
        by_instance: dict[str, int] = {}
        disorder = 0
        ready = 0
        all_ready = asyncio.Event()

        def frames() -> Any:
            """(sequence, stamp, what) of each frame, as they are read."""
            if args.kind == "bare":

                async def bare() -> Any:
                    async for frame in channel.unary_stream(BARE_WATCH)(b""):
                        seq, stamp, what = frame.decode().split(" ", 2)
                        yield int(seq), float(stamp), what

                return bare()

            async def mesh_frames() -> Any:
                call = mesh.sessions.WatchSession(
                    ses_pb.WatchSessionRequest(session_id=args.session), metadata=mesh.md
                )
                async for response in call:
                    event = response.event
                    stamp = event.time.seconds + event.time.nanos / 1e9
                    yield event.sequence, stamp, event.agent_joined.agent.instance_id

            return mesh_frames()

        async def watch() -> None:
            nonlocal disorder, ready
            last = 0
            seen_probe = False
            async for sequence, stamp, instance in frames():
                now = time.time()
                if sequence != last + 1:
                    disorder += 1
                last = sequence
                if instance.startswith("probe") and not seen_probe:
                    seen_probe = True
                    ready += 1
                    if ready == args.count:
                        all_ready.set()
                elif instance.startswith("w-"):
                    delay = now - stamp
                    delays[last] = max(delays.get(last, 0.0), delay)
                    firsts[last] = min(firsts.get(last, delay), delay)
                    counts[last] = counts.get(last, 0) + 1
                    if args.report_each:
                        got = by_instance[instance] = by_instance.get(instance, 0) + 1
                        if got == args.count:
                            say(f"ALL {instance}")

        def parse_bare(frame: bytes) -> tuple[int, float, str]:
            seq, stamp, what = frame.decode().split(" ", 2)
            return int(seq), float(stamp), what

        def parse_mesh(response: Any) -> tuple[int, float, str]:
            event = response.event
            stamp = event.time.seconds + event.time.nanos / 1e9
            return event.sequence, stamp, event.agent_joined.agent.instance_id

        async def watch_lean() -> None:
            """As ``watch``, with less Python per message: ``read()`` in the loop itself, no generators."""
            nonlocal disorder, ready
            if args.kind == "bare":
                call, parse = channel.unary_stream(BARE_WATCH)(b""), parse_bare
            else:
                request = ses_pb.WatchSessionRequest(session_id=args.session)
                call, parse = mesh.sessions.WatchSession(request, metadata=mesh.md), parse_mesh
            read, eof = call.read, aio.EOF
            last = 0
            seen_probe = False
            while (message := await read()) is not eof:
                now = time.time()
                sequence, stamp, instance = parse(message)
                if sequence != last + 1:
                    disorder += 1
                last = sequence
                if instance.startswith("w-"):
                    delay = now - stamp
                    if delay > delays.get(last, 0.0):
                        delays[last] = delay
                    if delay < firsts.get(last, 1e9):
                        firsts[last] = delay
                    counts[last] = counts.get(last, 0) + 1
                    if args.report_each:
                        got = by_instance[instance] = by_instance.get(instance, 0) + 1
                        if got == args.count:
                            say(f"ALL {instance}")
                elif instance.startswith("probe") and not seen_probe:
                    seen_probe = True
                    ready += 1
                    if ready == args.count:
                        all_ready.set()

        tasks = [
            asyncio.create_task(watch_lean() if args.client == "lean" else watch()) for _ in range(args.count)
        ]
        await asyncio.wait_for(all_ready.wait(), 600)
        cpu = os.times()
        say("OPEN")
        await stdin.read()
        used = os.times()
        cpu_s = used.user + used.system - cpu.user - cpu.system
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        result = {"delays": delays, "firsts": firsts, "counts": counts, "disorder": disorder, "cpu": cpu_s}
        say("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------- parent


NODE_MODULES = ROOT / "tests" / "node" / "node_modules"


async def _spawn_watchers(
    name: str, args: argparse.Namespace, extra: Sequence[str], count: int, report_each: bool = False
) -> Child:
    """A watcher process of ``--client``: this script's ``watchers`` role, or the Node one."""
    if args.client != "node":
        more = ("--report-each",) if report_each else ()
        return await spawn(
            name, "watchers", args.max_seconds, *extra, "--count", str(count), "--client", args.client, *more
        )
    if not (NODE_MODULES / "@grpc" / "grpc-js").is_dir():
        raise SystemExit(
            f"--client node needs the packages of tests/node: (cd {NODE_MODULES.parent} && npm ci)"
        )
    given = dict(zip(extra[::2], extra[1::2], strict=True))
    process = await asyncio.create_subprocess_exec(
        "node",
        str(SCRIPT.parent / "node_watchers.js"),
        str(ROOT / "proto"),
        given["--kind"],
        given["--target"],
        given["--session"] or "-",
        given["--token"] or "-",
        str(count),
        *(("--report-each",) if report_each else ()),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )
    return Child(name, process)


async def spawn(name: str, role: str, max_seconds: float, *extra: str) -> Child:
    process = await start_role(SCRIPT, role, max_seconds, *extra)
    return Child(name, process)


async def _rss_of(server: Child) -> int:
    assert server.process.stdin is not None
    server.process.stdin.write(b"RSS\n")
    await server.process.stdin.drain()
    return int(await server.expect("RSS", 30))


async def _stream_cost(args: argparse.Namespace, kind: str, server: Child, port: str) -> float:
    """Bytes of server RSS per stream of ``kind``."""
    client = await spawn(
        f"client-{kind}",
        "streams-client",
        args.max_seconds,
        "--kind",
        kind,
        "--target",
        f"{HOST}:{port}",
        "--count",
        str(args.streams),
        "--warm",
        str(args.warm),
    )
    try:
        await client.expect("SETUP", 120)
        before = await _rss_of(server)
        assert client.process.stdin is not None
        client.process.stdin.write(b"GO\n")
        await client.process.stdin.drain()
        await client.expect("OPEN", 120)
        await asyncio.sleep(0.5)  # let the server settle what it does after the first frame
        after = await _rss_of(server)
    finally:
        await client.stop()
    return (after - before) / args.streams


async def memory(args: argparse.Namespace) -> dict[str, float]:
    per_round: dict[str, list[float]] = {k: [] for k in KINDS}
    for round_no in range(args.rounds):
        kinds = KINDS if round_no % 2 == 0 else tuple(reversed(KINDS))
        for kind in kinds:
            # A fresh server per kind: memory freed by one kind's streams must not serve the next.
            role = "mesh-server" if kind in BARE_OF else "bare-server"
            server = await spawn(role, role, args.max_seconds, "--loop", args.loop)
            try:
                port = await server.expect("PORT", 60)
                per_round[kind].append(await _stream_cost(args, kind, server, port))
            finally:
                await server.stop()
        print(
            f"round {round_no + 1}: " + ", ".join(f"{k} {per_round[k][-1] / 1024:.1f} KB" for k in KINDS),
            flush=True,
        )
    return {k: statistics.median(v) for k, v in per_round.items()}


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def _cpu_seconds(child: Child) -> float:
    fields = Path(f"/proc/{child.process.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _writes(
    write: Callable[[str], Awaitable[None]], prefix: str, count: int, first: int, args: argparse.Namespace
) -> list[float]:
    """``count`` writes, one every ``--interval-ms``; their latencies in seconds."""
    latencies = []
    loop = asyncio.get_running_loop()
    tick = loop.time()
    for i in range(first, first + count):
        tick += args.interval_ms / 1000
        await asyncio.sleep(max(0.0, tick - loop.time()))
        began = time.perf_counter()
        await write(f"{prefix}-{i}")
        latencies.append(time.perf_counter() - began)
    return latencies


async def _alternating(
    write: Callable[[str], Awaitable[None]], server: Child, args: argparse.Namespace
) -> tuple[list[float], list[float], float]:
    """Blocks of writes nobody watches ("q") and watched ones ("w"), alternating, in ``--blocks`` rounds.

    Returns both latency lists and the server's CPU seconds per watched write (its blocks only,
    each until its events are out).
    """
    alone: list[float] = []
    watched: list[float] = []
    cpu = 0.0
    per_block = args.events // args.blocks
    for block in range(args.blocks):
        for prefix in ("q", "w") if block % 2 == 0 else ("w", "q"):
            before = _cpu_seconds(server)
            latencies = await _writes(write, prefix, per_block, block * per_block, args)
            await asyncio.sleep(max(0.5, args.interval_ms / 1000 * 3))  # the last fan-out ends
            if prefix == "w":
                watched += latencies
                cpu += _cpu_seconds(server) - before
            else:
                alone += latencies
    return alone, watched, cpu / (per_block * args.blocks)


async def _writer(
    channel: aio.Channel, kind: str, target: str, events: int
) -> tuple[Callable[[str], Awaitable[None]], list[str]]:
    """The writer of a fan-out run on ``kind``'s server (its probe written), and the watchers' arguments.

    ``write("w-N")`` appends an event the watchers see, ``write("q-N")`` one nobody watches.
    """
    session, token = "", ""
    if kind == "mesh":
        mesh = _Mesh(channel)
        await mesh.sign_in()
        token = mesh.md[0][1].removeprefix("Bearer ")
        session, alone_session = await mesh.new_session(), await mesh.new_session()
        names = ("probe", *(f"{p}-{i}" for p in ("w", "q") for i in range(events)))
        await mesh.register(names, connected=False)

        async def write(name: str) -> None:
            # The same calls on a twin session nobody watches first (its record grows the same way).
            await mesh.invite(alone_session if name.startswith("q") else session, name)
    else:
        bare_publish = channel.unary_unary(BARE_PUBLISH)

        async def write(name: str) -> None:
            await bare_publish(name.encode())

    await write("probe")
    return write, ["--kind", kind, "--target", target, "--session", session, "--token", token]


def _spread(args: argparse.Namespace) -> list[int]:
    """Streams per watcher process."""
    per = [args.subscribers // args.watcher_processes] * args.watcher_processes
    per[0] += args.subscribers - sum(per)
    return per


async def fanout(args: argparse.Namespace, kind: str) -> dict[str, float]:
    """One fan-out run on a fresh server: ``kind`` "mesh" (WatchSession, InviteAgent) or "bare"."""
    server = await spawn(f"{kind}-server", f"{kind}-server", args.max_seconds, "--loop", args.loop)
    watchers: list[Child] = []
    try:
        port = await server.expect("PORT", 60)
        target = f"{HOST}:{port}"
        async with aio.insecure_channel(target) as channel:
            write, extra = await _writer(channel, kind, target, args.events)
            for index, count in enumerate(_spread(args)):
                watchers.append(await _spawn_watchers(f"watchers-{index}", args, extra, count))
            for child in watchers:
                await child.expect("OPEN", 180)
            alone, watched_calls, cpu_per_event = await _alternating(write, server, args)
            await asyncio.sleep(2)  # the last events reach everyone
        results = []
        for child in watchers:
            assert child.process.stdin is not None
            child.process.stdin.close()
            results.append(json.loads(await child.expect("RESULT", 60)))
    finally:
        for child in watchers:
            await child.stop()
        await server.stop()
    last: dict[str, float] = {}
    first: dict[str, float] = {}
    received: dict[str, int] = {}
    for result in results:
        for seq, delay in result["delays"].items():
            last[seq] = max(last.get(seq, 0.0), delay)
        for seq, delay in result["firsts"].items():
            first[seq] = min(first.get(seq, delay), delay)
        for seq, count in result["counts"].items():
            received[seq] = received.get(seq, 0) + count
    delays = [d * 1000 for d in last.values()]
    return {
        "complete": sum(1 for c in received.values() if c == args.subscribers),
        "disorder": sum(r["disorder"] for r in results),
        "p50": _pct(delays, 0.5),
        "first_p50": _pct([d * 1000 for d in first.values()], 0.5),
        "spread_p50": _pct([(last[seq] - first[seq]) * 1000 for seq in last], 0.5),
        "p99": _pct(delays, 0.99),
        "max": max(delays, default=float("nan")),
        "write_p50": _pct(watched_calls, 0.5) * 1000,
        "write_p99": _pct(watched_calls, 0.99) * 1000,
        "alone_p50": _pct(alone, 0.5) * 1000,
        "alone_p99": _pct(alone, 0.99) * 1000,
        "cpu_us": cpu_per_event * 1e6 / args.subscribers,
        "client_cpu_us": sum(r["cpu"] for r in results) * 1e6 / (args.subscribers * args.events),
    }


# --------------------------------------------------------------------------- instructions


def _callgrind(pid: int, flag: str) -> None:
    subprocess.run(
        ["callgrind_control", flag, str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )


def _counted(dump_prefix: Path, number: int) -> tuple[int, Counter[str]]:
    """The instructions of the ``number``th dump ``--dump`` made, in all and by binary."""
    [dump] = [p for p in dump_prefix.parent.glob(dump_prefix.name + ".*") if p.name.endswith(f".{number}")]
    return callgrind_counts(dump)


async def _spawn_counted(name: str, role: str, out: Path, args: argparse.Namespace, *extra: str) -> Child:
    """A child under callgrind, counting nothing until told (``--instr=on``)."""
    process = await asyncio.create_subprocess_exec(
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}.%p",
        sys.executable,
        str(SCRIPT),
        "--role",
        role,
        "--max-seconds",
        str(args.max_seconds),
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
    )
    return Child(name, process)


async def fanout_instructions(
    args: argparse.Namespace, kind: str, who: str, tmp: Path
) -> tuple[float, float, Counter[str]]:
    """Instructions per subscriber and event of ``kind``'s server (``who`` "server") or of the
    first watcher process (``who`` "client"), under callgrind, over ``--count-events`` events
    written one at a time, each once every watcher got it."""
    out = tmp / f"{kind}-{who}"
    if who == "server":
        server = await _spawn_counted(f"{kind}-server", f"{kind}-server", out, args, "--loop", args.loop)
    else:
        server = await spawn(f"{kind}-server", f"{kind}-server", args.max_seconds, "--loop", args.loop)
    watchers: list[Child] = []
    counted = watchers_per = 0
    try:
        port = await server.expect("PORT", 300)
        target = f"{HOST}:{port}"
        async with aio.insecure_channel(target) as channel:
            warm = 5
            write, extra = await _writer(channel, kind, target, warm + args.count_events)
            spread = _spread(args)
            for index, count in enumerate(spread):
                more = (*extra, "--count", str(count), "--report-each", "--client", args.client)
                if who == "client" and index == 0:
                    watchers.append(await _spawn_counted(f"watchers-{index}", "watchers", out, args, *more))
                else:
                    watchers.append(await _spawn_watchers(f"watchers-{index}", args, extra, count, True))
            for child in watchers:
                await child.expect("OPEN", 900)

            async def one(name: str) -> None:
                await write(name)
                for child in watchers:
                    while await child.expect("ALL", 600) != name:
                        pass

            for i in range(warm):
                await one(f"w-{i}")
            counted_pid = server.process.pid if who == "server" else watchers[0].process.pid
            await asyncio.to_thread(_callgrind, counted_pid, "--instr=on")
            for i in range(warm, warm + args.count_events):
                await one(f"w-{i}")
            await asyncio.to_thread(_callgrind, counted_pid, "--dump")
            # The same writes on the session nobody watches: what the writes cost without the fan-out.
            for i in range(warm, warm + args.count_events):
                await write(f"q-{i}")
            await asyncio.sleep(0.5)
            await asyncio.to_thread(_callgrind, counted_pid, "--dump")
            counted = args.count_events
            watchers_per = args.subscribers if who == "server" else spread[0]
    finally:
        for child in watchers:
            await child.stop()
        await server.stop()
    total, by_binary = await asyncio.to_thread(_counted, out, 1)
    alone, _ = await asyncio.to_thread(_counted, out, 2)
    per = counted * watchers_per
    return total / per, alone / per, Counter({k: v // per for k, v in by_binary.items()})


async def instructions(args: argparse.Namespace) -> None:
    if args.client == "node" and "client" in args.count_in.split(","):
        raise SystemExit("callgrind counts the Python watchers only: --count-in server with --client node")
    print(
        f"\n== fan-out instructions: {args.subscribers} subscribers in {args.watcher_processes} client"
        f" processes ({args.client} client), {args.count_events} events one at a time, servers on"
        f" {args.loop}, under callgrind =="
    )
    with tempfile.TemporaryDirectory(prefix="svantic-fanout-") as scratch:
        tmp = args.keep_dumps or scratch
        os.makedirs(tmp, exist_ok=True)
        for who in args.count_in.split(","):
            for kind in args.kinds.split(","):
                per, alone, by_binary = await fanout_instructions(args, kind, who, Path(tmp))
                top = ", ".join(f"{name} {value:,}" for name, value in by_binary.most_common(4))
                if who == "server":
                    top += f"; the writes alone {alone:,.0f}, the fan-out {per - alone:,.0f}"
                what = (
                    "server, per subscriber and event"
                    if who == "server"
                    else "watcher process, per message read"
                )
                print(f"{kind:<5} {what}: {per:,.0f} instructions ({top})", flush=True)


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


async def parent(args: argparse.Namespace) -> int:
    print(
        f"commit {revision('svantic_grpc', 'bench')}, Python {sys.version.split()[0]}, "
        f"grpcio {grpc.__version__}"
    )
    failed = False
    if args.part in ("memory", "both"):
        print(f"\n== memory per stream: {args.streams} streams per kind, {args.rounds} rounds, RSS growth ==")
        cost = await memory(args)
        print(f"{'stream':<28}{'KB/stream':>10}{'own KB':>9}{'target':>9}  verdict")
        for kind in ("bidi", "server"):
            print(
                f"{'bare grpc.aio ' + ('bidi' if kind == 'bidi' else 'server stream'):<28}"
                f"{cost[kind] / 1024:>10.1f}"
            )
        for kind, label in (("connect", "mesh Connect (agent)"), ("watch", "mesh WatchSession")):
            own = (cost[kind] - cost[BARE_OF[kind]]) / 1024
            ok = own <= TARGET_KB[kind]
            failed |= not ok
            print(
                f"{label:<28}{cost[kind] / 1024:>10.1f}{own:>9.1f}{'<= ' + str(int(TARGET_KB[kind])):>9}  "
                f"{_verdict(ok)}"
            )
    if args.part == "fanout-instructions":
        await instructions(args)
    if args.part in ("fanout", "both"):
        print(
            f"\n== fan-out: {args.subscribers} subscribers on one session in {args.watcher_processes} client "
            f"processes ({args.client} client), {args.events} events, a write every {args.interval_ms:g} ms "
            f"in {args.blocks} alternating blocks watched / nobody watching, servers on {args.loop} =="
        )
        args.events -= args.events % args.blocks
        runs = {kind: await fanout(args, kind) for kind in ("bare", "mesh")}
        print(
            f"{'server':<8}{'in order':>9}{'last p50':>10}{'last p99':>10}{'last max':>10}"
            f"{'write p50 none/1000':>22}{'ratio':>7}{'write p99 none/1000':>22}{'cpu us/sub/event':>18}"
            f"{'client cpu us/msg':>19}{'first p50':>11}{'first-last p50':>16}"
        )
        for kind, f in runs.items():
            in_order = f["disorder"] == 0 and f["complete"] == args.events
            print(
                f"{kind:<8}{'yes' if in_order else 'NO':>9}"
                f"{f['p50']:>10.1f}{f['p99']:>10.1f}{f['max']:>10.1f}"
                f"{f['alone_p50']:>11.2f} /{f['write_p50']:>8.2f}{f['write_p50'] / f['alone_p50']:>7.2f}"
                f"{f['alone_p99']:>11.2f} /{f['write_p99']:>8.2f}{f['cpu_us']:>18.1f}"
                f"{f['client_cpu_us']:>19.1f}{f['first_p50']:>11.1f}{f['spread_p50']:>16.1f}"
            )
        f = runs["mesh"]
        in_order = f["disorder"] == 0 and f["complete"] == args.events
        ratio = f["write_p50"] / f["alone_p50"]
        print(
            f"mesh: every subscriber got every event in order: {'yes' if in_order else 'NO'} "
            f"({f['complete']:.0f}/{args.events} events reached all, {f['disorder']:.0f} out of order)"
        )
        print(
            f"mesh: p99 delay to the last subscriber {f['p99']:.1f} ms (target <= 50): "
            f"{_verdict(f['p99'] <= 50)}"
        )
        print(
            f"mesh: InviteAgent p50 with {args.subscribers} subscribers / with none {ratio:.2f}x "
            f"(target <= 1.5x): {_verdict(ratio <= 1.5)}"
        )
        failed |= not in_order or f["p99"] > 50 or ratio > 1.5
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--role``, one of its child processes); returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("memory", "fanout", "both", "fanout-instructions"), default="both")
    parser.add_argument("--streams", type=int, default=1000, help="streams per kind for the memory part")
    parser.add_argument("--warm", type=int, default=50, help="streams opened and closed before measuring")
    parser.add_argument("--rounds", type=int, default=2, help="memory rounds (fresh servers each)")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--watcher-processes", type=int, default=4)
    parser.add_argument("--events", type=int, default=200, help="watched writes (and as many unwatched)")
    parser.add_argument(
        "--blocks", type=int, default=10, help="alternating blocks of unwatched/watched writes"
    )
    parser.add_argument("--interval-ms", type=float, default=100, help="between two invites")
    parser.add_argument("--count-events", type=int, default=20, help="events counted (fanout-instructions)")
    parser.add_argument("--kinds", default="bare,mesh", help="servers fanout-instructions counts")
    parser.add_argument("--keep-dumps", default="", help="a folder to keep callgrind's dumps in")
    parser.add_argument(
        "--count-in", default="server,client", help="what fanout-instructions counts: server, client or both"
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the servers' event loop (the mesh's setting event_loop; the bare server runs on the same)",
    )
    parser.add_argument("--max-seconds", type=float, default=600, help="hard stop for every child")
    # Internal: how the parent starts its children.
    parser.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="", help=argparse.SUPPRESS)
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--session", default="", help=argparse.SUPPRESS)
    parser.add_argument("--token", default="", help=argparse.SUPPRESS)
    parser.add_argument("--report-each", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--client",
        choices=("asyncio", "lean", "node"),
        default="asyncio",
        help="the watcher processes: grpc.aio on asyncio's loop reading with async for (the first "
        "client), on uvloop reading with read() and no generator layers (less CPU per message), or "
        "Node's @grpc/grpc-js (bench/node_watchers.js, the packages of tests/node)",
    )
    args = parser.parse_args(argv)
    if args.role == "parent":
        return asyncio.run(parent(args))
    logging.basicConfig(level=logging.ERROR)
    watchdog(args.max_seconds)
    roles = {
        "bare-server": run_bare_server,
        "mesh-server": run_mesh_server,
        "streams-client": run_streams_client,
        "watchers": run_watchers,
    }
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.role.endswith("-server"):
        from svantic_grpc.config import parse_settings
        from svantic_grpc.server import event_loop_factory

        # Both servers on the loop ``serve`` runs the mesh on with this ``event_loop`` setting.
        factory = event_loop_factory(parse_settings({"event_loop": args.loop}))
    elif args.role == "watchers" and args.client == "lean":
        import uvloop

        factory = uvloop.new_event_loop
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=factory) as runner:
        runner.run(roles[args.role](args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
