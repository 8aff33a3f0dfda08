"""Traces: OpenTelemetry spans for each gRPC call and HTTP request, each dispatch, each input
request and each resolution.

Off unless the standard environment asks for it: ``OTEL_TRACES_EXPORTER=otlp`` or an
OTLP endpoint (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``),
and not ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. Then the server
makes its own tracer provider (``_spans``: the API with the least work per span) whose spans
are exported in batches over OTLP/HTTP from a child process (``_span_export``: the OTLP
encoding and posting stay off the server's interpreter; the SDK's sampler and OTLP exporter
read the other ``OTEL_*`` variables themselves: headers, sampler, service name). Off, no span
is made and the interceptor does not wrap calls for tracing at all.

The W3C ``traceparent`` of an incoming gRPC call is the parent of its span; the span is
current while the call runs, so the dispatches it starts and the log lines it writes
belong to its trace, and the hosted agent gets the dispatch span's ``traceparent``. HTTP
requests (the A2A bindings, webhook callbacks, Slack) get the same from OpenTelemetry's ASGI
middleware (``http_middleware``). An input request's span runs from raise to end; the
resolution answering it is its child, linked to the call that carried the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.baggage import _BAGGAGE_KEY
from opentelemetry.context import Context
from opentelemetry.trace import (
    DEFAULT_TRACE_STATE,
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    StatusCode,
    Tracer,
    TracerProvider,
)

from svantic_grpc._spans import TupleTracerProvider, attach_span, current_context, detach
from svantic_grpc._w3c import span_context_fields
from svantic_grpc.core.tracing import Tracing

__all__ = [
    "OtelTracing",
    "dropped_spans_of",
    "http_middleware",
    "provider_from_env",
    "tracer_of",
    "traces_requested",
]

_OPEN_INPUTS = 10_000
"""Input request spans kept open at most; past it the oldest ends (as ``unknown``)."""

_UNTRACED_PATHS = (r"/healthz(\?|$)", r"/readyz(\?|$)", r"/metrics(\?|$)")
"""Probes and scrapes: no span each time a balancer or Prometheus calls."""


class OtelTracing(Tracing):
    """The core's spans as OpenTelemetry spans of ``tracer``."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._inputs: dict[str, Span] = {}
        """Spans of pending input requests raised in this process, by request id (oldest first)."""

    def dispatch(self, *, agent_type: str, instance_id: str) -> AbstractContextManager[Mapping[str, str]]:
        attributes = {"svantic.agent_type": agent_type, "svantic.instance_id": instance_id}
        return _Current(self._tracer.start_span(f"dispatch {agent_type}", None, SpanKind.CLIENT, attributes))

    def input_raised(self, *, request_id: str, kind: str, session_id: str) -> None:
        attributes = {
            "svantic.request_id": request_id,
            "svantic.input_kind": kind,
            "svantic.session_id": session_id,
        }
        self._inputs[request_id] = self._tracer.start_span(
            f"input {kind}", kind=SpanKind.INTERNAL, attributes=attributes
        )
        while len(self._inputs) > _OPEN_INPUTS:
            oldest = next(iter(self._inputs))
            self._inputs.pop(oldest).end()

    def input_ended(self, *, request_id: str, outcome: str, surface: str) -> None:
        span = self._inputs.pop(request_id, None)
        if span is not None:
            span.set_attributes({"svantic.outcome": outcome, "svantic.surface": surface})
            span.end()

    @contextmanager
    def resolution(self, *, request_id: str, surface: str) -> Iterator[None]:
        carrier = trace.get_current_span().get_span_context()
        links = [Link(carrier)] if carrier.is_valid else []
        raised = self._inputs.get(request_id)
        parent = trace.set_span_in_context(raised) if raised is not None else None
        attributes = {"svantic.request_id": request_id, "svantic.surface": surface}
        with self._tracer.start_as_current_span(
            f"resolve {surface}", context=parent, kind=SpanKind.INTERNAL, links=links, attributes=attributes
        ):
            yield


class _Current(AbstractContextManager[Mapping[str, str]]):
    """``span`` current inside, ended on exit (an exception recorded, as ``use_span`` does); yields
    the W3C headers that continue its trace.

    What ``start_as_current_span`` and ``propagate.inject`` do, without their generator context
    managers and propagator lookups: this runs once per dispatch.
    """

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span

    def __enter__(self) -> Mapping[str, str]:
        span = self._span
        self._token = attach_span(span)
        return w3c_headers(span.get_span_context())

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        span = self._span
        if error is not None and isinstance(error, Exception) and span.is_recording():
            span.record_exception(error)
            span.set_status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
        span.end()
        detach(self._token)


def w3c_headers(span_context: SpanContext, current: Context | None = None) -> dict[str, str]:
    """The W3C ``traceparent`` (and ``tracestate``) continuing ``span_context``, formatted as
    OpenTelemetry's ``TraceContextTextMapPropagator`` does; with baggage in the ``current`` context
    (default: the current one), the global propagator's headers (which add it)."""
    # What baggage.get_all(current) reads, without its three calls.
    if (current_context() if current is None else current).get(_BAGGAGE_KEY):
        headers: dict[str, str] = {}
        propagate.inject(headers, context=trace.set_span_in_context(NonRecordingSpan(span_context)))
        return headers
    trace_id, span_id, _, flags, state, _ = span_context_fields(span_context)
    # The same text as f"00-{trace_id:032x}-..." in ~60% of its time: %-formatting parses no
    # format spec per field.
    headers = {"traceparent": "00-%032x-%016x-%02x" % (trace_id, span_id, flags)}  # noqa: UP031
    if state is not DEFAULT_TRACE_STATE and state:
        headers["tracestate"] = state.to_header()
    return headers


def http_middleware(app: Any, provider: TracerProvider) -> Any:
    """``app`` wrapped in OpenTelemetry's ASGI middleware: a server span per HTTP request, the
    caller's W3C ``traceparent`` its parent, current while the route runs (probes left out)."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.util.http import ExcludeList

    return OpenTelemetryMiddleware(
        app,
        excluded_urls=ExcludeList(_UNTRACED_PATHS),
        tracer_provider=provider,
        exclude_spans=["receive", "send"],
    )


def traces_requested(env: Mapping[str, str]) -> bool:
    """Whether ``env`` asks for traces (OTLP exporter or endpoint set, the SDK not disabled)."""
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporter == "none":
        return False
    return exporter == "otlp" or bool(endpoint)


def provider_from_env(env: Mapping[str, str]) -> TupleTracerProvider | None:
    """A provider exporting over OTLP (from a child process) when ``env`` asks for traces;
    ``None`` otherwise."""
    if not traces_requested(env):
        return None
    from opentelemetry.sdk.resources import Resource

    service = env.get("OTEL_SERVICE_NAME") or "svantic-grpc"
    return TupleTracerProvider(Resource.create({"service.name": service}), env)


def tracer_of(provider: TracerProvider | None) -> Tracer | None:
    return provider.get_tracer("svantic_grpc") if provider is not None else None


def dropped_spans_of(provider: TracerProvider | None) -> Callable[[], int] | None:
    """What reads how many spans ``provider`` dropped (its queue full, or its exporting child
    lagging or gone), for the metrics; ``None`` for a provider that does not say (the SDK's)."""
    if isinstance(provider, TupleTracerProvider):
        return lambda: provider.dropped
    return None
