"""What tracing costs the mesh per message at the least: the SDK's own price for the spans issue 14 requires.

Run from the repository root::

    .venv/bin/python bench/tracing_floor.py                 # ~30 s
    .venv/bin/python bench/tracing_floor.py --mesh-ms 1.10  # the mesh-off server's CPU per message

A message through the mesh makes two spans in the server: the ``SendMessage`` call's (the
interceptor's wrapper, ``api/_telemetry.py``) and its dispatch's (``OtelTracing.dispatch``,
which also gives the W3C headers for the agent). This runs exactly that code, once per
"message", around a handler that does nothing, in one process and one event loop, with:

* **metrics**: the wrapper with metrics on and tracing off (the baseline);
* **spans**: metrics and tracing on, the SDK's ``BatchSpanProcessor`` exporting to an exporter
  that drops the batch (what starting, ending and queueing the two spans cost);
* **spans + OTLP**: the same with the OTLP/HTTP exporter the server uses, posting to a sink in
  another process that discards the bytes (adds encoding and posting);
* **spans + child OTLP**: the SDK's spans, their batches handed to the OTLP/HTTP exporter in a
  child process (``svantic_grpc._span_export.ChildExporter``), which posts them to the sink; only
  this process's share is counted (flattening, pickling, the pipe);
* **own spans + child**: what the server does (``provider_from_env``): the API implemented with
  the least work per span (``svantic_grpc._spans``), finished spans queued as tuples and handed
  to the same child;
* **before**: the code this replaced (``start_as_current_span`` twice, ``propagate.extract`` and
  ``propagate.inject``, ``set_attribute`` of the status) with the OTLP exporter, for comparison.

``--instructions`` counts instead the instructions one message of the metrics-only wrapper and of
the server's own spans take (their batches handed to nothing), under valgrind's callgrind, with
``--base PATH`` also for that checkout's code: a before/after figure that other work on a shared
machine does not move.

``--child`` measures the exporting child instead: its CPU per span to turn a batch read from the
pipe into the OTLP request's bytes, the spans rebuilt and encoded by the exporter's
``encode_spans`` (before) against ``_span_export.Encoder`` (now).

The variants alternate over ``--rounds`` rounds of ``--messages`` messages each; the figure is
the median of the process's CPU time (all threads: the export thread's encoding included) per
message, the batch processor flushed at the end of each round. With ``--mesh-ms``, the mesh
server's CPU per message with metrics and tracing off, it prints the best throughput ratio
tracing allows when the server is the bottleneck and costs add up linearly:
``mesh / (mesh + spans-and-OTLP cost)``. On a busy machine the measured ratio is lower: a slower
server batches less and each message costs it more.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("SVANTIC_FLOOR_ROOT") or Path(__file__).resolve().parents[1])
"""The checkout whose code is measured (``--instructions --base`` runs this script against another)."""
sys.path.insert(0, str(ROOT))

from opentelemetry import propagate  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402
from opentelemetry.trace import SpanKind, Tracer  # noqa: E402

from svantic_grpc._span_export import ChildExporter  # noqa: E402
from svantic_grpc._spans import TupleTracerProvider  # noqa: E402
from svantic_grpc.api._telemetry import observed_unary  # noqa: E402
from svantic_grpc.metrics import PrometheusMetrics  # noqa: E402
from svantic_grpc.tracing import OtelTracing  # noqa: E402

METHOD = "/svantic.v1.MessageService/SendMessage"
SINK = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *args): pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class _Context:
    """What the wrapper reads of a ``grpc.aio`` servicer context: metadata and the status code."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer x"), ("user-agent", "grpc-python-asyncio/1.85"))

    def code(self) -> None:
        return None


class _Drop(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


Message = Callable[[], Awaitable[None]]


def _mesh_message(tracer: Tracer | None, observe: Any) -> Message:
    """The interceptor's wrapper around a handler that opens the dispatch span, as the mesh does."""
    tracing = OtelTracing(tracer) if tracer is not None else None
    context = _Context()

    async def handler(request: Any, context: Any, metadata: Any = None) -> Any:
        if tracing is not None:
            with tracing.dispatch(agent_type="echo", instance_id="echo-bench-1") as headers:
                assert headers["traceparent"]
        return request

    wrapped = observed_unary(handler, METHOD, observe, tracer)

    async def message() -> None:
        await wrapped(b"", context)

    return message


def _before(tracer: Tracer, observe: Any) -> Message:
    """The code this replaced: generator context managers, the global propagators, set_attribute."""
    context = _Context()
    attributes = {
        "rpc.system": "grpc",
        "rpc.service": "svantic.v1.MessageService",
        "rpc.method": "SendMessage",
    }

    async def message() -> None:
        began = time.perf_counter()
        carrier = {k: v for k, v in context.invocation_metadata() if k[:5] == "trace"}
        with tracer.start_as_current_span(
            METHOD, context=propagate.extract(carrier), kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            dispatch = {"svantic.agent_type": "echo", "svantic.instance_id": "echo-bench-1"}
            with tracer.start_as_current_span("dispatch echo", kind=SpanKind.CLIENT, attributes=dispatch):
                headers: dict[str, str] = {}
                propagate.inject(headers)
            span.set_attribute("rpc.grpc.status_code", "OK")
        observe(METHOD, "OK", time.perf_counter() - began)

    return message


def _provider(exporter: SpanExporter) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "svantic-grpc"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


Provider = TracerProvider | TupleTracerProvider


async def _round(message: Message, provider: Provider | None, count: int) -> float:
    began = time.process_time()
    for _ in range(count):
        await message()
    if provider is not None:
        provider.force_flush()  # the batch's encoding and posting belong to these messages
    return (time.process_time() - began) / count * 1e6


async def run(args: argparse.Namespace, endpoint: str) -> None:
    observe = PrometheusMetrics().rpc_done
    dropped, otlp, before, child = (
        _provider(_Drop()),
        _provider(OTLPSpanExporter(endpoint=endpoint)),
        _provider(OTLPSpanExporter(endpoint=endpoint)),
        _provider(ChildExporter({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint})),
    )
    own = TupleTracerProvider(
        Resource.create({"service.name": "svantic-grpc"}), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint}
    )
    variants: dict[str, tuple[Message, Provider | None]] = {
        "metrics": (_mesh_message(None, observe), None),
        "spans": (_mesh_message(dropped.get_tracer("svantic_grpc"), observe), dropped),
        "spans + OTLP": (_mesh_message(otlp.get_tracer("svantic_grpc"), observe), otlp),
        "before + OTLP": (_before(before.get_tracer("svantic_grpc"), observe), before),
        "spans + child OTLP": (_mesh_message(child.get_tracer("svantic_grpc"), observe), child),
        "own spans + child": (_mesh_message(own.get_tracer("svantic_grpc"), observe), own),
    }
    for message, provider in variants.values():  # warm up
        await _round(message, provider, min(args.messages, 500))
    cost: dict[str, list[float]] = {name: [] for name in variants}
    for round_no in range(args.rounds):
        names = list(variants)
        names = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in names:
            message, provider = variants[name]
            cost[name].append(await _round(message, provider, args.messages))
    for provider in (dropped, otlp, before, child, own):
        provider.shutdown()
    median = {name: statistics.median(values) for name, values in cost.items()}
    base = median["metrics"]
    print(f"{args.rounds} rounds of {args.messages} messages, alternating; CPU µs per message (all threads)")
    print(f"{'variant':<19}{'median':>9}{'tracing adds':>14}   rounds")
    for name, values in cost.items():
        added = median[name] - base
        each = ", ".join(f"{v:.0f}" for v in values)
        print(f"{name:<19}{median[name]:>9.1f}{added if name != 'metrics' else 0:>14.1f}   {each}")
    floor = (median["spans + OTLP"] - base) / 1000
    in_child = (median["own spans + child"] - base) / 1000
    print(
        f"\ntracing's floor: {floor * 1000:.0f} µs of CPU per message (two spans, OTLP encoding and posting"
        f" here), {in_child * 1000:.0f} µs as the server runs now (own spans, OTLP in a child process)"
    )
    if args.mesh_ms:
        best = args.mesh_ms / (args.mesh_ms + floor)
        print(
            f"against the mesh-off server's {args.mesh_ms:.2f} ms per message: best throughput ratio"
            f" with tracing on {best:.2f}x (server-bound, costs adding up linearly);"
            f" {args.mesh_ms / (args.mesh_ms + in_child):.2f}x as the server runs now"
        )


def child_encoding(args: argparse.Namespace) -> None:
    """``--child``: the exporting child's CPU per span to turn a batch from the pipe into the OTLP
    request's bytes: the SDK's spans rebuilt and encoded by the exporter's ``encode_spans`` (before)
    against ``Encoder`` (now), alternated; the post itself is the same for both and left out."""
    import pickle

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from svantic_grpc._span_export import Encoder, Rebuilder

    class Kept(ChildExporter):
        def send(self, new: Any, spans: Any) -> bool:
            self.batches.append(pickle.dumps((new, spans), protocol=pickle.HIGHEST_PROTOCOL))
            return True

    kept = Kept()
    kept.batches = []
    own = TupleTracerProvider(Resource.create({"service.name": "svantic-grpc"}), {}, kept)
    message = _mesh_message(own.get_tracer("svantic_grpc"), None)

    async def messages() -> None:
        for _ in range(256):  # one batch of 512 spans, as the server hands them over
            await message()

    asyncio.run(messages())
    own.force_flush()
    body = kept.batches[0]
    count = len(pickle.loads(body)[1])

    def before() -> bytes:
        return encode_spans(Rebuilder().spans(*pickle.loads(body))).SerializePartialToString()

    def now() -> bytes:
        return Encoder().request(*pickle.loads(body)).SerializePartialToString()

    assert before() == now()
    cost: dict[str, list[float]] = {"rebuilt + encode_spans": [], "Encoder": []}
    for _ in range(args.rounds):
        for name, encode in zip(cost, (before, now), strict=True):
            began = time.process_time()
            for _ in range(10):
                encode()
            cost[name].append((time.process_time() - began) / (10 * count) * 1e6)
    print(f"{args.rounds} rounds of 10 batches of {count} spans (the server's two spans per message)")
    for name, values in cost.items():
        median = statistics.median(values)
        print(f"{name:<24}{median:>6.1f} µs per span, {2 * median:>6.1f} per message (CPU, median)")


def count_role(variant: str, messages: int) -> None:
    """Under callgrind: the message loop of ``variant`` (``metrics``, or ``own``: the server's own
    spans, their batches handed to nothing), counted from after a warm-up to its end."""

    class Nowhere(ChildExporter):
        def send(self, new: Any, spans: Any) -> bool:
            return True

    own = TupleTracerProvider(Resource.create({"service.name": "svantic-grpc"}), {}, Nowhere())
    tracer = own.get_tracer("svantic_grpc") if variant == "own" else None
    message = _mesh_message(tracer, PrometheusMetrics().rpc_done)

    def control(flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(os.getpid())], stdout=subprocess.DEVNULL, check=True)

    async def loop() -> None:
        for _ in range(300):
            await message()
        own.force_flush()
        control("--zero")
        for _ in range(messages):
            await message()
        own.force_flush()
        control("--dump")

    asyncio.run(loop())


def instructions(args: argparse.Namespace) -> None:
    """``--instructions``: the instructions (valgrind's callgrind) each variant's message takes, this
    checkout's and ``--base``'s: unlike CPU time, the count does not move with other work on the
    machine, so a change of a few percent shows."""
    checkouts = {"this": (ROOT, Path(sys.executable))}
    if args.base:
        # Its own venv if it has one, else this one's Python (its code first on the path: ROOT).
        venv = args.base / ".venv" / "bin" / "python"
        checkouts["base"] = (args.base, venv if venv.exists() else Path(sys.executable))
    counts: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (root, python) in checkouts.items():
            for variant in ("metrics", "own"):
                out = Path(tmp) / f"{name}-{variant}"
                subprocess.run(
                    [
                        "valgrind",
                        "--tool=callgrind",
                        f"--callgrind-out-file={out}.%p",
                        str(python),
                        str(Path(__file__).resolve()),
                        "--count-role",
                        variant,
                        "--messages",
                        str(args.messages),
                    ],
                    env={**os.environ, "SVANTIC_FLOOR_ROOT": str(root)},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=True,
                )
                [dump] = Path(tmp).glob(f"{name}-{variant}.*.1")  # the one made by --dump
                total = re.search(r"^summary: (\d+)", dump.read_text(), re.MULTILINE)
                assert total is not None, f"no summary in {dump}"
                counts[(name, variant)] = int(total[1]) / args.messages
    print(f"instructions per message (callgrind, {args.messages} messages after 300 of warm-up)")
    print(f"{'checkout':<10}{'metrics':>12}{'own spans':>12}{'tracing adds':>14}")
    for name, (root, _) in checkouts.items():
        metrics, own = counts[(name, "metrics")], counts[(name, "own")]
        print(f"{name:<10}{metrics:>12,.0f}{own:>12,.0f}{own - metrics:>14,.0f}   {root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 1,000 messages are 2,000 spans: within the batch processor's queue (2,048), so none is dropped
    # even when its export thread falls behind.
    parser.add_argument("--messages", type=int, default=1000, help="messages per variant per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--mesh-ms", type=float, default=0.0, help="mesh-off server CPU ms per message")
    parser.add_argument(
        "--child",
        action="store_true",
        help="instead: the exporting child's encoding per span, before and now",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instead: instructions per message under valgrind's callgrind (with --base: that checkout too)",
    )
    parser.add_argument("--base", type=Path, default=None, help="with --instructions: a checkout to compare")
    parser.add_argument("--count-role", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count_role:
        count_role(args.count_role, args.messages)
        return
    if args.instructions:
        instructions(args)
        return
    if args.child:
        child_encoding(args)
        return
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        asyncio.run(run(args, f"http://127.0.0.1:{sink.stdout.readline().strip()}/v1/traces"))
    finally:
        sink.kill()
        sink.wait()


if __name__ == "__main__":
    main()
