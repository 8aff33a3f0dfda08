"""Traces: OpenTelemetry spans for each gRPC call and each dispatch to a hosted agent.

Off unless the standard environment asks for it: ``OTEL_TRACES_EXPORTER=otlp`` or an
OTLP endpoint (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``),
and not ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. Then the server
makes its own ``TracerProvider`` exporting over OTLP/HTTP in batches (the exporter and
the SDK read the other ``OTEL_*`` variables themselves: headers, sampler, service
name). Off, no span is made and the interceptor does not wrap calls for tracing at all.

The W3C ``traceparent`` of an incoming gRPC call is the parent of its span; the span is
current while the call runs, so the dispatches it starts and the log lines it writes
belong to its trace, and the hosted agent gets the dispatch span's ``traceparent``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.trace import SpanKind, Tracer, TracerProvider

from svantic_grpc.core.tracing import Tracing

__all__ = ["OtelTracing", "provider_from_env", "tracer_of"]


class OtelTracing(Tracing):
    """The core's spans as OpenTelemetry spans of ``tracer``."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    @contextmanager
    def dispatch(self, *, agent_type: str, instance_id: str) -> Iterator[Mapping[str, str]]:
        attributes = {"svantic.agent_type": agent_type, "svantic.instance_id": instance_id}
        with self._tracer.start_as_current_span(
            f"dispatch {agent_type}", kind=SpanKind.CLIENT, attributes=attributes
        ):
            headers: dict[str, str] = {}
            propagate.inject(headers)
            yield headers


def provider_from_env(env: Mapping[str, str]) -> SdkTracerProvider | None:
    """A provider exporting over OTLP when ``env`` asks for traces; ``None`` otherwise."""
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporter == "none":
        return None
    if exporter != "otlp" and not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = env.get("OTEL_SERVICE_NAME") or "svantic-grpc"
    provider = SdkTracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def tracer_of(provider: TracerProvider | None) -> Tracer | None:
    return provider.get_tracer("svantic_grpc") if provider is not None else None
