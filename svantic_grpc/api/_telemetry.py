"""What the interceptor adds around a call when metrics or tracing are on (``api/interceptors.py``).

Each wrapper takes a handler's behaviour (a coroutine, or an async generator of responses)
and returns one of the same shape; the interceptor applies them once per method.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer, set_span_in_context

__all__ = [
    "Observe",
    "Streaming",
    "Unary",
    "observed_stream",
    "observed_unary",
    "traced_stream",
]

Observe = Callable[[str, str, float], None]
"""Told of each call's end: method, status code name (``OK``, ``NOT_FOUND``, ...) and seconds taken."""

Unary = Callable[[Any, aio.ServicerContext], Awaitable[Any]]
Streaming = Callable[[Any, aio.ServicerContext], AsyncIterator[Any]]


def observed_unary(behavior: Unary, method: str, observe: Observe | None, tracer: Tracer | None) -> Unary:
    """``behavior`` reported to ``observe`` (metrics) and/or run in a server span of ``tracer``.

    One wrapper for both, on the path of every unary call: the status code is read once, and
    the span is started and made current directly (``start_span`` and ``attach``), which is
    what ``start_as_current_span`` does through two generator context managers per call.
    """
    if tracer is None and observe is None:
        return behavior
    attributes = _rpc_attributes(method)

    async def observed(request: Any, context: aio.ServicerContext) -> Any:
        began = time.perf_counter()
        span = None
        if tracer is not None:
            span = tracer.start_span(method, _parent(context), SpanKind.SERVER, attributes)
            token = otel_context.attach(set_span_in_context(span))
        code = "UNKNOWN"
        try:
            response = await behavior(request, context)
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
                _end(span, code)
                otel_context.detach(token)
            if observe is not None:
                observe(method, code, time.perf_counter() - began)

    return observed


def observed_stream(behavior: Streaming, method: str, observe: Observe) -> Streaming:
    async def observed(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        began = time.perf_counter()
        code = "UNKNOWN"
        try:
            async for response in behavior(request, context):
                yield response
            code = _code(context, "OK")
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code(context, "UNKNOWN")
            raise
        finally:
            observe(method, code, time.perf_counter() - began)

    return observed


def traced_stream(behavior: Streaming, method: str, tracer: Tracer) -> Streaming:
    async def traced(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        with tracer.start_as_current_span(
            method, context=_parent(context), kind=SpanKind.SERVER, attributes=_rpc_attributes(method)
        ) as span:
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                _end(span, _code(context, "OK"), ended=False)

    return traced


def _parent(context: aio.ServicerContext) -> Context:
    """The caller's trace context from the call's ``traceparent``/``tracestate`` metadata."""
    carrier = {key: value for key, value in context.invocation_metadata() or () if key[:5] == "trace"}
    return propagate.extract(carrier) if carrier else _NO_PARENT


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


def _end(span: Span, code: str, *, ended: bool = True) -> None:
    """Give ``span`` the call's status ``code`` (unless ``OK``, given at its start); end it unless
    its context manager does."""
    if code != "OK":
        span.set_attribute("rpc.grpc.status_code", code)
        span.set_status(StatusCode.ERROR, code)
    if ended:
        span.end()


def _code(context: aio.ServicerContext, default: str) -> str:
    """The status the handler set (by abort or set_code), else ``default``."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return _BY_VALUE.get(code, default)
    return default


_BY_VALUE: dict[int, str] = {c.value[0]: c.name for c in grpc.StatusCode}
