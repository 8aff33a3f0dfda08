"""The exporting child's OTLP requests: what a real OTLP/HTTP collector receives is, byte for byte,
what OpenTelemetry's own exporter makes of the same spans rebuilt as the SDK's ``ReadableSpan``s."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from svantic_grpc._span_export import ChildExporter, Encoder, Rebuilder
from svantic_grpc._spans import TupleTracerProvider
from tests.test_tracing import otlp_sink

REMOTE = SpanContext(
    0x4BF92F3577B34DA6A3CE929D0E0E4736,
    0x00F067AA0BA902B7,
    True,
    TraceFlags(1),
    TraceState([("vendor", "abc")]),
)


class _Recording(ChildExporter):
    """The real exporter and child, keeping a copy of each batch it hands over."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env)
        self.batches: list[tuple[list[tuple[int, str, Any]], list[tuple[Any, ...]]]] = []

    def send(self, new: list[tuple[int, str, Any]], spans: list[tuple[Any, ...]]) -> bool:
        self.batches.append((list(new), list(spans)))
        return super().send(new, spans)


def _spans_of_every_shape(provider: TupleTracerProvider) -> None:
    """Server and client spans, a remote and a local parent, a trace state, events with attributes,
    links, an error status with a description, an exception, attributes of each type."""
    from opentelemetry import trace

    tracer = provider.get_tracer("svantic_grpc")
    other = provider.get_tracer("other.scope", "1.2.3", "https://example.com/schema")
    remote = trace.set_span_in_context(trace.NonRecordingSpan(REMOTE))
    attributes: dict[str, Any] = {
        "rpc.system": "grpc",
        "flag": True,
        "count": 7,
        "big": 2**62,
        "ratio": 0.25,
        "names": ["a", "b"],
        "numbers": (1, 2, 3),
        "flags": [True, False],
        "empty": "",
    }
    with tracer.start_as_current_span("server", remote, SpanKind.SERVER, attributes) as server:
        server.add_event("started", {"step": 1, "what": "x"})
        server.add_event("plain")
        with tracer.start_as_current_span(
            "dispatch echo", kind=SpanKind.CLIENT, links=[Link(REMOTE, {"k": "v"})]
        ):
            pass
        inner = other.start_span("inner", kind=SpanKind.INTERNAL, links=[Link(server.get_span_context())])
        inner.set_status(Status(StatusCode.ERROR, "it broke"))
        inner.end()
        try:
            with tracer.start_as_current_span("failing", kind=SpanKind.PRODUCER):
                raise ValueError("no")
        except ValueError:
            pass
        ok = tracer.start_span("ok", kind=SpanKind.CONSUMER)
        ok.set_status(StatusCode.OK)
        ok.end()
    tracer.start_span("a new trace").end()


def test_the_collector_receives_what_opentelemetrys_exporter_makes_of_the_same_spans() -> None:
    with otlp_sink() as (endpoint, bodies):
        exporter = _Recording({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{endpoint}/v1/traces"})
        provider = TupleTracerProvider(
            Resource.create({"service.name": "mesh-under-test"}, "https://example.com/r"), {}, exporter
        )
        _spans_of_every_shape(provider)
        provider.force_flush()
        _spans_of_every_shape(provider)  # a second batch: resources and scopes already known
        provider.shutdown()  # the child exports what it has, then ends
    rebuilder = Rebuilder()
    expected = [
        encode_spans(rebuilder.spans(new, spans)).SerializePartialToString()
        for new, spans in exporter.batches
    ]
    assert len(expected) == 2 and bodies == expected
    received = [ExportTraceServiceRequest.FromString(body) for body in bodies]
    names = [s.name for r in received for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert sorted(names) == sorted(["server", "dispatch echo", "inner", "failing", "ok", "a new trace"] * 2)


def test_spans_of_the_sdk_handed_to_the_exporter_are_encoded_as_its_own_exporter_encodes_them() -> None:
    # ChildExporter is also a SpanExporter for the SDK's span processors: its spans flattened, then
    # encoded by the child, are the request the SDK's exporter would have made of them.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "sdk"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("sdk.scope", "0.1")
    with tracer.start_as_current_span("outer", attributes={"a": 1, "b": [1.5, 2.5]}) as outer:
        outer.add_event("e", {"x": "y"})
        with tracer.start_as_current_span("inner", links=[Link(REMOTE)]):
            pass
    spans = memory.get_finished_spans()

    class Kept(ChildExporter):
        def _send(self, new: list[tuple[int, str, Any]], flat: list[tuple[Any, ...]]) -> bool:
            self.kept = (new, flat)
            return True

    kept = Kept()
    kept.export(spans)
    assert (
        Encoder().request(*kept.kept).SerializePartialToString()
        == encode_spans(spans).SerializePartialToString()
    )


def test_a_value_the_exporter_cannot_encode_is_left_out_as_it_leaves_it_out() -> None:
    spans = [
        (
            "odd",
            1,
            2,
            1,
            "",
            None,
            0,
            1,
            2,
            {"ok": "yes", "odd": {1, 2}},
            None,
            None,
            0,
            None,
            0,
            0,
            (0, 0, 0),
        )
    ]
    new = [(0, "resource", ({"service.name": "s"}, "")), (0, "scope", ("t", None, None, {}))]
    request = Encoder().request(new, spans)
    assert (
        request.SerializePartialToString()
        == encode_spans(Rebuilder().spans(new, spans)).SerializePartialToString()
    )
    [span] = request.resource_spans[0].scope_spans[0].spans
    assert [a.key for a in span.attributes] == ["ok"]


@pytest.mark.parametrize("tuple_layout", [True, False])
def test_span_contexts_and_exported_spans_are_the_same_whichever_way_the_context_is_read(
    monkeypatch: pytest.MonkeyPatch, tuple_layout: bool
) -> None:
    # The provider reads and makes SpanContext as the tuple it is; were its layout ever to change,
    # it reads the properties instead: the same spans either way.
    from opentelemetry import trace

    from svantic_grpc import _spans, _w3c

    monkeypatch.setattr(_spans, "_TUPLE_LAYOUT", tuple_layout)
    monkeypatch.setattr(_w3c, "TUPLE_LAYOUT", tuple_layout)
    exporter = _Recording({})
    exporter.send = lambda new, spans: exporter.batches.append((new, spans)) or True  # type: ignore[method-assign]
    provider = TupleTracerProvider(Resource.create({}), {}, exporter)
    tracer = provider.get_tracer("t")
    remote = trace.set_span_in_context(trace.NonRecordingSpan(REMOTE))
    with (
        tracer.start_as_current_span("parent", remote) as parent,
        tracer.start_as_current_span("child") as child,
    ):
        pass
    provider.force_flush()
    p, c = parent.get_span_context(), child.get_span_context()
    assert c == SpanContext(p.trace_id, c.span_id, False, p.trace_flags, p.trace_state)
    assert p.trace_id == REMOTE.trace_id and p.trace_state == REMOTE.trace_state and c.is_valid
    [(_, spans)] = exporter.batches
    assert [(s[0], s[1], s[2], s[4], s[5]) for s in spans] == [
        ("child", p.trace_id, c.span_id, "vendor=abc", (p.span_id, False)),
        ("parent", p.trace_id, p.span_id, "vendor=abc", (REMOTE.span_id, True)),
    ]


def test_a_value_marshal_cannot_carry_goes_all_the_same() -> None:
    # Batches go to the child marshalled; one holding a value of a type marshal does not carry (an
    # int enum here) goes pickled, and the collector receives both as OpenTelemetry encodes them.
    from http import HTTPStatus

    from svantic_grpc._span_export import _MARSHALLED, _PICKLED, _encoded_batch

    with otlp_sink() as (endpoint, bodies):
        exporter = _Recording({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{endpoint}/v1/traces"})
        provider = TupleTracerProvider(Resource.create({"service.name": "mesh-under-test"}), {}, exporter)
        tracer = provider.get_tracer("t")
        tracer.start_span("plain", attributes={"code": 200}).end()
        provider.force_flush()
        tracer.start_span("enum", attributes={"code": HTTPStatus.OK}).end()
        provider.shutdown()
    assert [_encoded_batch(new, spans)[:1] for new, spans in exporter.batches] == [_MARSHALLED, _PICKLED]
    rebuilder = Rebuilder()
    expected = [
        encode_spans(rebuilder.spans(new, spans)).SerializePartialToString()
        for new, spans in exporter.batches
    ]
    assert len(expected) == 2 and bodies == expected
