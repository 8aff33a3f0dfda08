"""The server's own spans when it exports them (``OTEL_*`` asks): OpenTelemetry's tracing API
with the least work per span, each span's plain values (its record, a list filled from its start)
queued as it ends for the OTLP exporter in a child process (``_span_export``).

Why not the SDK's ``TracerProvider`` here: its span costs ~11 µs to start and ~4 µs to end
(attribute validation through abstract-class checks, locks, a ``ReadableSpan`` copy at the end,
processor fan-out), then the batch is flattened again for the child: ~80 µs of the server's CPU
per message for its two spans, where this takes ~20 (``bench/tracing_floor.py``). What the SDK
decides is kept: its sampler (``OTEL_TRACES_SAMPLER``) and id generator, built from the
environment as the SDK builds them, and the child encodes the OTLP request the SDK's exporter
would make of these spans and posts it with OpenTelemetry's own OTLP exporter. A provider passed
to the server (tests, an application's own SDK setup) is used as it is instead.

Batching is the SDK's: up to ``OTEL_BSP_MAX_QUEUE_SIZE`` spans wait (2,048; more are dropped
and counted), handed over in batches of ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` (512) by a thread
woken when a batch is full or every ``OTEL_BSP_SCHEDULE_DELAY`` ms (5,000).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar, Token
from itertools import repeat
from operator import call as _call
from random import getrandbits as _getrandbits
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.context import _RUNTIME_CONTEXT, Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, DEFAULT_ON, Decision, Sampler
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.span import DEFAULT_TRACE_STATE
from opentelemetry.util import types

from svantic_grpc._span_export import ChildExporter, _link
from svantic_grpc._w3c import TUPLE_LAYOUT as _TUPLE_LAYOUT
from svantic_grpc._w3c import span_context_fields as _fields

__all__ = ["TupleTracerProvider", "attach_span", "current_context", "detach"]

_log = logging.getLogger(__name__)

_time_ns = time.time_ns
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SAMPLED_RANDOM = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)


class TupleTracerProvider(trace_api.TracerProvider):
    """Tracers whose finished spans go, as plain values, to the OTLP exporter in a child process."""

    def __init__(
        self, resource: Resource, env: Mapping[str, str], exporter: ChildExporter | None = None
    ) -> None:
        """
        Args:
            resource: What the spans describe (``service.name``).
            env: ``OTEL_BSP_*`` settings, and the ``OTEL_*`` variables the exporting child gets.
            exporter: Where batches go (tests); default a ``ChildExporter`` of ``env``.
        """
        sdk = SdkTracerProvider(
            resource=resource, shutdown_on_exit=False
        )  # the sampler and id generator as the SDK reads them
        self._sampler: Sampler = sdk.sampler
        self._sample_all = self._sampler is ALWAYS_ON
        """Every span sampled, its parent's trace state kept: what ALWAYS_ON decides, without asking it."""
        self._sample_parented = self._sampler is DEFAULT_ON
        """The same for a root span or a sampled parent's child: what DEFAULT_ON decides."""
        self._ids = sdk.id_generator
        self._random = self._ids.is_trace_id_random()
        self._root_flags = _SAMPLED_RANDOM if self._random else _SAMPLED
        self._own_ids = type(self._ids) is RandomIdGenerator
        """Ids drawn here as the SDK's RandomIdGenerator draws them (valid by construction), without
        a call through it per id."""
        self._quick = self._own_ids and _TUPLE_LAYOUT and (self._sample_all or self._sample_parented)
        """Spans started in fewer steps (``_Tracer.start_span``): the usual setup."""
        if self._own_ids:
            self._new_trace_id: Callable[[], int] = _random_trace_id
            self._new_span_id: Callable[[], int] = _random_span_id
        else:
            self._new_trace_id = self._ids.generate_trace_id
            self._new_span_id = self._ids.generate_span_id
        self._exporter = exporter or ChildExporter(env)
        self._new: list[tuple[int, str, Any]] = [
            (0, "resource", (dict(resource.attributes), resource.schema_url))
        ]
        """Resources and scopes not sent to the child yet (taken by the export thread)."""
        self._scopes: dict[tuple[str, str | None, str | None], int] = {}
        self._queue: deque[list[Any]] = deque()
        """Finished spans' records (see ``_Tracer.start_span``), oldest first."""
        self._max_queue = _int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self._batch = _int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self._delay_s = _int(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self.dropped_spans = 0
        """Spans dropped because the queue was full (the child's own drops: ``exporter.dropped_spans``)."""
        self._warned = 0.0
        self._wake = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()
        self._exporting = threading.Lock()
        """Held while spans are taken from the queue (by the thread, a flush or the shutdown)."""
        self._thread = threading.Thread(target=self._work, name="svantic-span-export", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Spans never exported: the queue was full, or the child lagged or was gone."""
        return self.dropped_spans + self._exporter.dropped_spans

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> trace_api.Tracer:
        key = (instrumenting_module_name, instrumenting_library_version, schema_url)
        with self._lock:
            scope = self._scopes.get(key)
            if scope is None:
                scope = self._scopes[key] = len(self._scopes)
                self._new.append((scope, "scope", (*key, dict(attributes or {}))))
        return _Tracer(self, scope)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Hands every queued span to the child (waits up to ``timeout_millis`` for the pipe)."""
        self._export(everything=True)
        return self._exporter.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Hands over what is queued and stops the child (see ``ChildExporter.shutdown``)."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(5)
        self._export(everything=True)
        self._exporter.shutdown()

    def _dropped_one(self) -> None:
        """A finished span found the queue full: counted (and warned of, every 10 s at most)."""
        self.dropped_spans += 1
        if time.monotonic() - self._warned >= 10:
            self._warned = time.monotonic()
            _log.warning("span queue full: %d spans dropped so far", self.dropped_spans)

    def _work(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            try:
                self._export(everything=False)
            except Exception:  # the thread must outlive one bad batch
                _log.exception("span export failed")

    def _export(self, *, everything: bool) -> None:
        """Hands the queued spans over in batches: all of them, or while a full batch waits (and at
        least one batch, when the schedule delay woke the thread)."""
        first = True
        with self._exporting:
            while self._queue and (everything or first or len(self._queue) >= self._batch):
                first = False
                count = min(self._batch, len(self._queue))
                spans = list(map(_call, repeat(self._queue.popleft, count)))  # popped in C
                with self._lock:
                    new, self._new = self._new, []
                if not self._exporter.send(new, spans) and new:
                    with self._lock:  # the child never got them: send them with the next batch
                        self._new[:0] = new


class _Tracer(trace_api.Tracer):
    def __init__(self, provider: TupleTracerProvider, scope: int) -> None:
        self._provider = provider
        self._scope = scope

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace_api.Span:
        provider = self._provider
        # The parent: what get_current_span(context).get_span_context() reads, without its calls.
        span = (_get_current() if context is None else context).get(_SPAN_KEY)
        parent: SpanContext | None
        if type(span) is _Span:
            parent = span._context
        elif span is None:
            parent = None
        else:
            parent = span.get_span_context() if isinstance(span, trace_api.Span) else None
        # Every span of the mesh's usual setup in fewer steps (what _start does for it): ids drawn
        # here, the parent's SpanContext read as its tuple, the sampler's decision known without
        # asking it (ALWAYS_ON; DEFAULT_ON for a root or a sampled parent: sample, keep the parent's
        # trace state).
        quick = provider._quick
        if quick and (parent is None or not parent[5]):  # a root
            trace_id = _getrandbits(128) or _random_trace_id()
            flags, state, header, parent_ids = provider._root_flags, DEFAULT_TRACE_STATE, "", None
        elif quick and parent is not None and (parent[3] & 1 or provider._sample_all):
            trace_id, parent_id, remote, flags, state, _ = parent
            if not flags & 1:
                flags = TraceFlags(flags | TraceFlags.SAMPLED)
            header = "" if state is DEFAULT_TRACE_STATE or not state else state.to_header()
            parent_ids = (parent_id, remote)
        else:  # another setup, or a parent that did not sample: the sampler decides
            return self._start(
                name,
                context,
                parent,
                kind,
                attributes,
                links,
                start_time,
                record_exception,
                set_status_on_exception,
            )
        span_id = _getrandbits(64) or _random_span_id()
        # SpanContext(trace_id, span_id, False, flags, state) made as its tuple (a third of the cost):
        # the ids drawn here are in range and not zero.
        made = tuple.__new__(SpanContext, (trace_id, span_id, False, flags, state, True))
        # The span's record, as _record lays it out (inline here: this runs for every span).
        record = [
            name,
            trace_id,
            span_id,
            flags & 0xFF,
            header,
            parent_ids,
            kind._value_,
            start_time or _time_ns(),
            None,
            dict(attributes) if attributes else None,
            None,
            [_link(link) for link in links] if links else None,
            0,
            None,
            0,
            self._scope,
            _NONE_DROPPED,
        ]
        span = _new_span(_Span)  # its slots filled here: no __init__ frame for every span
        span._provider, span._context, span._record = provider, made, record
        span._record_exception, span._set_status_on_exception = record_exception, set_status_on_exception
        return span

    def _start(
        self,
        name: str,
        context: Context | None,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: types.Attributes,
        links: Sequence[Link] | None,
        start_time: int | None,
        record_exception: bool,
        set_status_on_exception: bool,
    ) -> trace_api.Span:
        """``start_span`` of a span whose parent context is ``parent``, for any sampler, id generator
        and ``SpanContext`` layout."""
        provider = self._provider
        # The context's tuple read directly, as _fields has it: its properties cost a call each.
        if parent is not None and (fields := parent if _TUPLE_LAYOUT else _fields(parent))[5]:
            trace_id, parent_id, remote, flags, state, _ = fields
            decided = provider._sample_all or (provider._sample_parented and flags & 1)
        else:
            parent, state, flags = None, None, provider._root_flags
            trace_id = provider._new_trace_id()
            decided = provider._sample_all or provider._sample_parented  # a root: sampled by both
        if decided:  # what these samplers decide, without asking them
            if not flags & 1:
                flags = TraceFlags(flags | TraceFlags.SAMPLED)
        else:
            result = provider._sampler.should_sample(context, trace_id, name, kind, attributes, links)
            state = result.trace_state
            if result.decision is not Decision.RECORD_AND_SAMPLE:
                # Not sampled: never exported (a span only recorded would not be either).
                flags = TraceFlags(flags & ~TraceFlags.SAMPLED)
                span_id = provider._ids.generate_span_id()
                return NonRecordingSpan(SpanContext(trace_id, span_id, False, flags, state))
            flags = TraceFlags(flags | TraceFlags.SAMPLED)
            if result.attributes:
                attributes = {**(attributes or {}), **result.attributes}
        if state is None:
            state = DEFAULT_TRACE_STATE
        span_id = provider._new_span_id()
        record = _record(
            name,
            trace_id,
            span_id,
            flags,
            "" if state is DEFAULT_TRACE_STATE or not state else state.to_header(),
            (parent_id, remote) if parent is not None else None,
            kind,
            start_time or _time_ns(),
            attributes,
            links,
            self._scope,
        )
        made = _span_context(trace_id, span_id, flags, state)
        return _Span(provider, made, record, record_exception, set_status_on_exception)

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace_api.Span]:
        span = self.start_span(
            name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
        )
        with trace_api.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


def _record(
    name: str,
    trace_id: int,
    span_id: int,
    flags: int,
    trace_state: str,
    parent: tuple[int, bool] | None,
    kind: SpanKind,
    start: int,
    attributes: types.Attributes,
    links: Sequence[Link] | None,
    scope: int,
) -> list[Any]:
    """A new span's record, as the exporting child reads it (``_span_export._flat``): filled at the
    start, its end time and what is set later written into it in place, queued as it is by ``end``."""
    return [
        name,
        trace_id,
        span_id,
        flags & 0xFF,  # a plain int (marshal carries no int subclass such as TraceFlags)
        trace_state,
        parent,  # (its span id, whether it is remote)
        kind._value_,  # an enum's value, without the call its ``value`` costs
        start,
        None,  # the end time: None while the span is open
        dict(attributes) if attributes else None,
        None,  # events
        [_link(link) for link in links] if links else None,
        0,  # status code: UNSET
        None,  # status description
        0,  # resource: the provider's only one
        scope,
        _NONE_DROPPED,
    ]


_new_span = object.__new__
"""Makes a ``_Span`` whose slots ``start_span`` then fills (``__init__``'s frame saved on every span)."""

_NONE_DROPPED = (0, 0, 0)
"""Attributes, events and links dropped: none (nothing here bounds them)."""

# A span's record, by position (_span_export._flat lays it out); the hot paths above and in end()
# write the literal positions.
_NAME, _KIND, _END, _ATTRIBUTES, _EVENTS, _LINKS, _CODE, _DESCRIPTION = 0, 6, 8, 9, 10, 11, 12, 13


class _Span(trace_api.Span):
    """A recording span: its record (what the OTLP export needs, in plain values) filled as it goes,
    queued as it is when the span ends."""

    __slots__ = ("_context", "_provider", "_record", "_record_exception", "_set_status_on_exception")

    def __init__(
        self,
        provider: TupleTracerProvider,
        context: SpanContext,
        record: list[Any],
        record_exception: bool,
        set_status_on_exception: bool,
    ) -> None:
        self._provider = provider
        self._context = context
        self._record = record
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception

    def end(self, end_time: int | None = None) -> None:
        record = self._record
        if record[8] is not None:  # ended already
            return
        record[8] = end_time or _time_ns()
        provider = self._provider
        queue = provider._queue
        if len(queue) >= provider._max_queue:
            provider._dropped_one()
            return
        queue.append(record)
        if len(queue) >= provider._batch and not provider._wake.is_set():
            provider._wake.set()

    def get_span_context(self) -> SpanContext:
        return self._context

    @property
    def kind(self) -> SpanKind:
        """As the SDK's span has it (OpenTelemetry's ASGI middleware reads it)."""
        return SpanKind(self._record[_KIND])

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        record = self._record
        if record[_END] is None:
            if record[_ATTRIBUTES] is None:
                record[_ATTRIBUTES] = {}
            record[_ATTRIBUTES].update(attributes)

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        self.set_attributes({key: value})

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        record = self._record
        if record[_END] is None:
            if record[_EVENTS] is None:
                record[_EVENTS] = []
            record[_EVENTS].append((name, timestamp or time.time_ns(), dict(attributes or {})))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        record = self._record
        if record[_END] is None and context.is_valid:
            if record[_LINKS] is None:
                record[_LINKS] = []
            record[_LINKS].append(_link(Link(context, attributes)))

    def update_name(self, name: str) -> None:
        if self._record[_END] is None:
            self._record[_NAME] = name

    def is_recording(self) -> bool:
        return self._record[_END] is None

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK: OK is final, UNSET changes nothing, a description goes with ERROR only.
        record = self._record
        if record[_END] is not None or record[_CODE] == StatusCode.OK._value_:
            return
        status = status if isinstance(status, Status) else Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            record[_CODE] = status.status_code._value_
            record[_DESCRIPTION] = status.description

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module, qualname = type(exception).__module__, type(exception).__qualname__
        recorded: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        self.add_event("exception", {**recorded, **(attributes or {})}, timestamp)

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        if error is not None and self.is_recording():
            if self._record_exception:
                self.record_exception(error, escaped=True)
            if self._set_status_on_exception:
                self.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        self.end()


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(env.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def _random_trace_id() -> int:
    trace_id = _getrandbits(128)
    while not trace_id:
        trace_id = _getrandbits(128)
    return trace_id


def _random_span_id() -> int:
    span_id = _getrandbits(64)
    while not span_id:
        span_id = _getrandbits(64)
    return span_id


def _span_context(trace_id: int, span_id: int, flags: TraceFlags, state: TraceState | None) -> SpanContext:
    """``SpanContext(trace_id, span_id, False, flags, state)`` of ids from the id generator (valid),
    made directly as its tuple when its layout is the known one (a third of the cost)."""
    if _TUPLE_LAYOUT and trace_id <= _MAX_TRACE_ID and span_id <= _MAX_SPAN_ID and trace_id and span_id:
        state = state if state is not None else DEFAULT_TRACE_STATE
        return tuple.__new__(SpanContext, (trace_id, span_id, False, flags, state, True))
    return SpanContext(trace_id, span_id, False, flags, state)


_MAX_TRACE_ID, _MAX_SPAN_ID = (1 << 128) - 1, (1 << 64) - 1


def _checked_context() -> ContextVar[Context] | None:
    """The variable OpenTelemetry's default runtime context keeps the current ``Context`` in, when
    the span is kept there as this module reads and writes it (``None``: the API's calls instead)."""
    variable = getattr(_RUNTIME_CONTEXT, "_current_context", None)
    if not isinstance(variable, ContextVar):
        return None
    probe = NonRecordingSpan(SpanContext(3, 5, False))
    made = trace_api.set_span_in_context(probe, Context())
    token = variable.set(Context({_SPAN_KEY: probe}))
    try:
        current = trace_api.get_current_span() is probe and otel_context.get_current() == made
    finally:
        variable.reset(token)
    return variable if current and made == {_SPAN_KEY: probe} else None


_CURRENT = _checked_context()

_get_current: Callable[[], Context] = _CURRENT.get if _CURRENT is not None else otel_context.get_current
"""``opentelemetry.context.get_current``, read directly from its variable when it can be."""


current_context = _get_current
"""``opentelemetry.context.get_current()`` (the variable's own ``get`` when it can be: no call of ours)."""


def attach_span(span: trace_api.Span) -> Token[Context]:
    """``context.attach(trace.set_span_in_context(span))``: ``span`` current until ``detach``, in
    one step instead of their four calls (this runs for every traced call and dispatch)."""
    if _CURRENT is None:
        return otel_context.attach(trace_api.set_span_in_context(span))
    return _CURRENT.set(Context({**_CURRENT.get(), _SPAN_KEY: span}))


def detach(token: Token[Context]) -> None:
    """``context.detach(token)``: what was current before ``attach_span`` is again (a token of
    another context is logged, as the API's ``detach`` does, not raised)."""
    if _CURRENT is None:
        otel_context.detach(token)
        return
    try:
        _CURRENT.reset(token)
    except Exception:
        _log.exception("Failed to detach context")
