"""The W3C trace context read from headers (``propagate.extract``), in fewer steps when it is a
lone ``traceparent`` and the propagators are OpenTelemetry's defaults; ``SpanContext`` read and
made as the tuple it is (its properties and its ``__new__``'s checks cost a call each).

Why: the default propagator reads ``traceparent`` with ``re.search(compiled, header)``, and
``re``'s cache lookup hashes the compiled pattern each time: with the composite propagator's
calls, ~48,000 instructions a header (valgrind), paid by the mesh for each call that carries a
``traceparent`` and by a connected agent for each dispatch of a traced mesh. The same pattern
is matched here directly, and the same ``Context`` made; any other carrier (a ``tracestate``,
baggage) or propagator configuration goes through ``propagate.extract`` as before.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from opentelemetry import propagate
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

__all__ = ["TUPLE_LAYOUT", "extracted", "span_context_fields"]


def _checked_layout() -> bool:
    """Whether ``SpanContext`` is the tuple (trace id, span id, remote, flags, state, valid) that
    is read and made directly here and in ``_spans``, as it has been so far."""
    flags = TraceFlags(TraceFlags.SAMPLED)
    made = tuple.__new__(SpanContext, (3, 5, True, flags, DEFAULT_TRACE_STATE, True))
    sample = SpanContext(3, 5, True, flags, None)
    fields = (sample.trace_id, sample.span_id, sample.is_remote, sample.trace_flags, sample.trace_state)
    return made == sample and tuple(sample) == (*fields, sample.is_valid)


TUPLE_LAYOUT = _checked_layout()


def span_context_fields(context: SpanContext) -> tuple[int, int, bool, TraceFlags, TraceState, bool]:
    """What ``context`` has, in the order of its tuple (the tuple itself when ``TUPLE_LAYOUT``)."""
    if TUPLE_LAYOUT:
        return context
    return (
        context.trace_id,
        context.span_id,
        context.is_remote,
        context.trace_flags,
        context.trace_state,
        context.is_valid,
    )


_PATTERN = TraceContextTextMapPropagator._TRACEPARENT_HEADER_FORMAT_RE
_MAXIMUM_LENGTH = TraceContextTextMapPropagator._TRACEPARENT_MAXIMUM_LENGTH
_NO_TRACE, _NO_SPAN = "0" * 32, "0" * 16
_USUAL = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
"""A version 00 header and nothing more, as the mesh and OpenTelemetry write it: where it matches,
the propagator's pattern (whitespace around, an optional tail, searched) matches with the same
trace id, span id and flags, version 00 and no tail."""

_defaults: list[TextMapPropagator] = []
"""The global propagator last found to be the default one (W3C trace context, then W3C baggage)."""


def extracted(carrier: Mapping[str, str]) -> Context:
    """``propagate.extract(carrier)``: the context ``carrier``'s W3C headers continue."""
    header = carrier.get("traceparent")
    if header is None or len(carrier) != 1 or not _default_propagators():
        return propagate.extract(carrier)
    # TraceContextTextMapPropagator.extract of a lone traceparent; W3CBaggagePropagator adds nothing.
    usual = _USUAL.fullmatch(header)
    if usual is not None:  # what the propagator's pattern matches in it, in a third of the time
        trace_id, span_id, flags = usual.groups()
        if trace_id == _NO_TRACE or span_id == _NO_SPAN:
            return Context()
    else:
        match = _PATTERN.search(header) if len(header) <= _MAXIMUM_LENGTH else None
        if match is None:
            return propagate.extract(carrier)  # (and its warning when too long)
        version, trace_id, span_id, flags, rest = match.groups()
        if trace_id == _NO_TRACE or span_id == _NO_SPAN or (version == "00" and rest) or version == "ff":
            return Context()
    if TUPLE_LAYOUT:  # valid: 32 and 16 hex digits, not all zero
        fields = (
            int(trace_id, 16),
            int(span_id, 16),
            True,
            TraceFlags(int(flags, 16)),
            DEFAULT_TRACE_STATE,
            True,
        )
        remote = tuple.__new__(SpanContext, fields)
    else:
        remote = SpanContext(int(trace_id, 16), int(span_id, 16), True, TraceFlags(int(flags, 16)), None)
    return Context({_SPAN_KEY: NonRecordingSpan(remote)})


def _default_propagators() -> bool:
    textmap = propagate.get_global_textmap()
    if _defaults and _defaults[0] is textmap:
        return True
    return _check(textmap)


def _check(textmap: TextMapPropagator) -> bool:
    chain = getattr(textmap, "_propagators", None)
    if (
        type(textmap) is CompositePropagator
        and isinstance(chain, list | tuple)
        and [type(p) for p in chain] == [TraceContextTextMapPropagator, W3CBaggagePropagator]
    ):
        _defaults[:] = [textmap]
        return True
    return False
