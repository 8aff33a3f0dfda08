"""The mesh's one HTTP server: a Starlette application served by uvicorn on the mesh's event loop.

It is always on (``http_address``, default ``127.0.0.1:8080``), started and stopped
with the gRPC server by the composition root (``svantic_grpc.server``), and carries:

- ``GET /healthz``: liveness, 200 while the process serves HTTP at all;
- ``GET /readyz``: readiness, 200 once the mesh serves, 503 while it starts or stops;
- the adapters' inbound routes (``Adapter.routes()``: Slack interactions, the webhook receiver);
- whatever else the composition root mounts.

Every request body is bounded (``max_body_bytes``, setting ``http_max_body_bytes``): a
declared ``Content-Length`` over it, or a streamed body that grows past it, is answered
413 before the body is held whole, so nobody who can reach the port can make the process
buffer (and parse) hundreds of megabytes, signed or not.

Mounting routes (the seam for other ingresses, e.g. A2A): build Starlette routes
(``starlette.routing.Route``, ``Mount``, or the routes an SDK's Starlette application
builder returns) and hand them to ``HttpServer.mount(routes)`` before ``start()``. A
path mounted twice is refused at start, naming it. Routes are matched in mounting
order after the two probes.

The socket is bound here, not by uvicorn, so a bind error names ``http_address``
and port 0 works: ``port`` and ``url`` give the bound port once started, like the
gRPC server's ``target``. uvicorn's own signal handling is off: the process owner
(the CLI) handles signals and calls ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable, Generator, Iterable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from svantic_grpc.config import dial_address

__all__ = ["BodyLimit", "HttpServer", "HttpServerError"]

_log = logging.getLogger(__name__)


class HttpServerError(ValueError):
    """The HTTP server cannot start (address taken, two routes on one path); the message says which."""


class HttpServer:
    """One ASGI application on ``address``, served by uvicorn as a task this object owns.

    Args:
        address: ``host:port`` to bind; port 0 picks a free one.
        ready: Whether the mesh serves now (``/readyz`` answers 200 only then).
        public_url: How callers elsewhere reach this server (e.g. webhook callback URLs);
            empty: ``url``.
        max_body_bytes: Largest request body; larger ones get 413.
        wrap: Wraps the whole ASGI application (e.g. tracing middleware); ``None``: as is.
    """

    def __init__(
        self,
        address: str,
        *,
        ready: Callable[[], bool],
        public_url: str = "",
        max_body_bytes: int = 8 * 1024 * 1024,
        read_timeout_s: float = 30.0,
        wrap: Callable[[Any], Any] | None = None,
    ) -> None:
        self.address = address
        self._max_body = max_body_bytes
        self._read_timeout_s = read_timeout_s
        self._wrap = wrap
        """Wraps the ASGI application before it serves (the tracing middleware), when given."""
        self._ready = ready
        self._public_url = public_url.rstrip("/")
        self._routes: list[BaseRoute] = []
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        """The bound port once started."""

    def mount(self, routes: Iterable[BaseRoute]) -> None:
        """Add Starlette routes to serve; call before ``start``."""
        if self._server is not None:
            raise RuntimeError("routes must be mounted before the HTTP server starts")
        self._routes.extend(routes)

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def url(self) -> str:
        """``http://host:port`` a client on this machine dials (the bound port once started)."""
        port = self.port or int(self.address.rpartition(":")[2])
        return f"http://{dial_address(self.address, port)}"

    @property
    def public_url(self) -> str:
        """How callers reach this server: ``http_public_url`` when set, ``url`` otherwise."""
        return self._public_url or self.url

    def app(self) -> Starlette:
        """The ASGI application: the probes, then every mounted route."""
        routes: list[BaseRoute] = [
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/readyz", self._readyz, methods=["GET"]),
            *self._routes,
        ]
        seen: set[tuple[str, frozenset[str]]] = set()
        for route in routes:
            if isinstance(route, Route | Mount):
                key = (route.path, frozenset(getattr(route, "methods", None) or ()))
                if key in seen:
                    raise HttpServerError(f"http_address: two routes are mounted on {route.path}")
                seen.add(key)
        return Starlette(routes=routes)

    async def start(self) -> None:
        """Bind and serve; returns once connections are accepted.

        Raises:
            HttpServerError: the address cannot be bound, or two routes share a path.
        """
        if self._server is not None:
            return
        app: Any = BodyLimit(self.app(), self._max_body, read_timeout_s=self._read_timeout_s)
        if self._wrap is not None:
            app = self._wrap(app)
        port = int(self.address.rpartition(":")[2])
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = _listening_socket(self.host, port, family)
        except OSError as exc:
            reason = exc.strerror or exc
            raise HttpServerError(f"http_address: cannot bind {self.address}: {reason}") from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan="off",
            ws="none",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            http=_protocol_with_header_timeout(self._read_timeout_s),
        )
        server = _Uvicorn(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name=f"http {self.address}")
        started = asyncio.create_task(server.up.wait())
        await asyncio.wait({self._task, started}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            sock.close()
            error = self._task.exception() if not self._task.cancelled() else None
            self._server = self._task = None
            raise HttpServerError(f"http_address: the HTTP server did not start: {error!r}")
        self._task.add_done_callback(_log_unexpected_end)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting, give requests in flight ``grace`` seconds, then cancel them; idempotent."""
        server, task = self._server, self._task
        if server is None or task is None or task.done():
            return
        # Typed int, used as asyncio.timeout(...): a fraction of a second is fine.
        server.config.timeout_graceful_shutdown = grace  # type: ignore[assignment]
        server.exit()
        await task

    async def _readyz(self, request: Request) -> JSONResponse:
        if self._ready():
            return JSONResponse({"status": "serving"})
        return JSONResponse({"status": "not serving"}, status_code=503)


async def _healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


class BodyLimit:
    """ASGI middleware: an HTTP request's body is read here, up to ``limit`` bytes, and handed to the
    application whole; a body over the limit (declared or streamed) gets 413 and never reaches it.

    After the body, ``receive`` is the server's own again, so a streaming response still hears
    the client leave (``http.disconnect``).
    """

    def __init__(self, app: ASGIApp, limit: int, *, read_timeout_s: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.read_timeout_s = read_timeout_s
        """How long the whole body may take to arrive: a client that trickles it gets 408."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await _refuse(receive, send, self.limit)
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.read_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client left before its body ended
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.limit:
                        await _refuse(receive, send, self.limit, more=message.get("more_body", False))
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _answer_and_close(
                send,
                408,
                {"error": "the request body did not arrive in time", "reason": "REQUEST_TIMEOUT"},
            )
            return
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # uvicorn refuses a malformed one itself
    return None


_DRAIN_BYTES = 64 * 1024 * 1024
_DRAIN_S = 10.0


async def _refuse(receive: Receive, send: Send, limit: int, *, more: bool = True) -> None:
    """413, after reading (and dropping) what the client still sends, within bounds: a server that
    closes with unread bytes resets the connection, and the client may never see the answer."""
    drained = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_DRAIN_S):
            while more and drained < _DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return  # gone: nobody to answer
                drained += len(message.get("body", b""))
                more = message.get("more_body", False)
    await _answer_and_close(
        send, 413, {"error": "request body too large", "reason": "BODY_TOO_LARGE", "limit_bytes": limit}
    )


async def _answer_and_close(send: Send, status: int, error: dict[str, Any]) -> None:
    """A JSON refusal after which the connection closes."""
    body = json.dumps(error).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _protocol_with_header_timeout(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request line and headers do not
    arrive within ``timeout_s`` (uvicorn itself waits for ever: a client that sends them a byte at
    a time, or never, would hold the connection and its file descriptor as long as it likes).
    Armed when the connection opens and after each response (keep-alive); a request whose
    headers arrived, a response streaming for long included, is never cut."""

    class _HeaderTimeout(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            armed_for = self.cycle

            def too_slow() -> None:
                idle = self.cycle is None or self.cycle.response_complete
                if self.cycle is armed_for and idle and not self.transport.is_closing():
                    self.transport.close()

            self._header_timer = self.loop.call_later(timeout_s, too_slow)

    return _HeaderTimeout


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, told to stop by an event instead of polling a flag, and without signals."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = asyncio.Event()
        self._exit = asyncio.Event()

    def exit(self) -> None:
        self.should_exit = True
        self._exit.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the process owner handles SIGINT/SIGTERM and calls HttpServer.stop

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.up.set()

    async def main_loop(self) -> None:
        # uvicorn's loop sleeps 0.1 s between looks at should_exit; this one wakes on exit() at once
        # and still refreshes the Date header once a second.
        while not await self.on_tick(0):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._exit.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.server_state.connections:
            await super().shutdown(sockets)  # lets requests in flight finish within the grace
            return
        # Nothing in flight: close at once (uvicorn's own path sleeps at least 0.1 s).
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()


def _log_unexpected_end(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("the HTTP server stopped unexpectedly", exc_info=task.exception())


def _listening_socket(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    """A bound, listening TCP socket.

    Made with ``IPPROTO_TCP`` rather than ``socket.create_server``'s protocol 0: asyncio
    turns on ``TCP_NODELAY`` for accepted connections only when the listening socket says
    it is TCP, and without it each small response waits for a delayed ACK (~40 ms; the
    A2A JSON-RPC binding at one client ran at a quarter of the plain a2a-sdk server).
    """
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock
