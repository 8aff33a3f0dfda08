"""Message round-trip benchmark: the mesh's two hops against a bare gRPC echo, in one run.

Run from the repository root::

    .venv/bin/python bench/message_roundtrip.py                  # ~1 minute
    .venv/bin/python bench/message_roundtrip.py --concurrency 8,32 --duration 5 --rounds 1
    .venv/bin/python bench/message_roundtrip.py --profile        # + cProfile of the mesh processes
    .venv/bin/python bench/message_roundtrip.py --py-spy         # + sampling profile (pip install py-spy)
    .venv/bin/python bench/message_roundtrip.py --no-relay       # without the two-hop relay (no verdict)
    .venv/bin/python bench/message_roundtrip.py --observability  # + the mesh with metrics off (issue 14)
    .venv/bin/python bench/message_roundtrip.py --hosted         # + a hosted a2a-sdk agent: direct vs mesh
    .venv/bin/python bench/message_roundtrip.py --loop asyncio   # every process on asyncio's own loop

What runs, each in its own process (started with ``subprocess``) so no two
share an event loop or the GIL, all on 127.0.0.1, every one on the event loop ``--loop``
names (default uvloop, which ``serve`` runs on; the relay and the bare echo too, so that each
is judged on the same loop):

* **bare**: a ``grpc.aio`` server with one unary echo method (generic handler,
  bytes in, the same bytes out). This is the transport's ceiling on the machine:
  one hop, no auth, no work.
* **mesh**: a ``MeshServer`` (in-memory store, development mode on loopback,
  ``session_ttl_ms`` 0, no dispatch budget), and a second process running the
  connected echo agent of ``examples/echo_agent.py`` (``ConnectedAgent`` over
  ``RegistryService.Connect``). A message goes client -> mesh -> agent -> mesh ->
  client: two gRPC hops plus routing, the message record and the session events.
* **relay** (on unless ``--no-relay``): the mesh's shape without the mesh: a
  grpc.aio server that forwards each unary call as one frame on an agent's
  bidirectional stream and answers with the agent's last reply, and an agent
  process that replies with ``--relay-updates`` frames (3, like the connected
  agent's ack, artifact and complete). It shows how much of the gap is the
  two-hop transport itself and how much is the mesh's own work.
* **mesh-off** (``--observability``, optional): a second mesh server and echo
  agent, with ``metrics.enabled`` false and no tracing. With ``--observability``
  the **mesh** mode runs with metrics on and tracing on: every span sampled
  (``OTEL_TRACES_SAMPLER=always_on``) and exported over OTLP/HTTP to a sink in
  the parent process that reads the bytes and answers 200. The ratio
  mesh/mesh-off is what observability costs (target >= 0.9x); each round's
  pair and the servers' CPU per message are printed beside it, and with
  ``--py-spy`` the share of the traced server's samples that OpenTelemetry
  takes (its export thread included). The agents and the client make no spans.
  The traced server exports from a child process (``svantic_grpc._span_export``): its CPU per
  message is printed apart. ``--trace-variants`` adds traced servers that each leave one part
  of the work out or do it another way (``drop``, ``unqueued``, ``unsampled``, ``a2a-off``,
  ``metrics-only``, ``in-process``: the SDK exporting in the server, as before), in the same
  run. ``bench/tracing_floor.py`` gives tracing's own cost per message, and
  ``bench/observability_ab.py`` the whole message's CPU with each variant in one process.
* **direct** and **hosted** (``--hosted``, optional; issue 12 item 1): a plain
  a2a-sdk JSON-RPC echo agent server in its own process, called by the client
  directly with a2a-sdk's streaming client (the call the mesh makes), and through
  the mesh (``SendMessage`` -> mesh -> that agent, registered as hosted -> back).
  Target: hosted/direct >= 0.9x at 1 and 16 clients, mesh server CPU per hosted
  message <= 2 ms. See ``bench/_hosted.py``.
* **client**: the same program for all. ``--concurrency`` asyncio tasks share
  one channel; each sends a small message, waits for the answer, and sends the
  next, until the time is up. For the mesh each task has its own session (made
  with ``InitSession`` before the clock starts) and calls ``SendMessage``
  (unary, returns when the message is completed) with a text part and the data
  part ``{"target_agent": "echo"}``.

Each measurement warms up for ``--warmup`` seconds (not counted), then counts
``--duration`` seconds: messages/s (calls completed in the window / window) and
p50/p99 latency of the calls that started and ended inside it. With
``--rounds`` > 1 the order of the modes rotates each round and the
table shows every round plus the median per mode; the verdict uses the
medians. The servers stay up across rounds; a fresh client process measures
each time. CPU% is each process's user+system time over the window (100% = one
core), read from /proc; "cpu ms/msg" divides it by the throughput, which is
steadier than msgs/s on a busy machine.

Targets (issue 12, item 2): mesh throughput >= 0.70x the relay's at each concurrency
(printed as ``mesh/relay 0.NN``), and the mesh server's CPU per message at 32 clients
<= 1.0 ms. The relay is what a two-hop design in this stack reaches on the machine;
mesh/bare is printed for reference (the earlier target against the one-hop echo is
retired).

``--profile`` runs the mesh server and the agent under cProfile, switched on
only for the mesh measurement windows (SIGUSR1/SIGUSR2), and prints where the
time went by function and by module. Profiling slows the mesh down a lot: the
ratio printed in that mode is not the benchmark's figure. ``--py-spy`` instead
samples the mesh server and the agent from outside (``py-spy record
--nonblocking``, when py-spy is installed next to Python) during the first mesh
window of each concurrency: far less distortion, and the same kind of tables.

Every process stops by itself: clients after their window, servers when the
parent closes their stdin, and each child after ``--max-seconds`` whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import itertools
import json
import logging
import os
import platform
import pstats
import re
import signal
import statistics
import struct
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _hosted
import grpc
from _child import LOOP_ENV, Child, revision, run_on_loop, say, start_role, until_stdin_closes, watchdog
from grpc import aio

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
PY_SPY = Path(sys.executable).parent / "py-spy"
HOST = "127.0.0.1"
ECHO_METHOD = "/bench.Echo/Echo"
RELAY_CALL = "/bench.Relay/Call"
RELAY_AGENT = "/bench.Relay/Agent"
RELAY_FRAME = struct.Struct(">QB")  # dispatch number, update number
DEV_CLIENT = ("svantic", "your-secret")  # the loopback-only development credential


# --------------------------------------------------------------------------- children


class _Profiler:
    """cProfile switched on by SIGUSR1 and off by SIGUSR2; dumped to ``path`` at exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.profile = cProfile.Profile()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self.profile.enable)
        loop.add_signal_handler(signal.SIGUSR2, self.profile.disable)

    def dump(self) -> None:
        self.profile.disable()
        self.profile.dump_stats(self.path)


async def run_bare_server(args: argparse.Namespace) -> None:
    async def echo(request: bytes, context: aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo, request_deserializer=None, response_serializer=None
            )
        },
    )
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    say(f"PORT {port}")
    await until_stdin_closes()
    await server.stop(0)


async def run_mesh_server(args: argparse.Namespace) -> None:
    untraced = args.metrics_off or args.trace_variant == "metrics-only"
    if untraced:  # mesh-off: as `svantic-grpc serve` runs with no OTEL_* in its environment
        for key in [k for k in os.environ if k.startswith("OTEL_")]:
            del os.environ[key]
    if args.otlp_endpoint and not untraced:  # before the imports below: the CLI's a2a-sdk switch reads it
        os.environ.update(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": args.otlp_endpoint, "OTEL_TRACES_SAMPLER": "always_on"}
        )
    if args.trace_variant == "a2a-off":  # a2a-sdk's own decorators off although traces are on
        os.environ["OTEL_INSTRUMENTATION_A2A_SDK_ENABLED"] = "false"
    import svantic_grpc.cli  # noqa: F401  (what `svantic-grpc serve` sets before a2a-sdk loads)
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
            # The benchmark sends far more than the default guardrail of 1000 per session.
            "dispatch": {"max_dispatches_per_session": 0},
            "metrics": {"enabled": not args.metrics_off},
        }
    )
    # No signing key in env: the development default (loopback only, credential 'svantic').
    env: dict[str, str] = {}
    if args.otlp_endpoint and not untraced:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": args.otlp_endpoint, "OTEL_TRACES_SAMPLER": "always_on"}
    provider = _variant_provider(args.trace_variant) if args.trace_variant else None
    server = MeshServer(settings, env=env, tracer_provider=provider)
    profiler = _Profiler(args.profile_out) if args.profile_out else None
    await server.start()
    say(f"PORT {server.port}")
    try:
        await until_stdin_closes()
    finally:
        if profiler:
            profiler.dump()
        await server.stop(0)


TRACE_VARIANTS = {
    "drop": "spans batched by BatchSpanProcessor to an exporter that drops them (no encoding, no post)",
    "unqueued": "spans started and ended, no span processor (nothing queued or exported)",
    "unsampled": "the traced server's wiring with the sampler always off (no span recorded)",
    "a2a-off": "as mesh, with a2a-sdk's own OpenTelemetry decorators off",
    "metrics-only": "metrics on, tracing off (no OTEL_* variable)",
    "in-process": "OTLP encoded and posted by the server's own export thread (before the child exporter)",
}
"""``--trace-variants``: traced servers that leave out one part of tracing's work each, to find what costs."""


def _variant_provider(variant: str) -> Any:
    """The tracer provider of a ``--trace-variants`` server (``None``: the server's own, from env)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    resource = Resource.create({"service.name": "svantic-grpc"})
    if variant == "drop":
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        return provider
    if variant == "unqueued":
        return TracerProvider(resource=resource)
    if variant == "unsampled":
        return TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    if variant == "in-process":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return provider
    return None


async def run_agent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    from echo_agent import make_agent  # the example agent, as the README walks through it

    agent = make_agent(args.target, "echo-bench-1")
    profiler = _Profiler(args.profile_out) if args.profile_out else None
    task = asyncio.create_task(agent.run())
    connected = asyncio.create_task(agent.connected.wait())
    done, _ = await asyncio.wait({task, connected}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if connected not in done:
        task.cancel()
        raise SystemExit("the echo agent did not connect within 30s")
    say("READY")
    try:
        await until_stdin_closes()
    finally:
        if profiler:
            profiler.dump()
        await agent.stop()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(task, 5)


async def run_relay_server(args: argparse.Namespace) -> None:
    """The two-hop shape with no mesh logic: unary in, one frame to the agent's stream, its reply out."""
    loop = asyncio.get_running_loop()
    pending: dict[int, asyncio.Future[bytes]] = {}
    outbox: asyncio.Queue[bytes] = asyncio.Queue()
    numbers = itertools.count()
    last = args.relay_updates - 1

    async def call(request: bytes, context: aio.ServicerContext) -> bytes:
        number = next(numbers)
        future: asyncio.Future[bytes] = loop.create_future()
        pending[number] = future
        outbox.put_nowait(RELAY_FRAME.pack(number, 0) + request)
        try:
            return await future
        finally:
            pending.pop(number, None)

    async def agent(requests: Any, context: aio.ServicerContext) -> Any:
        async def read() -> None:
            async for frame in requests:
                number, update = RELAY_FRAME.unpack_from(frame)
                future = pending.get(number)
                if update == last and future is not None and not future.done():
                    future.set_result(frame[RELAY_FRAME.size :])

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await outbox.get()
        finally:
            reader.cancel()

    handler = grpc.method_handlers_generic_handler(
        "bench.Relay",
        {
            "Call": grpc.unary_unary_rpc_method_handler(call),
            "Agent": grpc.stream_stream_rpc_method_handler(agent),
        },
    )
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    say(f"PORT {port}")
    await until_stdin_closes()
    await server.stop(0)


async def run_relay_agent(args: argparse.Namespace) -> None:
    """Answers each frame with ``--relay-updates`` frames (like ack, artifact, complete); the last echoes."""
    async with aio.insecure_channel(args.target) as channel:
        outbox: asyncio.Queue[bytes] = asyncio.Queue()

        async def requests() -> Any:
            while True:
                yield await outbox.get()

        stream = channel.stream_stream(RELAY_AGENT)(requests())
        last = args.relay_updates - 1

        async def serve() -> None:
            async for frame in stream:
                number, _ = RELAY_FRAME.unpack_from(frame)
                for update in range(last):
                    outbox.put_nowait(RELAY_FRAME.pack(number, update))
                outbox.put_nowait(RELAY_FRAME.pack(number, last) + frame[RELAY_FRAME.size :])

        server = asyncio.create_task(serve())
        await asyncio.wait_for(channel.channel_ready(), 10)
        say("READY")
        await until_stdin_closes()
        server.cancel()
        stream.cancel()


Call = Callable[[], Awaitable[None]]


async def _mesh_calls(channel: aio.Channel, concurrency: int, sessions: int) -> list[Call]:
    from svantic_grpc.pb import auth_service_pb2, message_service_pb2, message_types_pb2
    from svantic_grpc.pb import session_service_pb2 as session_pb
    from svantic_grpc.pb.auth_service_pb2_grpc import AuthServiceStub
    from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
    from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub

    token = await AuthServiceStub(channel).GetToken(
        auth_service_pb2.GetTokenRequest(
            client_id=DEV_CLIENT[0], client_secret=DEV_CLIENT[1], agent_type="bench-client"
        )
    )
    md = (("authorization", f"Bearer {token.token}"),)
    session_ids = []
    for _ in range(sessions):
        created = await SessionServiceStub(channel).InitSession(session_pb.InitSessionRequest(), metadata=md)
        session_ids.append(created.session.session_id)
    stub = MessageServiceStub(channel)
    completed = message_types_pb2.MESSAGE_STATE_COMPLETED

    def make(index: int) -> Call:
        target = message_types_pb2.Part()
        target.data.update({"target_agent": "echo"})
        request = message_service_pb2.SendMessageRequest(
            session_id=session_ids[index % sessions],
            message=message_service_pb2.OutgoingMessage(
                parts=[message_types_pb2.Part(text=f"hello from client {index}"), target]
            ),
        )

        async def call() -> None:
            response = await stub.SendMessage(request, metadata=md)
            message = response.message
            if message.state != completed:
                raise RuntimeError(f"message ended {message.state}: {message.state_reason}")

        return call

    return [make(i) for i in range(concurrency)]


def _bare_calls(channel: aio.Channel, concurrency: int, size: int, method: str = ECHO_METHOD) -> list[Call]:
    echo = channel.unary_unary(method, request_serializer=None, response_deserializer=None)

    def make(index: int) -> Call:
        payload = (f"hello from client {index} ".encode() * size)[:size]

        async def call() -> None:
            if await echo(payload) != payload:
                raise RuntimeError("echo returned other bytes")

        return call

    return [make(i) for i in range(concurrency)]


async def run_client(args: argparse.Namespace) -> None:
    async with aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        if args.mode == "bare":
            calls = _bare_calls(channel, args.concurrency, args.payload)
        elif args.mode == "relay":
            calls = _bare_calls(channel, args.concurrency, args.payload, RELAY_CALL)
        elif args.mode == "direct":
            calls = await _hosted.direct_calls(args.agent_url, args.concurrency)
        elif args.mode == "hosted":
            calls = await _hosted.hosted_calls(channel, args.concurrency)
        else:
            sessions = args.sessions or args.concurrency
            calls = await _mesh_calls(channel, args.concurrency, sessions)
        loop = asyncio.get_running_loop()
        start = loop.time()
        measure_from = start + args.warmup
        measure_to = measure_from + args.duration
        latencies: list[float] = []
        errors: list[str] = []
        counted = 0

        async def worker(call: Call) -> None:
            nonlocal counted
            while (began := loop.time()) < measure_to:
                try:
                    await call()
                except Exception as error:
                    errors.append(f"{type(error).__name__}: {error}"[:200])
                    if len(errors) > 1000:
                        return
                    continue
                ended = loop.time()
                if measure_from <= ended <= measure_to:
                    counted += 1
                    if began >= measure_from:
                        latencies.append(ended - began)

        async def marks() -> None:
            await asyncio.sleep(max(measure_from - loop.time(), 0))
            say("WARM")
            await asyncio.sleep(max(measure_to - loop.time(), 0))
            say("DONE")

        await asyncio.gather(marks(), *(worker(c) for c in calls))
        latencies.sort()

        def pct(p: float) -> float:
            if not latencies:
                return float("nan")
            return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

        result = {
            "count": counted,
            "rate": counted / args.duration,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "errors": len(errors),
            "first_error": errors[0] if errors else "",
        }
        say("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------- parent


class MeasuredChild(Child):
    """A child whose CPU time the parent reads from /proc."""

    def cpu_seconds(self) -> float:
        return _cpu_of(self.process.pid)

    def children_cpu_seconds(self) -> float:
        """CPU time of this child's own children (a traced mesh server's OTLP exporting process)."""
        try:
            tasks = list(Path(f"/proc/{self.process.pid}/task").iterdir())
            pids = [int(p) for task in tasks for p in (task / "children").read_text().split()]
        except OSError:
            return 0.0
        return sum(_cpu_of(pid) for pid in pids)

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def spawn(
    name: str, role: str, max_seconds: float, *extra: str, tree: Path | None = None
) -> MeasuredChild:
    """A child of this benchmark; with ``tree``, the same role run from another checkout (its
    own copy of this script, its code first on ``PYTHONPATH``), for ``--base``."""
    if tree is None:
        process = await start_role(SCRIPT, role, max_seconds, *extra)
    else:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        script = tree / "bench" / SCRIPT.name
        process = await start_role(script, role, max_seconds, *extra, env=env, cwd=tree)
    return MeasuredChild(name, process)


@dataclass
class Row:
    mode: str
    concurrency: int
    round: int
    result: dict[str, Any]
    cpu: dict[str, float]


async def measure(
    args: argparse.Namespace,
    mode: str,
    concurrency: int,
    round_no: int,
    target: str,
    servers: dict[str, MeasuredChild],
    profiled: list[MeasuredChild],
    spied: dict[str, Path] | None = None,
) -> Row:
    extra = [
        "--mode",
        mode,
        "--target",
        target,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--sessions",
        str(args.sessions),
        "--payload",
        str(args.payload),
        *(["--agent-url", args.agent_url] if args.agent_url else []),
    ]
    client = await spawn(f"client-{mode}", "client", args.warmup + args.duration + 60, *extra)
    watched = {**servers, "client": client}
    try:
        await client.expect("WARM", args.warmup + 60)
        before = {name: child.cpu_seconds() for name, child in watched.items()}
        exporter_before = servers["server"].children_cpu_seconds() if "server" in servers else 0.0
        began = time.monotonic()
        for child in profiled:
            child.signal(signal.SIGUSR1)
        spies = [
            await _start_py_spy(servers[name], out, max(1, int(args.duration) - 1), args.native)
            for name, out in (spied or {}).items()
        ]
        await client.expect("DONE", args.duration + 30)
        for spy in spies:
            await asyncio.wait_for(spy.wait(), 60)
        for child in profiled:
            child.signal(signal.SIGUSR2)
        elapsed = time.monotonic() - began
        cpu = {name: (child.cpu_seconds() - before[name]) / elapsed * 100 for name, child in watched.items()}
        if "server" in servers and mode.startswith("mesh"):  # the OTLP exporting child of a traced server
            cpu["exporter"] = (servers["server"].children_cpu_seconds() - exporter_before) / elapsed * 100
        result = json.loads(await client.expect("RESULT", 60))
    finally:
        await client.stop()
    return Row(mode, concurrency, round_no, result, cpu)


def _print_rows(rows: list[Row]) -> None:
    header = (
        f"{'mode':<15}{'conc':>5}{'round':>7}{'msgs/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"  {'cpu% server/agent/client':>26}  {'cpu ms/msg server/agent/client':>32}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        r = row.result
        rate = r["rate"] or float("nan")
        names = ("server", "agent", "client")
        pct = "/".join(f"{row.cpu[n]:.0f}" if n in row.cpu else "-" for n in names)
        per = "/".join(f"{row.cpu[n] * 10 / rate:.2f}" if n in row.cpu else "-" for n in names)
        print(
            f"{row.mode:<15}{row.concurrency:>5}{row.round:>7}{r['rate']:>10.0f}{r['p50_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['errors']:>8}  {pct:>26}  {per:>32}"
        )
        if r["first_error"]:
            print(f"{'':<6}first error: {r['first_error']}")


def _median(rows: list[Row], key: str) -> float:
    return statistics.median(r.result[key] for r in rows)


MESH_PER_RELAY = 0.70
"""Target (issue 12): the mesh's throughput at least this share of the relay's, at each concurrency."""
MESH_SERVER_MS = 1.0
"""Target (issue 12): the mesh server's CPU per message at 32 clients at most this many ms."""


def _cpu_ms(row: Row, name: str) -> float:
    """CPU ms per message of one process in one measurement."""
    rate = row.result["rate"] or float("nan")
    return row.cpu.get(name, float("nan")) * 10 / rate


def _print_two_hop_summary(rows: list[Row], concurrency: int) -> None:
    """Medians of one concurrency: bare, mesh and relay, and the verdicts of the two-hop targets."""
    of = {
        m: [r for r in rows if r.mode == m and r.concurrency == concurrency]
        for m in ("bare", "mesh", "relay")
    }
    bare, mesh, relay = of["bare"], of["mesh"], of["relay"]
    c = f"c={concurrency}:"
    if bare:
        print(
            f"{c} median bare {_median(bare, 'rate'):.0f} msgs/s (p50 {_median(bare, 'p50_ms'):.2f} ms,"
            f" p99 {_median(bare, 'p99_ms'):.2f} ms), one hop: the transport's ceiling here"
        )
    if not mesh:
        return
    mesh_rate = _median(mesh, "rate")
    print(
        f"{c} median mesh {mesh_rate:.0f} msgs/s (p50 {_median(mesh, 'p50_ms'):.2f} ms,"
        f" p99 {_median(mesh, 'p99_ms'):.2f} ms)"
        + (f", mesh/bare {mesh_rate / _median(bare, 'rate'):.2f}x (for reference)" if bare else "")
    )
    if relay:
        relay_rate = _median(relay, "rate")
        ratio = mesh_rate / relay_rate if relay_rate else float("nan")
        print(
            f"{c} median relay {relay_rate:.0f} msgs/s (p50 {_median(relay, 'p50_ms'):.2f} ms)"
            f" | mesh/relay {ratio:.2f}  (target >= {MESH_PER_RELAY:.2f}:"
            f" {'MET' if ratio >= MESH_PER_RELAY else 'NOT MET'})"
        )
    else:
        print(f"{c} mesh/relay not measured (--no-relay): the target is against the relay")
    server = statistics.median(_cpu_ms(r, "server") for r in mesh)
    each = ", ".join(f"{_cpu_ms(r, 'server'):.2f}" for r in mesh)
    line = (
        f"{c} mesh server CPU {server:.2f} ms/msg (rounds {each}"
        + (f"; relay server {statistics.median(_cpu_ms(r, 'server') for r in relay):.2f}" if relay else "")
        + ")"
    )
    if concurrency == 32:
        ok = server <= MESH_SERVER_MS
        line += f"  (target <= {MESH_SERVER_MS:.1f} ms at 32 clients: {'MET' if ok else 'NOT MET'})"
    print(line)


def _print_base(rows: list[Row], concurrency: int) -> None:
    """``--base``: this checkout's mesh against the other's, round by round (same machine load)."""
    new = {r.round: r for r in rows if r.mode == "mesh" and r.concurrency == concurrency}
    base = {r.round: r for r in rows if r.mode == "mesh-base" and r.concurrency == concurrency}
    both = [n for n in sorted(new) if n in base]
    if not both:
        return
    rate = [new[n].result["rate"] / base[n].result["rate"] for n in both]
    cpu = [_cpu_ms(new[n], "server") / _cpu_ms(base[n], "server") for n in both]
    agent = [_cpu_ms(new[n], "agent") / _cpu_ms(base[n], "agent") for n in both]
    relay = {r.round: r for r in rows if r.mode == "relay" and r.concurrency == concurrency}
    print(
        f"c={concurrency}: mesh (this checkout) / mesh-base, each round: msgs/s "
        f"{', '.join(f'{x:.2f}' for x in rate)} (median {statistics.median(rate):.2f}x); server CPU per "
        f"message {', '.join(f'{x:.2f}' for x in cpu)} (median {statistics.median(cpu):.2f}x); agent CPU "
        f"per message median {statistics.median(agent):.2f}x"
    )
    base_ms = statistics.median(_cpu_ms(base[n], "server") for n in both)
    line = f"c={concurrency}: mesh-base server CPU {base_ms:.2f} ms/msg"
    if relay:
        base_rate = _median([base[n] for n in both], "rate")
        line += f", mesh-base/relay {base_rate / _median(list(relay.values()), 'rate'):.2f}"
    print(line)


OBSERVABILITY_KEPT = 0.9
"""Target (issue 14): the mesh with metrics and tracing on keeps at least this share of its throughput."""


def _print_observability(rows: list[Row], concurrency: int, mode: str = "mesh") -> None:
    """Mesh (metrics and tracing on) against mesh-off: medians, each round's pair, and the verdict;
    for a ``--trace-variants`` ``mode``, that server against mesh-off."""
    on = {r.round: r for r in rows if r.mode == mode and r.concurrency == concurrency}
    off = {r.round: r for r in rows if r.mode == "mesh-off" and r.concurrency == concurrency}
    if not off:
        return
    on_rate, off_rate = _median(list(on.values()), "rate"), _median(list(off.values()), "rate")
    kept = on_rate / off_rate if off_rate else float("nan")
    paired = [on[n].result["rate"] / off[n].result["rate"] for n in sorted(on) if n in off]
    cpu = [_cpu_ms(off[n], "server") / _cpu_ms(on[n], "server") for n in sorted(on) if n in off]
    if mode == "mesh":
        print(
            f"c={concurrency}: median mesh with metrics and tracing {on_rate:.0f} msgs/s,"
            f" without {off_rate:.0f} msgs/s | with/without = {kept:.2f}x"
            f"  (target >= {OBSERVABILITY_KEPT:.2f}x: {'MET' if kept >= OBSERVABILITY_KEPT else 'NOT MET'})"
        )
    else:
        variant = mode.removeprefix("mesh-")
        what = TRACE_VARIANTS.get(variant, "the traced mesh of --base" if variant == "base" else variant)
        print(f"c={concurrency}: {mode} ({what}): {on_rate:.0f} msgs/s, {kept:.2f}x mesh-off's")
    on_ms = statistics.median(_cpu_ms(r, "server") for r in on.values())
    off_ms = statistics.median(_cpu_ms(r, "server") for r in off.values())
    print(f"c={concurrency}: {mode} server CPU {on_ms:.2f} ms/msg, off {off_ms:.2f} (+{on_ms - off_ms:.2f})")
    exporter_ms = statistics.median(_cpu_ms(r, "exporter") for r in on.values())
    if exporter_ms == exporter_ms:  # not NaN: a traced server has an exporting child
        print(f"c={concurrency}: {mode} server's OTLP exporting child process CPU {exporter_ms:.3f} ms/msg")
    print(
        f"c={concurrency}: each round {mode}/mesh-off: msgs/s {', '.join(f'{x:.2f}' for x in paired)}"
        f" (median {statistics.median(paired):.2f}x); server CPU per message without/with"
        f" {', '.join(f'{x:.2f}' for x in cpu)} (median {statistics.median(cpu):.2f}x)"
    )


_OTEL_FILES = re.compile(
    r"\((trace/|attributes/|context/|baggage/|propagate/|propagators/|resources/|sdk/|_shared_internal/"
    r"|util/__init__|exporter/|common/_internal/|http/trace_exporter/)"
)
"""py-spy's frames of OpenTelemetry's API, SDK and OTLP exporter (paths relative to site-packages)."""


def _print_otel_share(path: Path, title: str) -> None:
    """How much of the traced server's busy samples OpenTelemetry takes: on the event loop's thread
    (spans started, ended, made current) and in the batch span processor's export thread (encoding
    and posting), which ``_print_py_spy`` leaves out with the other threads."""
    if not path.exists():
        return
    loop = otel = export = 0
    first: dict[str, int] = defaultdict(int)
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if "Thread._bootstrap" in stack:
            export += count if "_shared_internal" in stack else 0
            continue
        loop += count
        hit = next((f for f in stack.split(";") if _OTEL_FILES.search(f)), None)
        if hit is not None:
            otel += count
            first[hit.partition(" (")[0]] += count
    busy = loop + export
    if not busy:
        return
    print(
        f"\n== OpenTelemetry in the {title}: {(otel + export) / busy * 100:.1f}% of its busy samples"
        f" ({otel / busy * 100:.1f}% on the event loop, {export / busy * 100:.1f}% in the export thread) =="
    )
    for name, n in sorted(first.items(), key=lambda kv: -kv[1])[:6]:
        print(f"{n / busy * 100:7.1f}  {name} (on the loop)")


def _print_profile(path: Path, title: str, top: int) -> None:
    if not path.exists() or path.stat().st_size == 0:
        print(f"\n(no profile for {title})")
        return
    stats = pstats.Stats(str(path))
    total = sum(v[2] for v in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    print(f"\n== profile: {title} (cProfile, mesh windows only; own time = tottime) ==")
    print(f"total own time {total:.2f}s")
    by_area: dict[str, float] = defaultdict(float)
    for (file, _line, func), value in stats.stats.items():  # type: ignore[attr-defined]
        by_area[_area(file, func)] += value[2]
    print(f"\n{'own %':>7}  area")
    for area, seconds in sorted(by_area.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{seconds / total * 100:7.1f}  {area}")
    print(f"\n{'own %':>7}{'cum %':>7}{'calls':>10}  function")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    for (file, line, func), value in rows:
        where = _short(file)
        print(
            f"{value[2] / total * 100:7.1f}{value[3] / total * 100:7.1f}{value[1]:>10}  {where}:{line} {func}"
        )
    print(f"\n{'cum %':>7}  svantic_grpc functions by cumulative time")
    ours = [
        (key, value)
        for key, value in stats.stats.items()  # type: ignore[attr-defined]
        if "svantic_grpc" in key[0] or "connected_agent" in key[0] or "echo_agent" in key[0]
    ]
    for (file, line, func), value in sorted(ours, key=lambda kv: -kv[1][3])[:top]:
        print(f"{value[3] / total * 100:7.1f}  {_short(file)}:{line} {func}")


async def _start_py_spy(
    child: MeasuredChild, out: Path, seconds: int, native: bool
) -> asyncio.subprocess.Process:
    # --native needs to pause the process for each sample (py-spy has no non-blocking native mode).
    mode = ["--native", "--rate", "100"] if native else ["--nonblocking", "--rate", "250"]
    return await asyncio.create_subprocess_exec(
        str(PY_SPY),
        "record",
        *mode,
        "--pid",
        str(child.process.pid),
        "--duration",
        str(seconds),
        "--format",
        "raw",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=out.with_suffix(".log").open("wb"),
    )


def _print_py_spy(path: Path, title: str, top: int) -> None:
    """Tables from py-spy's collapsed stacks: own time by area and function, inclusive time of ours."""
    if not path.exists():
        log = path.with_suffix(".log")
        print(f"\n(no py-spy samples for {title}: {log.read_text().strip() if log.exists() else ''})")
        return
    own_fn: dict[str, int] = defaultdict(int)
    own_area: dict[str, int] = defaultdict(int)
    inclusive: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        if "Thread._bootstrap" in stack:
            continue  # the benchmark's own helper threads (stdin watcher, watchdog), idle in C
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        func, file = frames[-1]
        own_fn[f"{_short(file)} {func}"] += count
        own_area[_area(file, func)] += count
        for name in {f"{_short(file)} {func}" for func, file in frames}:
            inclusive[name] += count
    if not total:
        print(f"\n(no py-spy samples for {title})")
        return
    print(f"\n== py-spy: {title} ({total} samples of a busy thread, mesh window) ==")
    print(f"\n{'own %':>7}  area (leaf frame)")
    for area, n in sorted(own_area.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{n / total * 100:7.1f}  {area}")
    print(f"\n{'own %':>7}  function (leaf frame)")
    for name, n in sorted(own_fn.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{n / total * 100:7.1f}  {name}")
    print(f"\n{'incl %':>7}  function (anywhere on the stack)")
    for name, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[: top * 2]:
        print(f"{n / total * 100:7.1f}  {name}")


def _frame(text: str) -> tuple[str, str]:
    """``func (file:line)`` -> (func, file)."""
    func, _, where = text.partition(" (")
    return func, where.rstrip(")").rpartition(":")[0] or where


def _short(file: str) -> str:
    for marker in ("site-packages/", "svantic_grpc/", "lib/python3.11/"):
        if marker in file:
            head = "svantic_grpc/" if marker == "svantic_grpc/" else ""
            return head + file.split(marker, 1)[1]
    return file


def _area(file: str, func: str) -> str:
    if file == "~":  # a builtin: name it by what it is
        if "grpc" in func or "cygrpc" in func:
            return "grpc (C/Cython)"
        if "deepcopy" in func or "copy" in func:
            return "builtin copy"
        return f"builtin {func.split(' of ')[0].strip('<>{}')[:40]}"
    short = _short(file)
    if short.startswith("svantic_grpc/"):
        return "/".join(short.split("/")[:3])
    if "connected_agent" in short or "echo_agent" in short:
        return short
    parts = short.split("/")
    return parts[0] if len(parts) > 1 else short


_EXPORTS: list[int] = []
"""Bytes of each OTLP export the sink received."""


def _otlp_sink() -> str:
    """An OTLP/HTTP endpoint in this (parent) process that reads each export and answers 200."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Sink(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # one connection kept for all exports, as a collector would

        def do_POST(self) -> None:
            _EXPORTS.append(len(self.rfile.read(int(self.headers.get("content-length") or 0))))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://{HOST}:{server.server_address[1]}"


def _revision() -> str:
    return revision("svantic_grpc", "examples")


async def parent(args: argparse.Namespace, revision: str) -> int:
    concurrencies = [int(c) for c in str(args.concurrency).split(",")]
    print(
        f"nproc {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))})"
        f" | Python {platform.python_version()}"
        f" | grpcio {grpc.__version__} | {platform.machine()} {platform.system()} {platform.release()}"
        f" | svantic-grpc at {revision}"
    )
    print(
        f"concurrency {args.concurrency}, warm-up {args.warmup:g}s + measured {args.duration:g}s per point, "
        f"{args.rounds} round(s), sessions "
        + (f"{args.sessions} shared by the clients" if args.sessions else "one per client")
        + f", bare payload {args.payload} B"
    )
    if args.profile:
        print("PROFILING: cProfile slows the mesh processes; the ratio below is not the benchmark figure.")
    sys.stdout.flush()
    untraced_base = bool(args.base) and not args.observability  # (with it: the traced base, below)
    modes = ["bare", "mesh", *(["relay"] if args.relay else []), *(["mesh-base"] if untraced_base else [])]
    modes += ["mesh-off"] if args.observability else []
    variants = [v for v in args.trace_variants.split(",") if v] if args.observability else []
    modes += [f"mesh-{v}" for v in variants]
    modes += ["mesh-base"] if args.observability and args.base else []
    if not args.bare:
        modes.remove("bare")
    modes += ["direct", "hosted"] if args.hosted else []
    life = 60 + len(concurrencies) * args.rounds * len(modes) * (args.warmup + args.duration + 30)
    tmp = Path(tempfile.mkdtemp(prefix="svantic-bench-"))
    mesh_prof, agent_prof = tmp / "mesh-server.prof", tmp / "agent.prof"
    children: list[MeasuredChild] = []
    rows: list[Row] = []
    try:
        bare = await spawn("bare-server", "bare-server", life)
        children.append(bare)
        sink = _otlp_sink() if args.observability else ""
        mesh = await spawn(
            "mesh-server",
            "mesh-server",
            life,
            *(["--profile-out", str(mesh_prof)] if args.profile else []),
            *(["--otlp-endpoint", sink] if sink else []),
        )
        children.append(mesh)
        bare_target = f"{HOST}:{await bare.expect('PORT', 30)}"
        mesh_target = f"{HOST}:{await mesh.expect('PORT', 60)}"
        agent = await spawn(
            "agent",
            "agent",
            life,
            "--target",
            mesh_target,
            *(["--profile-out", str(agent_prof)] if args.profile else []),
        )
        children.append(agent)
        await agent.expect("READY", 60)
        if args.relay:
            relay = await spawn(
                "relay-server", "relay-server", life, "--relay-updates", str(args.relay_updates)
            )
            children.append(relay)
            relay_target = f"{HOST}:{await relay.expect('PORT', 30)}"
            relay_agent = await spawn(
                "relay-agent",
                "relay-agent",
                life,
                "--target",
                relay_target,
                "--relay-updates",
                str(args.relay_updates),
            )
            children.append(relay_agent)
            await relay_agent.expect("READY", 30)
        if untraced_base:
            base_tree = Path(args.base)  # made absolute by main
            mesh_base = await spawn("mesh-base-server", "mesh-server", life, tree=base_tree)
            children.append(mesh_base)
            mesh_base_target = f"{HOST}:{await mesh_base.expect('PORT', 60)}"
            target = mesh_base_target
            agent_base = await spawn("agent-base", "agent", life, "--target", target, tree=base_tree)
            children.append(agent_base)
            await agent_base.expect("READY", 60)
        if args.observability:
            mesh_off = await spawn("mesh-off-server", "mesh-server", life, "--metrics-off")
            children.append(mesh_off)
            mesh_off_target = f"{HOST}:{await mesh_off.expect('PORT', 60)}"
            agent_off = await spawn("agent-off", "agent", life, "--target", mesh_off_target)
            children.append(agent_off)
            await agent_off.expect("READY", 60)
        variant_servers: dict[str, tuple[str, dict[str, MeasuredChild]]] = {}
        for variant in variants:
            extra = ("--otlp-endpoint", sink, "--trace-variant", variant)
            server = await spawn(f"mesh-{variant}-server", "mesh-server", life, *extra)
            children.append(server)
            target = f"{HOST}:{await server.expect('PORT', 60)}"
            variant_agent = await spawn(f"agent-{variant}", "agent", life, "--target", target)
            children.append(variant_agent)
            await variant_agent.expect("READY", 60)
            variant_servers[f"mesh-{variant}"] = (target, {"server": server, "agent": variant_agent})
        if args.observability and args.base:
            # The same traced server and agent, run from the other checkout (its code, its venv).
            base_script = args.base / "bench" / SCRIPT.name
            python = str(args.base / ".venv" / "bin" / "python")

            async def spawn_base(name: str, role: str, *extra: str) -> MeasuredChild:
                process = await asyncio.create_subprocess_exec(
                    python,
                    str(base_script),
                    "--role",
                    role,
                    "--max-seconds",
                    str(life),
                    *extra,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=args.base,
                )
                return MeasuredChild(name, process)

            server = await spawn_base("mesh-base-server", "mesh-server", "--otlp-endpoint", sink)
            children.append(server)
            target = f"{HOST}:{await server.expect('PORT', 60)}"
            base_agent = await spawn_base("agent-base", "agent", "--target", target)
            children.append(base_agent)
            await base_agent.expect("READY", 60)
            variant_servers["mesh-base"] = (target, {"server": server, "agent": base_agent})
        if args.hosted:
            hosted_agent = await spawn("hosted-agent", "hosted-agent", life)
            children.append(hosted_agent)
            args.agent_url = await hosted_agent.expect("URL", 60)
            await _hosted.register(mesh_target, args.agent_url)
        for concurrency in concurrencies:
            for round_no in range(1, args.rounds + 1):
                shift = (round_no - 1) % len(modes)
                order = modes[shift:] + modes[:shift]  # alternate which mode runs first
                for mode in order:
                    if mode == "bare":
                        row = await measure(
                            args, "bare", concurrency, round_no, bare_target, {"server": bare}, []
                        )
                    elif mode == "mesh-base" and mode not in variant_servers:  # (traced: below)
                        servers = {"server": mesh_base, "agent": agent_base}
                        target = mesh_base_target
                        row = await measure(args, "mesh-base", concurrency, round_no, target, servers, [])
                    elif mode == "mesh-off":
                        servers = {"server": mesh_off, "agent": agent_off}
                        target = mesh_off_target
                        row = await measure(args, "mesh-off", concurrency, round_no, target, servers, [])
                    elif mode in variant_servers:
                        target, servers = variant_servers[mode]
                        row = await measure(args, mode, concurrency, round_no, target, servers, [])
                    elif mode == "relay":
                        servers = {"server": relay, "agent": relay_agent}
                        row = await measure(args, "relay", concurrency, round_no, relay_target, servers, [])
                    elif mode in ("direct", "hosted"):  # direct: no mesh server in the path
                        servers = {"agent": hosted_agent, **({"server": mesh} if mode == "hosted" else {})}
                        spied = None
                        if args.py_spy and round_no == 1 and mode == "hosted":
                            spied = {"server": tmp / f"py-spy-hosted-mesh-server-c{concurrency}.txt"}
                        row = await measure(
                            args, mode, concurrency, round_no, mesh_target, servers, [], spied
                        )
                    else:
                        profiled = [mesh, agent] if args.profile else []
                        servers = {"server": mesh, "agent": agent}
                        spied = None
                        if args.py_spy and round_no == 1:
                            spied = {
                                "server": tmp / f"py-spy-mesh-server-c{concurrency}.txt",
                                "agent": tmp / f"py-spy-agent-c{concurrency}.txt",
                            }
                        row = await measure(
                            args, "mesh", concurrency, round_no, mesh_target, servers, profiled, spied
                        )
                    rows.append(row)
                    rate = row.result["rate"]
                    print(
                        f"  measured {mode} c={concurrency} round {round_no}: {rate:.0f} msgs/s", flush=True
                    )
    finally:
        for child in reversed(children):
            await child.stop()

    print()
    _print_rows(rows)
    print()
    for concurrency in concurrencies:
        _print_two_hop_summary(rows, concurrency)
    for concurrency in concurrencies:
        _print_base(rows, concurrency)
    for concurrency in concurrencies:
        _print_observability(rows, concurrency)
        for variant in variants:
            _print_observability(rows, concurrency, f"mesh-{variant}")
        if args.observability and args.base:
            _print_observability(rows, concurrency, "mesh-base")
    if args.hosted:
        _hosted.print_hosted(rows, concurrencies, _median)
    if args.observability:
        print(f"OTLP sink: {len(_EXPORTS)} trace exports received, {sum(_EXPORTS)} bytes")
    if args.profile:
        _print_profile(mesh_prof, "mesh server process", args.top)
        _print_profile(agent_prof, "echo agent process", args.top)
    if args.py_spy:
        for concurrency in concurrencies:
            _print_py_spy(
                tmp / f"py-spy-mesh-server-c{concurrency}.txt", f"mesh server, c={concurrency}", args.top
            )
            _print_py_spy(tmp / f"py-spy-agent-c{concurrency}.txt", f"echo agent, c={concurrency}", args.top)
            if args.observability:
                spied = tmp / f"py-spy-mesh-server-c{concurrency}.txt"
                _print_otel_share(spied, f"mesh server, c={concurrency}")
    if args.py_spy and args.hosted:
        for concurrency in concurrencies:
            path = tmp / f"py-spy-hosted-mesh-server-c{concurrency}.txt"
            _print_py_spy(path, f"mesh server, hosted, c={concurrency}", args.top)
    if args.profile or args.py_spy:
        print(f"\n(profiles and temporary files in {tmp})")
    errors = sum(r.result["errors"] for r in rows)
    return 1 if errors else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="32", help="concurrent clients; a comma list runs each")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each point")
    parser.add_argument("--rounds", type=int, default=2, help="alternating bare/mesh rounds per concurrency")
    parser.add_argument(
        "--sessions", type=int, default=0, help="mesh sessions shared by the clients (0: one per client)"
    )
    parser.add_argument(
        "--relay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the bare two-hop relay (the mesh's shape, no logic) the mesh is judged against",
    )
    parser.add_argument(
        "--relay-updates", type=int, default=3, help="frames the relay agent answers each dispatch with"
    )
    parser.add_argument(
        "--observability",
        action="store_true",
        help="mesh with metrics and tracing on, beside mesh-off with both off",
    )
    parser.add_argument(
        "--trace-variants",
        default="",
        help="with --observability: also traced servers leaving out one part each, a comma list of "
        + ", ".join(TRACE_VARIANTS),
    )
    parser.add_argument(
        "--bare", action=argparse.BooleanOptionalAction, default=True, help="measure the bare echo"
    )
    parser.add_argument(
        "--hosted",
        action="store_true",
        help="also a hosted a2a-sdk JSON-RPC echo agent: called directly, and through the mesh",
    )
    parser.add_argument(
        "--base",
        default="",
        help="another checkout (with its own svantic_grpc and .venv): its mesh server and agent "
        "measured too, alternating with this one's (mesh-base), and the per-round ratios printed; "
        "with --observability, its traced mesh instead",
    )
    parser.add_argument("--payload", type=int, default=64, help="bare echo payload bytes")
    parser.add_argument("--profile", action="store_true", help="cProfile the mesh server and agent")
    parser.add_argument(
        "--py-spy", action="store_true", help="sample the mesh server and agent with py-spy (if installed)"
    )
    parser.add_argument("--native", action="store_true", help="with --py-spy: sample C frames too")
    parser.add_argument("--top", type=int, default=25, help="rows of each profile table")
    # Internal: how the parent starts its children.
    parser.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="bare", help=argparse.SUPPRESS)
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--metrics-off", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--otlp-endpoint", default="", help=argparse.SUPPRESS)
    parser.add_argument("--trace-variant", default="", help=argparse.SUPPRESS)
    parser.add_argument("--agent-url", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the event loop of every process (the mesh's event_loop setting; serve's default is uvloop)",
    )
    args = parser.parse_args()
    if args.role == "parent":
        if args.py_spy and not PY_SPY.exists():
            raise SystemExit(f"--py-spy: {PY_SPY} not found (pip install py-spy into this environment)")
        args.base = Path(args.base).resolve() if args.base else None
        os.environ[LOOP_ENV] = args.loop  # every process of the run: servers, agents, clients
        raise SystemExit(asyncio.run(parent(args, _revision())))
    logging.basicConfig(level=logging.ERROR)
    if args.max_seconds:
        watchdog(args.max_seconds)
    if args.role == "client":
        args.concurrency = int(args.concurrency)
    roles = {
        "bare-server": run_bare_server,
        "mesh-server": run_mesh_server,
        "agent": run_agent,
        "client": run_client,
        "relay-server": run_relay_server,
        "relay-agent": run_relay_agent,
        "hosted-agent": lambda _args: _hosted.run_hosted_agent(),
    }
    run_on_loop(roles[args.role](args))


if __name__ == "__main__":
    main()
