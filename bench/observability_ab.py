"""What metrics and tracing cost the mesh per message, measured as CPU in one process.

Run from the repository root::

    .venv/bin/python bench/observability_ab.py                 # ~1 minute
    .venv/bin/python bench/observability_ab.py --rounds 15 --messages 1000

``bench/message_roundtrip.py --observability`` gives the throughput ratio the issue asks for,
but on a shared 2-core machine each of its rounds moves by more than tracing costs. This puts
everything of one message in one process and one event loop (the client, a ``MeshServer`` with
its in-memory store, and the connected echo agent of ``examples/echo_agent.py``), one such
trio per variant, and runs the variants' rounds alternately; the figure is the process's CPU
time (all its threads) per message, so the difference between two variants is what the second
one's server (and agent) does more. Variants:

* **off**: metrics off, no tracing (``svantic-grpc serve`` without ``OTEL_*``);
* **metrics**: metrics on, no tracing;
* **traced**: metrics on and tracing as the server does it when ``OTEL_*`` asks
  (``provider_from_env``: its own spans, OTLP/HTTP from a child process to a sink); the child's
  CPU is not in this process and is printed beside it;
* **traced-nochild**, **traced-noheaders**, **traced-nodispatch** (only when named): as traced, the
  batches handed to nothing (no child); then also no trace headers to the agent; then no dispatch span;
* **traced-sdk**: metrics on, the SDK's ``TracerProvider`` with its ``BatchSpanProcessor`` and
  OTLP/HTTP exporter in this process (how the server traced before);
* **traced-base** (with ``--base PATH``, e.g. ``/work/wt/base``): as traced, but the exporting child
  is the one of the checkout at PATH (its ``svantic_grpc._span_export``, run by its ``.venv``'s
  Python, or this one's when it has none): the child's CPU per message before and after a change to
  it, in the same run. The server's side is this checkout's for both.

Every span is sampled. ``--concurrency`` calls are in flight per variant while it runs.

``--instructions`` counts instead the instructions the **server alone** executes per message
(valgrind's callgrind; all its threads, grpc's included; not the exporting child), each variant's
server in a process of its own under callgrind, the client and the agent in this one: unlike CPU
time, the count does not move with other work on the machine, so a change of a few µs shows (runs
of one code differ by ~1% all the same: how many event-loop turns a message takes varies). With
``--base PATH`` each variant's server of that checkout runs too (``--keep DIR`` keeps the files)::

    .venv/bin/python bench/observability_ab.py --instructions --messages 300 --concurrency 4 \\
        --base /work/wt/base
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))
if os.environ.get("SVANTIC_AB_CODE"):  # a --serve child of --instructions --base: that checkout's mesh
    sys.path.insert(0, os.environ["SVANTIC_AB_CODE"])

from echo_agent import make_agent  # noqa: E402
from grpc import aio  # noqa: E402
from message_roundtrip import _mesh_calls  # noqa: E402
from tracing_floor import SINK  # noqa: E402

from svantic_grpc.config import parse_settings  # noqa: E402
from svantic_grpc.core.tracing import NO_TRACING  # noqa: E402
from svantic_grpc.server import MeshServer  # noqa: E402
from svantic_grpc.tracing import OtelTracing, provider_from_env  # noqa: E402

VARIANTS = ("off", "metrics", "traced", "traced-sdk")
MORE = ("traced-nochild", "traced-noheaders", "traced-nodispatch", "traced-notcurrent", "traced-onlycurrent")
"""Not run unless named in ``--variants``: as traced-nochild (the server's own spans handed to nothing,
no child), then without the trace headers to the agent (its ``propagate.extract`` and ``attach``), then
without the dispatch span (only the RPC's); the dispatch span made but not current; a context made current
during the dispatch but no span recorded."""


def _provider(variant: str, endpoint: str, base: Path | None = None) -> Any:
    if variant == "traced":
        return provider_from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint})
    if variant == "traced-base":
        from opentelemetry.sdk.resources import Resource

        from svantic_grpc._span_export import ChildExporter
        from svantic_grpc._spans import TupleTracerProvider

        assert base is not None, "traced-base needs --base"
        env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint}
        # Its package first on the path: ``-m`` would put the current directory (this checkout) first.
        run = f"import sys; sys.path.insert(0, {str(base)!r}); from svantic_grpc import _span_export as e"
        run += "; e.child_main()"
        venv = base / ".venv" / "bin" / "python"  # its own, else this one's (its code first on the path)
        exporter = ChildExporter(env, command=[str(venv if venv.exists() else sys.executable), "-c", run])
        return TupleTracerProvider(Resource.create({"service.name": "svantic-grpc"}), env, exporter)
    if variant in MORE:
        from opentelemetry.sdk.resources import Resource

        from svantic_grpc._span_export import ChildExporter
        from svantic_grpc._spans import TupleTracerProvider

        class Nowhere(ChildExporter):
            def send(self, new: Any, spans: Any) -> bool:
                return True

        return TupleTracerProvider(Resource.create({"service.name": "svantic-grpc"}), {}, Nowhere())
    if variant == "traced-sdk":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": "svantic-grpc"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        return provider
    return None


class _NoHeaders(OtelTracing):
    """The dispatch span, without the W3C headers for the agent."""

    def dispatch(self, *, agent_type: str, instance_id: str) -> Any:
        @contextlib.contextmanager
        def span() -> Iterator[dict[str, str]]:
            with super(_NoHeaders, self).dispatch(agent_type=agent_type, instance_id=instance_id):
                yield {}

        return span()


class _NotCurrent(OtelTracing):
    """The dispatch span started and ended, never current, no headers."""

    def dispatch(self, *, agent_type: str, instance_id: str) -> Any:
        @contextlib.contextmanager
        def span() -> Iterator[dict[str, str]]:
            made = self._tracer.start_span(
                f"dispatch {agent_type}", attributes={"svantic.agent_type": agent_type}
            )
            try:
                yield {}
            finally:
                made.end()

        return span()


class _OnlyCurrent(OtelTracing):
    """A valid span context current during the dispatch, nothing recorded, no headers."""

    def dispatch(self, *, agent_type: str, instance_id: str) -> Any:
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        @contextlib.contextmanager
        def current() -> Iterator[dict[str, str]]:
            parent = trace.get_current_span().get_span_context()
            made = NonRecordingSpan(SpanContext(parent.trace_id, 12345, False, TraceFlags(1)))
            token = otel_context.attach(trace.set_span_in_context(made))
            try:
                yield {}
            finally:
                otel_context.detach(token)

        return current()


def _settings(variant: str) -> Any:
    return parse_settings(
        {
            "grpc_address": "127.0.0.1:0",
            "http_address": "127.0.0.1:0",
            "session_ttl_ms": 0,
            "shutdown_grace_s": 0,
            "store": "memory",
            "log_level": "WARNING",
            "dispatch": {"max_dispatches_per_session": 0},
            "metrics": {"enabled": variant != "off"},
        }
    )


def _child_cpu(provider: Any) -> float:
    """CPU seconds of ``provider``'s exporting child process so far (0 without one)."""
    pid = getattr(getattr(provider, "_exporter", None), "pid", None)
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace, endpoint: str) -> None:
    os.environ["OTEL_TRACES_SAMPLER"] = "always_on"
    trios: dict[str, tuple[MeshServer, Any, Any, list[Any]]] = {}
    for variant in args.variants:
        provider = _provider(variant, endpoint, args.base)
        server = MeshServer(_settings(variant), env={}, tracer_provider=provider)
        if variant == "traced-nodispatch":
            server.mesh.dispatches._tracing = NO_TRACING
        elif variant == "traced-noheaders":
            server.mesh.dispatches._tracing = _NoHeaders(provider.get_tracer("svantic_grpc"))
        elif variant == "traced-notcurrent":
            server.mesh.dispatches._tracing = _NotCurrent(provider.get_tracer("svantic_grpc"))
        elif variant == "traced-onlycurrent":
            server.mesh.dispatches._tracing = _OnlyCurrent(provider.get_tracer("svantic_grpc"))
        await server.start()
        agent = make_agent(server.target, f"echo-{variant}")
        agent_task = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.connected.wait(), 30)
        channel = aio.insecure_channel(server.target)
        calls = await _mesh_calls(channel, args.concurrency, args.concurrency)
        trios[variant] = (server, agent, (agent_task, channel, provider), calls)

    async def round_of(variant: str, count: int) -> tuple[float, float]:
        calls = trios[variant][3]
        left = count

        async def worker(call: Any) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await call()

        provider = trios[variant][2][2]
        child_before = _child_cpu(provider)
        began = time.process_time()
        await asyncio.gather(*(worker(c) for c in calls))
        if provider is not None:
            provider.force_flush()  # the spans of these messages are handed over (or exported) now
        spent = (time.process_time() - began) / count * 1e3
        # The child exports what it was handed in the background: what it has not done by now is
        # counted in the variant's next round (the mean over rounds is its cost).
        return spent, (_child_cpu(provider) - child_before) / count * 1e3

    for variant in args.variants:  # warm up
        await round_of(variant, min(args.messages, 300))
    cost: dict[str, list[float]] = {v: [] for v in args.variants}
    child: dict[str, list[float]] = {v: [] for v in args.variants}
    for round_no in range(args.rounds):
        order = list(args.variants)
        order = order[round_no % len(order) :] + order[: round_no % len(order)]
        for variant in order:
            here, there = await round_of(variant, args.messages)
            cost[variant].append(here)
            child[variant].append(there)
    for server, agent, (agent_task, channel, provider), _ in trios.values():
        await channel.close()
        await agent.stop()
        agent_task.cancel()
        await server.stop(0)
        if provider is not None:
            provider.shutdown()

    base = statistics.median(cost["off"]) if "off" in cost else float("nan")
    print(
        f"{args.rounds} rounds of {args.messages} messages per variant, alternating,"
        f" {args.concurrency} in flight;"
        f" load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(
        "CPU ms per message of client + mesh server + agent in one process (all its threads): median and"
        " lowest round (the least disturbed by other work on the machine), each against off's; child: the"
        " exporting child process's CPU per message, in its own process (mean: /proc counts 10 ms ticks)"
    )
    low = min(cost["off"]) if "off" in cost else float("nan")
    print(f"{'variant':<12}{'median':>8}{'vs off':>9}{'lowest':>8}{'vs off':>9}{'child':>8}   rounds")
    for variant, values in cost.items():
        median = statistics.median(values)
        print(
            f"{variant:<12}{median:>8.3f}{median - base:>+9.3f}{min(values):>8.3f}{min(values) - low:>+9.3f}"
            f"{statistics.fmean(child[variant]):>8.3f}   " + ", ".join(f"{v:.2f}" for v in values)
        )


async def serve(variant: str, endpoint: str) -> None:
    """``--serve``: one variant's server alone (under callgrind for ``--instructions``) until stdin closes."""
    os.environ["OTEL_TRACES_SAMPLER"] = "always_on"
    provider = _provider(variant, endpoint)
    server = MeshServer(_settings(variant), env={}, tracer_provider=provider)
    await server.start()
    print(server.target, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)
    if provider is not None:
        provider.shutdown()


async def _server_instructions(
    args: argparse.Namespace, variant: str, endpoint: str, out: Path, code: Path | None
) -> float:
    """One variant's server under callgrind, of this checkout or of ``code``: its instructions per
    message (callgrind's files in ``out``)."""
    name = variant if code is None else f"{variant}-base"
    server = await asyncio.create_subprocess_exec(
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out / name}.%p",
        sys.executable,
        str(SCRIPT),
        "--serve",
        variant,
        "--endpoint",
        endpoint,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "SVANTIC_AB_CODE": str(code or "")},
    )
    assert server.stdout is not None and server.stdin is not None
    target = (await asyncio.wait_for(server.stdout.readline(), 1800)).decode().strip()  # slow under load
    agent = make_agent(target, f"echo-{variant}")
    agent_task = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.connected.wait(), 300)
    channel = aio.insecure_channel(target)
    calls = await _mesh_calls(channel, args.concurrency, args.concurrency)

    async def send(count: int) -> None:
        left = count

        async def worker(call: Any) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await call()

        await asyncio.gather(*(worker(c) for c in calls))

    def control(flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(server.pid)], stdout=subprocess.DEVNULL, check=True)

    await send(100)  # warm-up
    await asyncio.to_thread(control, "--zero")
    await send(args.messages)
    await asyncio.to_thread(control, "--dump")
    await channel.close()
    await agent.stop()
    agent_task.cancel()
    server.stdin.close()
    await asyncio.wait_for(server.wait(), 300)
    dump = out / f"{name}.{server.pid}.1"  # the one made by --dump
    total = re.search(r"^summary: (\d+)", dump.read_text(), re.MULTILINE)
    assert total is not None, f"no summary in {dump}"
    return int(total[1]) / args.messages


async def instructions(args: argparse.Namespace, endpoint: str) -> None:
    """``--instructions``: each variant's server in its own process under callgrind; its instructions
    per message over ``--messages`` messages sent after a warm-up (the counters zeroed, then dumped).
    With ``--base``, each variant's server of that checkout too (its code first on the path)."""
    codes: dict[str, Path | None] = {"this": None, **({"base": args.base} if args.base else {})}
    counts: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        out = args.keep or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        for variant in args.variants:
            for checkout, code in codes.items():
                counts[(checkout, variant)] = await _server_instructions(args, variant, endpoint, out, code)
                print(f"{checkout} {variant}: {counts[(checkout, variant)]:,.0f}", flush=True)
    print(
        f"server instructions per message (callgrind, all its threads; {args.messages} messages after a"
        f" warm-up, {args.concurrency} in flight); load average"
        f" {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"{'checkout':<10}{'variant':<12}{'per message':>14}{'vs off':>10}")
    for (checkout, variant), count in counts.items():
        off = counts.get((checkout, "off"), float("nan"))
        print(f"{checkout:<10}{variant:<12}{count:>14,.0f}{count - off:>+10,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--messages", type=int, default=600, help="messages per variant per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="a checkout whose exporting child runs as traced-base (--instructions: whose servers run too)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instead: the server's instructions per message under valgrind's callgrind, per variant",
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="with --instructions: keep callgrind's files there"
    )
    parser.add_argument("--serve", default="", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.endpoint))
        return
    if args.instructions and args.variants == list(VARIANTS):
        args.variants = ["off", "metrics", "traced"]
    if args.base is not None and not args.instructions and "traced-base" not in args.variants:
        args.variants.append("traced-base")
    sink = subprocess.Popen([sys.executable, "-c", SINK, "sink"], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        endpoint = f"http://127.0.0.1:{sink.stdout.readline().strip()}/v1/traces"
        asyncio.run(instructions(args, endpoint) if args.instructions else run(args, endpoint))
    finally:
        sink.kill()
        sink.wait()


if __name__ == "__main__":
    main()
