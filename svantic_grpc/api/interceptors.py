"""The interceptor that authenticates callers and maps errors for every RPC.

It wraps each method handler so that, inside the RPC's own task:
  1. the bearer token is verified (except on open methods: GetToken, health,
     reflection) and the caller is made available to the servicer;
  2. a ``MeshError`` raised anywhere below becomes its gRPC status with rich
     details, and any other exception becomes INTERNAL without leaking internals;
  3. a request body that does not decode is INVALID_ARGUMENT, checked before the
     token (see ``_decoding``); this covers health and reflection too;
  4. with an ``observe`` callback (metrics on), each call's method, status code and
     duration are reported when it ends; without one the wrapper adds nothing;
  5. with a ``tracer`` (tracing on), each call is a server span, child of the caller's
     W3C ``traceparent`` metadata, current while the handler runs.
Scopes are checked by the core, next to what they protect.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc import aio
from opentelemetry.trace import Tracer

from svantic_grpc.api._context import set_caller
from svantic_grpc.api._decoding import Undecodable, UndecodableLog, checked, refuse, tolerant
from svantic_grpc.api._telemetry import (
    Metadata,
    Observe,
    Streaming,
    Unary,
    _code,
    observed_stream,
    observed_unary,
)
from svantic_grpc.api.errors import to_grpc_status
from svantic_grpc.core.auth import TokenIssuer
from svantic_grpc.core.errors import MeshError, Unauthenticated
from svantic_grpc.core.log_context import SESSION_ID

__all__ = ["OPEN_METHOD_PREFIXES", "MeshInterceptor", "drain_refused"]

_log = logging.getLogger(__name__)

#: Methods that need no token.
OPEN_METHOD_PREFIXES = (
    "/svantic.v1.AuthService/",
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class MeshInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Authentication and error mapping around every handler."""

    def __init__(
        self, issuer: TokenIssuer, *, observe: Observe | None = None, tracer: Tracer | None = None
    ) -> None:
        self._issuer = issuer
        self._observe = observe
        self._tracer = tracer
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        """Per method: the servicer's handler and its wrapper, made once instead of per call."""
        self._undecodable = UndecodableLog()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self.wrapped(handler_call_details.method, handler)

    def around(self, handlers: Sequence[grpc.GenericRpcHandler]) -> tuple[grpc.GenericRpcHandler, ...]:
        """``handlers``, each serving its methods wrapped as ``intercept_service`` wraps them.

        What the server adds its services through (``MeshServer``), instead of this class as a
        grpc.aio interceptor: grpc.aio runs its interceptors as a chain of coroutines on every
        call, to find a handler that here is the same for every call of a method.
        """
        return tuple(_Around(handler, self) for handler in handlers)

    def wrapped(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` of ``method`` wrapped: authenticated, errors mapped (made once per method)."""
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        authenticate = not method.startswith(OPEN_METHOD_PREFIXES)
        wrapped = _wrap(
            handler,
            method,
            self._issuer if authenticate else None,
            self._undecodable,
            self._observe,
            self._tracer,
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class _Around(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler whose methods are wrapped by the interceptor.

    grpc.aio asks each service's handler in turn on every call (a SessionService call asks
    AuthService's first): each answer, the wrapped handler or ``None`` for a method this service
    does not have, is kept by method name (the services' handlers answer by the name alone), so
    a call costs one lookup per service asked instead of the inner handler's and the wrapper's.
    """

    def __init__(self, inner: grpc.GenericRpcHandler, interceptor: MeshInterceptor) -> None:
        self._inner = inner
        self._interceptor = interceptor
        self._answers: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        answer = self._answers.get(method, _NOT_ASKED)
        if answer is not _NOT_ASKED:
            return answer
        handler = self._inner.service(handler_call_details)
        answer = None if handler is None else self._interceptor.wrapped(method, handler)
        if len(self._answers) >= _MAX_ANSWERS:  # names a client made up: kept few
            self._answers.clear()
        self._answers[method] = answer
        return answer


_NOT_ASKED = object()
_MAX_ANSWERS = 256
"""Method names whose answer a service's handler keeps (the mesh serves about 60 methods)."""


def _wrap(
    handler: grpc.RpcMethodHandler,
    method: str,
    issuer: TokenIssuer | None,
    undecodable: UndecodableLog,
    observe: Observe | None,
    tracer: Tracer | None = None,
) -> grpc.RpcMethodHandler:
    streamed_requests = handler.request_streaming
    stream = streamed_requests or handler.response_streaming

    async def prepare(request: Any, context: aio.ServicerContext, metadata: Metadata) -> tuple[Any, float]:
        """The request, checked, and the seconds a stream may stay open (its token's life);
        ``metadata``: the call's, when the tracing wrapper already read it."""
        if isinstance(request, Undecodable):
            raise refuse(request, method, undecodable)
        set_caller(None)
        if not streamed_requests:
            SESSION_ID.set(getattr(request, "session_id", ""))  # this call's task only: its log lines
        left = math.inf
        if issuer is not None:
            try:
                token = _bearer_token(context.invocation_metadata() if metadata is None else metadata)
                if stream:
                    caller, left = issuer.verify_for_stream(token)
                else:
                    caller = issuer.verify(token)
                set_caller(caller)
            except MeshError:
                if streamed_requests:
                    await drain_refused(request)
                raise
        return (checked(request, method, undecodable) if streamed_requests else request), left

    if not stream and tracer is None:
        # Its response serialized as the servicer's: a unary servicer answers with a message (only
        # streams write bytes serialized once for many, ``_passing_bytes``).
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler, method, issuer, undecodable, observe),
            request_deserializer=tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    streamed = handler.unary_stream or handler.stream_stream
    if streamed is None or not inspect.isasyncgenfunction(streamed):
        # One response, or responses sent with context.write() (grpc's health Watch): a coroutine.
        behavior = handler.unary_unary or handler.stream_unary or streamed

        async def unary_response(
            request: Any, context: aio.ServicerContext, metadata: Metadata = None
        ) -> Any:
            try:
                prepared, left = await prepare(request, context, metadata)
                if left == math.inf:
                    return await behavior(prepared, context)
                async with _token_life(left):
                    return await behavior(prepared, context)
            except Exception as error:
                await _fail(context, error, method)

        unary: Unary = observed_unary(unary_response, method, observe, tracer)
        factory = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }[_kind(handler)]  # its own kind: a context.write() stream stays a stream
        return _like(handler, factory, unary)

    behavior = handler.unary_stream or handler.stream_stream

    async def stream_response(
        request: Any, context: aio.ServicerContext, metadata: Metadata = None
    ) -> AsyncIterator[Any]:
        try:
            prepared, left = await prepare(request, context, metadata)
            async with _token_life(left):
                async for response in behavior(prepared, context):
                    yield response
        except Exception as error:
            await _fail(context, error, method)

    streaming: Streaming = observed_stream(stream_response, method, observe, tracer)
    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return _like(handler, factory, streaming)


def _unary(
    handler: grpc.RpcMethodHandler,
    method: str,
    issuer: TokenIssuer | None,
    undecodable: UndecodableLog,
    observe: Observe | None,
) -> Unary:
    """A unary call without tracing, as ``prepare``, ``unary_response`` and ``observed_unary``
    together run it, in one coroutine: every InitSession, CloseSession, SendMessage... went
    through three (callgrind, in-process: about 4,000 instructions less per call)."""
    behavior = handler.unary_unary

    async def unary(request: Any, context: aio.ServicerContext) -> Any:
        began = time.perf_counter()
        code = "UNKNOWN"
        try:
            try:
                if isinstance(request, Undecodable):
                    raise refuse(request, method, undecodable)
                SESSION_ID.set(getattr(request, "session_id", ""))  # this call's task only: its log lines
                set_caller(
                    None if issuer is None else issuer.verify(_bearer_token(context.invocation_metadata()))
                )
                response = await behavior(request, context)
            except Exception as error:
                await _fail(context, error, method)  # ends the call with the error's status
                response = None
            # A call answered as the servicer returned has no code set: ``_code`` only when one is.
            code = "OK" if context.code() is None else _code(context, "OK")
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code(context, "UNKNOWN")
            raise
        finally:
            if observe is not None:
                observe(method, code, time.perf_counter() - began)

    return unary


@contextlib.asynccontextmanager
async def _token_life(seconds: float) -> AsyncIterator[None]:
    """End what runs inside when the stream's token expires: ``UNAUTHENTICATED`` (TOKEN_EXPIRED),
    so a stream never keeps the access of a token past its ``exp`` (the client reconnects with a
    new token, as the connected-agent helper does)."""
    if seconds == math.inf:
        yield
        return
    life = asyncio.timeout(max(seconds, 0.0))
    try:
        async with life:
            yield
    except TimeoutError:
        if not life.expired():
            raise  # the handler's own timeout, not the token's
        raise Unauthenticated(
            "the token expired while the stream was open; reconnect with a new one from GetToken",
            reason="TOKEN_EXPIRED",
        ) from None


def _like(handler: grpc.RpcMethodHandler, factory: Any, behavior: Any) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` running ``behavior``, its bodies decoded tolerantly."""
    return factory(
        behavior,
        request_deserializer=tolerant(handler.request_deserializer),
        response_serializer=_passing_bytes(handler.response_serializer),
    )


def _passing_bytes(serializer: Any) -> Any:
    """``serializer``, except that a response already serialized (bytes) goes out as it is.

    One event to a thousand watchers is serialized once (``SessionServicer.WatchSession``),
    not once per stream.
    """
    if serializer is None:
        return None

    def serialize(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serializer(message)

    return serialize


def _kind(handler: grpc.RpcMethodHandler) -> str:
    for kind in ("unary_unary", "stream_unary", "unary_stream", "stream_stream"):
        if getattr(handler, kind) is not None:
            return kind
    raise ValueError("a method handler without a behaviour")


def _bearer_token(metadata: Metadata) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated(
                    "authorization metadata must be 'Bearer <token>'", reason="MALFORMED_AUTH"
                )
            return token.strip()
    raise Unauthenticated(
        "this call needs an 'authorization: Bearer <token>' header; get a token with AuthService.GetToken",
        reason="NO_TOKEN",
    )


async def drain_refused(requests: AsyncIterator[Any]) -> None:
    """Read what a refused client is already sending, up to its end (a few messages, briefly).

    A streaming client whose call ends with a status while it is still writing may be told
    INTERNAL ("Failed execute_batch") by its own library instead of that status (grpc
    Python's client does so now and then); letting its first writes and its half-close land
    first shows it the status. Bounded: a client that keeps writing is refused all the same.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_DRAIN_S):
            read = 0
            async for _ in requests:
                read += 1
                if read >= _DRAIN_MESSAGES:
                    return


_DRAIN_S = 0.2
_DRAIN_MESSAGES = 16


async def _fail(context: aio.ServicerContext, error: Exception, method: str) -> None:
    """End the call for ``error``: a ``MeshError`` as its status, anything else as INTERNAL (logged)."""
    if isinstance(error, aio.AbortError):  # the call was already ended with a status
        raise error
    if context.cancelled() or type(error).__name__ == "ExecuteBatchError":
        # The client went away (a closed terminal or browser, a cancelled call) and a write to it
        # failed: an ordinary end of a stream, not an error of the server's.
        _log.debug("%s: the client went away (%s)", method, type(error).__name__)
        raise asyncio.CancelledError
    if isinstance(error, MeshError):
        status = to_grpc_status(error)
        _log.debug("%s -> %s %s", method, status.code.name, error.message)
        await context.abort(status.code, status.details, status.trailing_metadata)
    _log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
