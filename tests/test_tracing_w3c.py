"""The W3C trace context read from headers in fewer steps (``_w3c.extracted``) gives the context
OpenTelemetry's propagators give, for every header they read, valid or not."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from svantic_grpc import _w3c
from svantic_grpc._w3c import extracted
from svantic_grpc.pb import registry_service_pb2

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
CARRIERS = [
    {"traceparent": f"00-{TRACE}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-00"},
    {"traceparent": f"00-{TRACE}-{SPAN}-ff"},
    {"traceparent": f"  00-{TRACE}-{SPAN}-01 \t"},
    {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{'0' * 16}-01"},
    {"traceparent": f"ff-{TRACE}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01-extra"},
    {"traceparent": f"01-{TRACE}-{SPAN}-01-extra"},
    {"traceparent": f"00-{TRACE.upper()}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-1"},
    {"traceparent": f"00-{TRACE}-{SPAN}-0A"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01\n"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01-"},
    {"traceparent": f"00-{TRACE}0-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01" + " " * 600},
    {"traceparent": ""},
    {"traceparent": "garbage"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "vendor=x"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "baggage": "user=alice"},
    {"tracestate": "vendor=x"},
    {},
]


def seen(context: Context) -> dict[str, object]:
    """``context`` with its span as its span context (two spans of one context are not equal)."""
    return {key: v.get_span_context() if isinstance(v, Span) else v for key, v in context.items()}


@pytest.mark.parametrize("tuple_layout", [True, False])
@pytest.mark.parametrize("carrier", CARRIERS)
def test_the_context_is_the_propagators(
    monkeypatch: pytest.MonkeyPatch, carrier: dict[str, str], tuple_layout: bool
) -> None:
    # The span context is made as the tuple it is, or through SpanContext were its layout to change.
    monkeypatch.setattr(_w3c, "TUPLE_LAYOUT", tuple_layout)
    made, expected = extracted(carrier), propagate.extract(carrier)
    assert type(made) is type(expected) and seen(made) == seen(expected)


@pytest.fixture
def trace_context_only() -> Iterator[None]:
    default = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))
    yield
    propagate.set_global_textmap(default)


def test_another_propagator_configuration_is_asked_itself(trace_context_only: None) -> None:
    class Counting(TraceContextTextMapPropagator):
        calls = 0

        def extract(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
            Counting.calls += 1
            return super().extract(*args, **kwargs)  # type: ignore[arg-type]

    propagate.set_global_textmap(Counting())
    carrier = {"traceparent": f"00-{TRACE}-{SPAN}-01"}
    assert seen(extracted(carrier)) == seen(propagate.extract(carrier))
    assert Counting.calls == 2
    assert not _w3c._default_propagators()


@pytest.mark.parametrize("carrier", CARRIERS)
def test_a_dispatchs_trace_context_map_is_read_as_its_headers_are(carrier: dict[str, str]) -> None:
    # A connected agent reads the map of the Dispatch it receives as it is, without a copy.
    dispatch = registry_service_pb2.Dispatch()
    dispatch.trace_context.update(carrier)
    assert seen(extracted(dispatch.trace_context)) == seen(propagate.extract(carrier))
