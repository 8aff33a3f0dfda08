"""What the interceptor adds around a call when metrics or tracing are on (``api/interceptors.py``).

Each wrapper takes a handler's behaviour (a coroutine, or an async generator of responses)
and returns one of the same shape; the interceptor applies them once per method.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
from grpc import aio
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from svantic_grpc._spans import attach_span, detach
from svantic_grpc._w3c import extracted

__all__ = [
    "Behavior",
    "Metadata",
    "Observe",
    "Streaming",
    "StreamingBehavior",
    "Unary",
    "observed_stream",
    "observed_unary",
]

Observe = Callable[[str, str, float], None]
"""Told of each call's end: method, status code name (``OK``, ``NOT_FOUND``, ...) and seconds taken."""

Unary = Callable[[Any, aio.ServicerContext], Awaitable[Any]]
Streaming = Callable[[Any, aio.ServicerContext], AsyncIterator[Any]]

Metadata = Sequence[tuple[str, Any]] | None
"""A call's invocation metadata, when a wrapper already read it (``None``: not read yet). grpc.aio
builds it anew on each ``invocation_metadata()`` (~1.6 µs): a traced call reads it once, for its
``traceparent``, and hands it on to what checks its token."""


class Behavior(Protocol):
    """A unary behaviour the wrappers run: grpc's ``(request, context)``, and the call's metadata
    when a wrapper read it."""

    def __call__(
        self, request: Any, context: aio.ServicerContext, metadata: Metadata = None
    ) -> Awaitable[Any]: ...


class StreamingBehavior(Protocol):
    """The same for a behaviour that yields its responses."""

    def __call__(
        self, request: Any, context: aio.ServicerContext, metadata: Metadata = None
    ) -> AsyncIterator[Any]: ...


def observed_unary(behavior: Behavior, method: str, observe: Observe | None, tracer: Tracer | None) -> Unary:
    """``behavior`` reported to ``observe`` (metrics) and/or run in a server span of ``tracer``.

    One wrapper for both, on the path of every unary call: the status code is read once, and
    the span is started and made current directly (``start_span`` and ``attach_span``), which is
    what ``start_as_current_span`` does through two generator context managers per call.
    """
    if tracer is None and observe is None:
        return behavior
    attributes = _rpc_attributes(method)

    async def observed(request: Any, context: aio.ServicerContext) -> Any:
        began = time.perf_counter()
        span = metadata = None
        if tracer is not None:
            metadata = context.invocation_metadata()
            span = tracer.start_span(method, _parent(metadata), SpanKind.SERVER, attributes)
            token = attach_span(span)
        code = "UNKNOWN"
        try:
            response = await behavior(request, context, metadata)
            code = _code(context, "OK")
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code(context, "UNKNOWN")
            raise
        finally:
            if span is not None:
                if code != "OK":  # (OK was given at its start)
                    _failed(span, code)
                span.end()
                detach(token)
            if observe is not None:
                observe(method, code, time.perf_counter() - began)

    return observed


def observed_stream(
    behavior: StreamingBehavior, method: str, observe: Observe | None, tracer: Tracer | None
) -> Streaming:
    """``behavior``'s responses reported to ``observe`` and/or run in a server span of ``tracer``,
    current while it runs (an exception that ends it recorded, as ``use_span`` records it).

    One generator for both: each response of a long stream (an agent's ``Connect``) passes
    through one layer more, not two.
    """
    if tracer is None and observe is None:
        return behavior
    attributes = _rpc_attributes(method)

    async def observed(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        began = time.perf_counter()
        span = metadata = None
        if tracer is not None:
            metadata = context.invocation_metadata()
            span = tracer.start_span(method, _parent(metadata), SpanKind.SERVER, attributes)
            token = attach_span(span)
        code = "UNKNOWN"
        failure: BaseException | None = None
        try:
            async for response in behavior(request, context, metadata):
                yield response
            code = _code(context, "OK")
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except BaseException as error:
            code = _code(context, "UNKNOWN")
            failure = error
            raise
        finally:
            if span is not None:
                detach(token)
                _end(span, _code(context, "OK"), failure)
            if observe is not None:
                observe(method, code, time.perf_counter() - began)

    return observed


def _parent(metadata: Metadata) -> Context:
    """The caller's trace context from the call's ``traceparent``/``tracestate`` metadata (W3C: a
    ``tracestate`` without ``traceparent`` continues nothing)."""
    headers = dict(metadata or ())
    if "traceparent" not in headers:
        return _NO_PARENT
    return extracted({key: value for key, value in headers.items() if key[:5] == "trace"})


_NO_PARENT = Context()
"""A call without trace metadata: its span starts a trace (what ``extract`` of nothing gives)."""


def _rpc_attributes(method: str) -> dict[str, str]:
    """A call's span attributes, given when it starts (one attribute set later takes a lock each).

    ``rpc.method`` is the fully-qualified name, as the current semantic conventions have it (they
    deprecate ``rpc.service``, whose value it includes). The status code is given as ``OK``
    and replaced when the call ends otherwise: most calls end OK, and then nothing is set after
    the start.
    """
    return {"rpc.system": "grpc", "rpc.method": method.lstrip("/"), "rpc.grpc.status_code": "OK"}


def _end(span: Span, code: str, failure: BaseException | None = None) -> None:
    """Give ``span`` the call's status ``code`` (unless ``OK``, given at its start) and the
    exception that ended a stream (recorded as ``use_span`` records it), and end it."""
    if code != "OK":
        _failed(span, code)
    if isinstance(failure, Exception) and span.is_recording():
        span.record_exception(failure)
        span.set_status(Status(StatusCode.ERROR, f"{type(failure).__name__}: {failure}"))
    span.end()


def _failed(span: Span, code: str) -> None:
    """Give ``span`` the status ``code`` its call ended with, other than ``OK``."""
    span.set_attribute("rpc.grpc.status_code", code)
    span.set_status(StatusCode.ERROR, code)


def _code(context: aio.ServicerContext, default: str) -> str:
    """The status the handler set (by abort or set_code), else ``default``."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return _BY_VALUE.get(code, default)
    return default


_BY_VALUE: dict[int, str] = {c.value[0]: c.name for c in grpc.StatusCode}
