"""OTLP export in a child process: finished spans leave the server as plain tuples, and the
child encodes them as OTLP protobuf and posts them with OpenTelemetry's own OTLP/HTTP exporter.

The child's encoding (``Encoder``) fills the request straight from the tuples, the same message
field for field as the exporter's ``encode_spans`` makes of the SDK's ``ReadableSpan``s, at ~4 µs a
span instead of ~28 for rebuilding those spans and encoding them (``bench/tracing_floor.py``
``--child``): on a 2-core machine the child's CPU is taken from the mesh too.

Why: encoding spans as OTLP protobuf (~25 µs a span) and posting them is CPU the server's
interpreter spent beside its event loop, holding the GIL against it; flattening a span to a
tuple and marshalling the batch costs a fraction of it (``bench/tracing_floor.py``).

``ChildExporter`` is a ``SpanExporter`` for the SDK's ``BatchSpanProcessor``: it runs in the
processor's export thread, never on the event loop. It writes each batch, length-prefixed, to
the child's standard input without ever blocking: when the child lags (a slow or unreachable
collector) and the pipe is full, the batch is dropped and counted (``dropped_spans``), as the
batch processor drops spans when its own queue is full. The child starts with the first batch
and stops with the exporter (``shutdown``: the pipe closes, the child exports what it has and
exits), or by itself when the server's process ends (its standard input closes).

The child runs ``python -m svantic_grpc._span_export`` with the server's environment and the
``OTEL_*`` variables the server was given (the official exporter reads them there), at a lower
CPU priority than the server (``nice`` 10): on a busy machine the export waits, not the mesh.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import marshal
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = ["ChildExporter", "Encoder", "Rebuilder"]

_log = logging.getLogger(__name__)

_FRAME = struct.Struct(">I")
"""Each batch: its length, then its bytes: ``_MARSHALLED`` or ``_PICKLED`` and the batch so encoded."""

_MARSHALLED, _PICKLED = b"m", b"p"
"""How a batch is encoded: by ``marshal`` (the spans' plain values: ~4,200 instructions a span
against ~7,700 for ``pickle``, in the server's process), or by ``pickle`` when a value is of a
type ``marshal`` does not carry (an ``int`` or ``str`` subclass such as an enum, another object)."""

_PIPE_BYTES = 1 << 20
"""The pipe's buffer asked of Linux (~4,000 spans): room for the child to fall a batch or two behind."""

_STOP_S = 5.0
"""How long ``shutdown`` lets the child finish exporting before it is killed."""


class ChildExporter(SpanExporter):
    """Hands span batches to an OTLP/HTTP exporter in a child process; drops them when it lags."""

    def __init__(self, env: Mapping[str, str] | None = None, command: Sequence[str] | None = None) -> None:
        """
        Args:
            env: ``OTEL_*`` variables for the child's exporter, over this process's environment.
            command: the child to run (tests); default ``python -m svantic_grpc._span_export``.
        """
        self._env = {**os.environ, **{k: v for k, v in (env or {}).items() if k.startswith("OTEL_")}}
        self._command = list(command or (sys.executable, "-m", __name__))
        self._child: subprocess.Popen[bytes] | None = None
        self._fd = -1
        self._pending = memoryview(b"")
        """The part of the last batch the pipe did not take yet."""
        self._tables: dict[int, tuple[object, int]] = {}
        """Resources and instrumentation scopes already sent (by ``id``, kept alive), with their number."""
        self._lock = threading.Lock()
        self._stopped = False
        self.dropped_spans = 0
        """Spans dropped because the child lagged or was gone."""
        self._warned = 0.0

    @property
    def pid(self) -> int | None:
        """The child's process id, once started."""
        return self._child.pid if self._child is not None else None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            new: list[tuple[int, str, Any]] = []
            flat = []
            for span in spans:
                resource = self._number(span.resource, new, "resource")
                scope = self._number(span.instrumentation_scope, new, "scope")
                flat.append(_flat(span, resource, scope))
            return SpanExportResult.SUCCESS if self._send(new, flat) else SpanExportResult.FAILURE

    def send(self, new: list[tuple[int, str, Any]], spans: list[Any]) -> bool:
        """Hands the child ``spans`` already flat (as ``_flat`` makes them: tuples, or the lists the
        server's own spans fill in the same order), with the resources and scopes first used in
        them (``(number, "resource" or "scope", value)``); ``False``: dropped."""
        with self._lock:
            return self._send(new, spans)

    def _send(self, new: list[tuple[int, str, Any]], spans: list[Any]) -> bool:
        if self._stopped:
            return False
        if self._child is None:
            self._start()
        if self._pending:
            self._write()
        if self._pending or self._fd < 0:
            self._drop(len(spans))
            return False
        try:
            frame = _encoded_batch(new, spans)
        except Exception:  # an attribute value pickle cannot carry: this batch only is lost
            _log.exception("span batch not exported")
            self._drop(len(spans))
            return False
        self._pending = memoryview(_FRAME.pack(len(frame)) + frame)
        self._write()
        return True

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Waits (up to ``timeout_millis``) until the pipe has taken every batch."""
        with self._lock:
            return self._drain(time.monotonic() + timeout_millis / 1000)

    def shutdown(self) -> None:
        """Hands over what is left, closes the pipe and waits for the child (killed after 5 s)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            deadline = time.monotonic() + _STOP_S
            self._drain(deadline)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._child is not None:
                try:
                    self._child.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._child.kill()
                    self._child.wait()

    def _start(self) -> None:
        self._child = subprocess.Popen(self._command, stdin=subprocess.PIPE, env=self._env, close_fds=True)
        pipe: BinaryIO = self._child.stdin  # type: ignore[assignment]
        self._fd = os.dup(pipe.fileno())
        pipe.close()
        os.set_blocking(self._fd, False)
        with contextlib.suppress(OSError, AttributeError):  # Linux only; the default 64 KiB works too
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)

    def _write(self) -> None:
        """Writes what the pipe takes now of the pending batch."""
        try:
            written = os.write(self._fd, self._pending)
        except BlockingIOError:
            return
        except OSError:  # the child is gone: nothing more reaches it
            os.close(self._fd)
            self._fd = -1
            self._pending = memoryview(b"")
            return
        self._pending = self._pending[written:]

    def _drain(self, deadline: float) -> bool:
        while self._pending and self._fd >= 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([], [self._fd], [], left)
            self._write()
        return not self._pending

    def _drop(self, count: int) -> None:
        self.dropped_spans += count
        now = time.monotonic()
        if now - self._warned >= 10:
            self._warned = now
            _log.warning("span export lags: %d spans dropped so far", self.dropped_spans)

    def _number(self, item: Any, new: list[tuple[int, str, Any]], kind: str) -> int:
        known = self._tables.get(id(item))
        if known is not None:
            return known[1]
        number = len(self._tables)
        self._tables[id(item)] = (item, number)
        if item is None:
            new.append((number, kind, None))
        elif kind == "resource":
            new.append((number, kind, (dict(item.attributes), item.schema_url)))
        else:
            new.append(
                (number, kind, (item.name, item.version, item.schema_url, dict(item.attributes or {})))
            )
        return number


def _flat(span: ReadableSpan, resource: int, scope: int) -> tuple[Any, ...]:
    """A finished span as plain values: resources and scopes are sent once each, then referred to
    by number."""
    context, parent, status = span.context, span.parent, span.status
    assert context is not None
    return (
        span.name,
        context.trace_id,
        context.span_id,
        int(context.trace_flags),
        context.trace_state.to_header() if context.trace_state else "",
        (parent.span_id, parent.is_remote) if parent is not None else None,
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes) if span.attributes else None,
        [(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events] if span.events else None,
        [_link(link) for link in span.links] if span.links else None,
        status.status_code.value,
        status.description,
        resource,
        scope,
        (span.dropped_attributes, span.dropped_events, span.dropped_links),
    )


def _encoded_batch(new: list[tuple[int, str, Any]], spans: list[Any]) -> bytes:
    """A batch's bytes for the child (``_decoded_batch`` reads them)."""
    try:
        return _MARSHALLED + marshal.dumps((new, spans))
    except ValueError:  # a value of a type marshal does not carry
        return _PICKLED + pickle.dumps((new, spans), protocol=pickle.HIGHEST_PROTOCOL)


def _decoded_batch(body: bytes) -> tuple[list[tuple[int, str, Any]], list[Sequence[Any]]]:
    """What ``_encoded_batch`` encoded: the resources and scopes first used, and the spans."""
    encoded = memoryview(body)[1:]
    if body[:1] == _MARSHALLED:
        new, flat = marshal.loads(encoded)
    else:
        new, flat = pickle.loads(encoded)
    return new, flat


def _link(link: Any) -> tuple[Any, ...]:
    c = link.context
    header = c.trace_state.to_header() if c.trace_state else ""
    return (c.trace_id, c.span_id, int(c.trace_flags), header, c.is_remote, dict(link.attributes or {}))


# --------------------------------------------------------------------------- the child


def _rebuild(flat: Sequence[Any], resources: dict[int, Any], scopes: dict[int, Any]) -> ReadableSpan:
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.trace import Event
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

    (name, trace_id, span_id, flags, state, parent, kind, start, end, attributes, events, links) = flat[:12]
    (code, description, resource, scope, (dropped_attributes, dropped_events, dropped_links)) = flat[12:]

    def context(trace_id: int, span_id: int, flags: int, state: str, remote: bool) -> SpanContext:
        trace_state = TraceState.from_header([state]) if state else None
        return SpanContext(trace_id, span_id, remote, TraceFlags(flags), trace_state)

    bounded: Any = attributes
    if dropped_attributes:
        bounded = BoundedAttributes(attributes=attributes, immutable=False)
        bounded.dropped = dropped_attributes
    span = ReadableSpan(
        name=name,
        context=context(trace_id, span_id, flags, state, False),
        parent=context(trace_id, parent[0], flags, "", parent[1]) if parent is not None else None,
        resource=resources[resource],
        attributes=bounded,
        events=[Event(n, a, timestamp=t) for n, t, a in events or ()],
        links=[Link(context(t, s, f, h, r), a) for t, s, f, h, r, a in links or ()],
        kind=SpanKind(kind),
        status=Status(StatusCode(code), description),
        start_time=start,
        end_time=end,
        instrumentation_scope=scopes[scope],
    )
    if dropped_events or dropped_links:  # ReadableSpan reports what its bounded lists dropped
        span._events = _Dropped(span._events, dropped_events)
        span._links = _Dropped(span._links, dropped_links)
    return span


class _Dropped(list[Any]):
    """A list of events or links that says how many were dropped, as the SDK's ``BoundedList`` does."""

    def __init__(self, items: Any, dropped: int) -> None:
        super().__init__(items)
        self.dropped = dropped


def _read(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


class Rebuilder:
    """Turns what ``ChildExporter`` sends back into the SDK's ``ReadableSpan``s."""

    def __init__(self) -> None:
        self._resources: dict[int, Any] = {}
        self._scopes: dict[int, Any] = {}

    def learn(self, new: list[tuple[int, str, Any]]) -> None:
        """Takes in the resources and scopes first used in a batch."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        for number, kind, value in new:
            if kind == "resource":
                self._resources[number] = Resource(*value) if value is not None else Resource({})
            else:
                self._scopes[number] = InstrumentationScope(*value) if value is not None else None

    def spans(self, new: list[tuple[int, str, Any]], flat: Sequence[Sequence[Any]]) -> list[ReadableSpan]:
        self.learn(new)
        return [_rebuild(span, self._resources, self._scopes) for span in flat]


class Encoder(Rebuilder):
    """Encodes what ``ChildExporter`` sends as the OTLP request OpenTelemetry's exporter would make
    of the rebuilt ``ReadableSpan``s (``encode_spans``), straight from the tuples.

    The same message, field for field (a test compares the bytes), at a fraction of the cost: no
    ``ReadableSpan``, ``SpanContext`` or ``Event`` objects are made, and each span is filled in
    place in the request instead of built from keyword arguments and copied into it. The resources
    and scopes are encoded once each, by the exporter's own functions, and grouped as it groups them.
    """

    def __init__(self) -> None:
        super().__init__()
        self._encoded: dict[int, tuple[Any, Any]] = {}
        """Resources and scopes encoded, by ``id`` (each kept alive beside its encoding)."""

    def request(self, new: list[tuple[int, str, Any]], flat: Sequence[Sequence[Any]]) -> Any:
        from opentelemetry.exporter.otlp.proto.common._internal import (
            _encode_instrumentation_scope,
            _encode_resource,
        )
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.learn(new)
        numbered: dict[tuple[int, int], list[Sequence[Any]]] = {}
        for span in flat:
            key = (span[14], span[15])
            spans = numbered.get(key)
            if spans is None:
                spans = numbered[key] = []
            spans.append(span)
        groups: dict[Any, dict[Any, list[Sequence[Any]]]] = {}
        for (resource_number, scope_number), spans in numbered.items():
            # By resource, then scope, in order of first use, equal ones together (as encode_spans groups)
            groups.setdefault(self._resources[resource_number], {}).setdefault(
                self._scopes[scope_number], []
            ).extend(spans)
        request = ExportTraceServiceRequest()
        for resource, scopes in groups.items():
            resource_spans = request.resource_spans.add()
            resource_spans.resource.CopyFrom(self._once(resource, _encode_resource))
            if resource.schema_url:
                resource_spans.schema_url = resource.schema_url
            for scope, spans in scopes.items():
                scope_spans = resource_spans.scope_spans.add()
                scope_spans.scope.CopyFrom(self._once(scope, _encode_instrumentation_scope))
                if scope is not None and scope.schema_url:
                    scope_spans.schema_url = scope.schema_url
                add = scope_spans.spans.add
                for span in spans:
                    _encode(add(), span)
        return request

    def _once(self, item: Any, encode: Any) -> Any:
        known = self._encoded.get(id(item))
        if known is None:
            known = self._encoded[id(item)] = (item, encode(item))
        return known[1]


_KINDS = {0: 1, 1: 2, 2: 3, 3: 4, 4: 5}
"""``SpanKind`` values (INTERNAL, SERVER, ...) to OTLP's (``SPAN_KIND_INTERNAL`` is 1)."""

_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
"""OTLP ``SpanFlags``: whether the parent (or linked) span is remote is known, and it is."""


def _encode(pb: Any, flat: Sequence[Any]) -> None:
    """Fills the OTLP ``Span`` ``pb`` from a span as ``_flat`` makes it, as ``encode_spans`` does."""
    (name, trace_id, span_id, _flags, state, parent, kind, start, end, attributes, events, links) = flat[:12]
    code, description, (dropped_attributes, dropped_events, dropped_links) = flat[12], flat[13], flat[16]
    pb.trace_id = trace_id.to_bytes(16, "big")
    pb.span_id = span_id.to_bytes(8, "big")
    if state:
        pb.trace_state = state
    if parent is not None:
        pb.parent_span_id = parent[0].to_bytes(8, "big")
        pb.flags = _HAS_IS_REMOTE | _IS_REMOTE if parent[1] else _HAS_IS_REMOTE
    else:
        pb.flags = _HAS_IS_REMOTE
    pb.name = name
    pb.kind = _KINDS[kind]
    pb.start_time_unix_nano = start
    pb.end_time_unix_nano = end
    if attributes:
        _attributes(pb.attributes, attributes)
    if events:
        for event_name, timestamp, event_attributes in events:
            event = pb.events.add()
            event.name = event_name
            event.time_unix_nano = timestamp
            if event_attributes:
                _attributes(event.attributes, event_attributes)
    if links:
        for link_trace, link_span, _link_flags, _state, remote, link_attributes in links:
            link = pb.links.add()
            link.trace_id = link_trace.to_bytes(16, "big")
            link.span_id = link_span.to_bytes(8, "big")
            if link_attributes:
                _attributes(link.attributes, link_attributes)
            link.flags = _HAS_IS_REMOTE | _IS_REMOTE if remote else _HAS_IS_REMOTE
    status = pb.status
    status.SetInParent()
    if code:
        status.code = code
    if description:
        status.message = description
    if dropped_attributes:
        pb.dropped_attributes_count = dropped_attributes
    if dropped_events:
        pb.dropped_events_count = dropped_events
    if dropped_links:
        pb.dropped_links_count = dropped_links


def _attributes(target: Any, attributes: Mapping[str, Any]) -> None:
    """Appends ``attributes`` to the repeated ``KeyValue`` field ``target``: strings, booleans,
    integers and floats here, anything else by the exporter's own ``_encode_value`` (a value it
    cannot encode is logged and left out, as it does)."""
    for key, value in attributes.items():
        kind = type(value)
        if kind is str:
            kv = target.add()
            kv.key = key
            kv.value.string_value = value
        elif kind is bool:
            kv = target.add()
            kv.key = key
            kv.value.bool_value = value
        elif kind is int:
            kv = target.add()
            kv.key = key
            kv.value.int_value = value
        elif kind is float:
            kv = target.add()
            kv.key = key
            kv.value.double_value = value
        else:
            from opentelemetry.exporter.otlp.proto.common._internal import _encode_value

            try:
                encoded = _encode_value(value)
            except Exception as error:
                _log.exception("Failed to encode key %s: %s", key, error)
                continue
            kv = target.add()
            kv.key = key
            kv.value.CopyFrom(encoded)


class _Encoded(Sequence[Any]):
    """A batch already encoded (``Encoder.request``), handed to ``OTLPSpanExporter.export`` in place
    of its spans: the exporter's ``encode_spans`` passes its request through (``_encoded_passes``);
    everything else of the export (size limit, compression, headers, retries, the exporter's own
    metrics) is the exporter's as it is."""

    def __init__(self, request: Any, count: int) -> None:
        self.request = request
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        raise TypeError("an encoded batch has no spans to read")


def _encoded_passes(module: Any) -> bool:
    """Makes the OTLP exporter ``module`` take an ``_Encoded`` batch as its request; ``False`` when
    the module does not encode through ``encode_spans`` (the spans are then rebuilt for it)."""
    encode_spans = getattr(module, "encode_spans", None)
    if encode_spans is None:
        return False

    def encoded_or(spans: Any) -> Any:
        return spans.request if isinstance(spans, _Encoded) else encode_spans(spans)

    module.encode_spans = encoded_or
    return True


def child_main() -> None:
    """Reads batches from standard input and exports them over OTLP/HTTP until it closes."""
    # A Ctrl-C, or a SIGTERM to the whole group, stops the server, which then closes our pipe: the
    # batches in it are exported before this ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        # Behind the server for the CPU: spans wait in the pipe (~4,000) while the machine is busy,
        # and are dropped (counted by the server) only when it stays too busy to export them.
        os.nice(10)
    from opentelemetry.exporter.otlp.proto.http import trace_exporter

    exporter = trace_exporter.OTLPSpanExporter()
    encoder = Encoder()
    encoded = _encoded_passes(trace_exporter)
    stream = sys.stdin.buffer
    try:
        while (head := _read(stream, _FRAME.size)) is not None:
            body = _read(stream, _FRAME.unpack(head)[0])
            if body is None:
                break
            try:
                new, flat = _decoded_batch(body)
                if encoded:
                    exporter.export(_Encoded(encoder.request(new, flat), len(flat)))
                else:
                    exporter.export(encoder.spans(new, flat))
            except Exception:  # a batch that cannot be encoded: the next ones still go
                _log.exception("span batch not exported")
    finally:
        exporter.shutdown()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    child_main()
