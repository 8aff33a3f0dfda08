"""The composition root: settings in, a running gRPC server and HTTP server out.

One process, one event loop: the grpc.aio server on ``grpc_address`` and the HTTP
server (``svantic_grpc.http_server``, Starlette on uvicorn) on ``http_address``. The
HTTP server always runs: ``/healthz``, ``/readyz``, the adapters' routes, and any
other ingress mounted here with ``self.http.mount(routes)`` before ``start``.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import sqlite3
import tempfile
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import IO

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider

from svantic_grpc.a2a.ingress import A2AIngress
from svantic_grpc.adapter_host import AdapterHost, AdapterLoadError
from svantic_grpc.api.auth_service import AuthServicer
from svantic_grpc.api.interceptors import MeshInterceptor
from svantic_grpc.api.message_service import MessageServicer
from svantic_grpc.api.registry_service import RegistryServicer
from svantic_grpc.api.session_service import SessionServicer
from svantic_grpc.config import (
    Settings,
    SettingsError,
    dial_address,
    is_loopback,
    replica_id,
    resolve_auth,
)
from svantic_grpc.console import Console
from svantic_grpc.core.clock import Clock, IdGenerator
from svantic_grpc.core.inputs.policies import PolicyEngine
from svantic_grpc.core.mesh import Mesh, MeshOptions, MessageOptions
from svantic_grpc.core.metrics import NO_METRICS
from svantic_grpc.core.retention import Retention
from svantic_grpc.core.store import Store
from svantic_grpc.core.tracing import NO_TRACING
from svantic_grpc.dispatch.a2a import A2ATransport
from svantic_grpc.http_server import HttpServer, HttpServerError
from svantic_grpc.metrics import PrometheusMetrics
from svantic_grpc.pb import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    message_service_pb2,
    message_service_pb2_grpc,
    registry_service_pb2,
    registry_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
)
from svantic_grpc.stores import MemoryStore, open_store
from svantic_grpc.tracing import (
    OtelTracing,
    dropped_spans_of,
    http_middleware,
    provider_from_env,
    tracer_of,
)

__all__ = ["SERVICE_NAMES", "MeshServer", "event_loop_factory"]

_log = logging.getLogger("svantic_grpc")


def event_loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes the event loop a server with ``settings`` runs on (``event_loop``): run the
    server inside ``asyncio.Runner(loop_factory=event_loop_factory(settings))``.

    grpc.aio learns of each finished batch (a write to a stream, a message read) through a
    socket its poller thread writes to, and each time the loop wakes and runs a turn: with
    asyncio's own loop that turn is Python (``_run_once``, the selector), with uvloop C. An event
    written to 1,000 ``WatchSession`` streams: ~98K → ~64K server instructions per stream
    (``bench/scale_streams.py --part fanout-instructions``).
    """
    if settings.event_loop == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:  # not installed with the server (an unsupported platform)
        raise SettingsError(
            'event_loop: uvloop is not installed here; install it, or set "event_loop": "asyncio"'
        ) from None
    return uvloop.new_event_loop


GC_YOUNG_THRESHOLD = 10_000
"""Net container allocations between two young-generation collections once serving (Python: 700)."""

# grpc core keeps each call that arrives before grpc.aio asks for the next one in one queue for
# the whole server (every method here is unregistered, see _not_registered). Past 1,000 queued
# (grpc.server.max_pending_requests) it cancels arriving calls at random, all of them past
# 3,000: status CANCELLED, no reason, whichever client sent them. A burst of 3,000 WatchSession
# on one connection got 500-700 CANCELLED, and now and then another client's GetSession. Raised,
# a burst waits its turn and meets the mesh's own limit (max_streams_per_tenant: RESOURCE_EXHAUSTED
# TOO_MANY_STREAMS); a call still queued after 30 s is dropped by core all the same.
MAX_PENDING_CALLS = 1_000_000

SERVICE_NAMES = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (auth_service_pb2, "AuthService"),
        (session_service_pb2, "SessionService"),
        (registry_service_pb2, "RegistryService"),
        (message_service_pb2, "MessageService"),
    )
)


class MeshServer:
    """One server process: the mesh core behind its four gRPC services and its HTTP server.

    Use ``async with MeshServer(settings) as server:``; ``server.port`` is the
    bound gRPC port and ``server.http.port`` the bound HTTP port (useful with port 0).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        env: Mapping[str, str] | None = None,
        clock: Clock | None = None,
        ids: IdGenerator | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        auth = resolve_auth(settings, env)
        self.development = auth.development
        addresses = {"grpc_address": settings.grpc_address, "http_address": settings.http_address}
        for key, address in addresses.items():
            if auth.development and not is_loopback(address):
                raise SettingsError(
                    f"{key} {address!r} is not loopback, and no signing key is set in "
                    f"${settings.auth.signing_key_env}: the development default only runs on loopback. "
                    "Set the signing key and configure tenants to serve on other addresses."
                )
        try:
            store = open_store(
                settings.store,
                postgres_schema=settings.postgres.schema_name,
                pool_size=settings.postgres.pool_size,
            )
        except ValueError as exc:
            raise SettingsError(f"store: {exc}") from None
        env = os.environ if env is None else env
        dispatch = settings.dispatch
        self.metrics = PrometheusMetrics() if settings.metrics.enabled else None
        """The Prometheus registry behind ``/metrics``; ``None`` when metrics are off."""
        self._own_tracing = None if tracer_provider is not None else provider_from_env(env)
        self.tracer_provider = tracer_provider or self._own_tracing
        """Spans of gRPC calls and hosted dispatches; ``None`` (tracing off) unless OTEL_* asks."""
        self._tracer = tracer_of(self.tracer_provider)
        if self.metrics is not None and (dropped := dropped_spans_of(self.tracer_provider)) is not None:
            self.metrics.count_dropped_spans(dropped)
        hosted = A2ATransport(
            connect_timeout_s=dispatch.connect_timeout_ms / 1000,
            read_timeout_s=dispatch.timeout_ms / 1000,
        )
        try:
            self.mesh = Mesh(
                store=store,
                tokens=auth.tokens,
                credentials=auth.credentials,
                options=MeshOptions(
                    session_ttl_s=settings.session_ttl_ms / 1000,
                    heartbeat_timeout_s=settings.heartbeat_timeout_ms / 1000,
                    subscriber_buffer=settings.subscriber_buffer,
                    max_streams_per_tenant=settings.max_streams_per_tenant,
                    messages=MessageOptions(
                        dispatch_timeout_s=dispatch.timeout_ms / 1000,
                        max_dispatches_per_session=dispatch.max_dispatches_per_session,
                        failover_attempts=dispatch.failover_attempts,
                        critic_retries=dispatch.critic_retries,
                    ),
                    dispatch_token_ttl_s=dispatch.token_ttl_s,
                    dispatch_signing_key_pem=auth.dispatch_key_pem,
                    internal_agents=settings.internal_agents,
                    policies=PolicyEngine.from_settings(p.model_dump() for p in settings.policies),
                    max_tool_calls_per_session=settings.guardrails.max_tool_calls_per_session,
                    input_request_ttl_s=settings.input_request_ttl_ms / 1000,
                    replica_id=replica_id(settings),
                    lease_s=settings.replica.lease_ms / 1000,
                    renew_s=settings.replica.renew_ms / 1000,
                    retention=Retention(
                        closed_sessions_s=settings.retention.closed_sessions_s,
                        max_events_per_session=settings.retention.max_events_per_session,
                        sweep_interval_s=settings.retention.sweep_interval_s,
                    ),
                ),
                clock=clock,
                ids=ids,
                hosted=hosted,
                probe=hosted.probe,
                metrics=self.metrics or NO_METRICS,
                tracing=OtelTracing(self._tracer) if self._tracer is not None else NO_TRACING,
            )
        except ValueError as exc:  # an internal agent class or the dispatch key could not be loaded
            raise SettingsError(f"settings: {exc}") from None
        self._ready = False
        provider = self.tracer_provider
        self.http = HttpServer(
            settings.http_address,
            ready=lambda: self._ready,
            public_url=settings.http_public_url,
            max_body_bytes=settings.http_max_body_bytes,
            read_timeout_s=settings.http_read_timeout_s,
            wrap=(lambda app: http_middleware(app, provider)) if provider is not None else None,
        )
        """The HTTP server; mount further routes on it with ``self.http.mount(routes)`` before start."""
        self.adapters = AdapterHost(
            configs=settings.adapters,
            http=self.http,
            inputs=self.mesh.inputs,
            store=self.mesh.store,
            clock=self.mesh.clock,
            ids=self.mesh.ids,
            env=env,
            derive_key=None if self.development else self.mesh.tokens.derived_key,
        )
        try:
            self.adapters.load()
        except AdapterLoadError as exc:
            raise SettingsError(str(exc)) from None
        self.http.mount(self.adapters.routes())
        self.a2a = A2AIngress(self.mesh)
        """The mesh as an A2A agent: its gRPC bindings on the gRPC server, its HTTP routes on ``http``."""
        self.http.mount(self.a2a.routes())
        self.console = Console(self.mesh, public_url=settings.http_public_url)
        """The operator console at ``/console``."""
        self.http.mount(self.console.routes())
        if self.metrics is not None:
            self.http.mount(self.metrics.routes(self.mesh.levels))
        self._health = health.aio.HealthServicer()
        self._server: aio.Server | None = None
        self.port = 0
        self._stopped = False
        self._database_hold: IO[bytes] | None = None
        """An exclusive lock on the SQLite file's ``.serving`` companion while this server runs."""

    async def start(self) -> None:
        """Bind, start serving and start background work."""
        if self.development:
            _log.warning(
                "DEVELOPMENT MODE: no signing key in $%s. Tokens are signed with a built-in key and the "
                "walkthrough credential (client_id 'svantic') is accepted. Loopback only; never use in "
                "production.",
                self.settings.auth.signing_key_env,
            )
        _refuse_an_unusable_database(self.mesh.store)
        self._database_hold = _hold_the_database(self.mesh.store)
        try:
            await self.mesh.start(serving=False)  # serving once the port is bound, below
        except (ValueError, OSError, sqlite3.Error) as exc:  # the store refused or could not open its file
            await self._stop_starting()
            raise SettingsError(f"store: {exc}") from None
        except BaseException:
            # Whatever else failed (a recovery query timing out, a cancel): nothing started keeps
            # running, so the leases claimed so far lapse to another replica instead of being renewed.
            await self._stop_starting()
            raise
        try:
            await self.http.start()
        except HttpServerError as exc:
            await self._stop_starting()
            raise SettingsError(str(exc)) from None
        self.a2a.http_base_url = self.http.public_url  # the agent card names where it is served
        await self.adapters.start()
        server = aio.server(options=_server_options())
        # Every service is added wrapped by the interceptor (authentication, errors, metrics,
        # tracing), not given to grpc.aio as an interceptor: it would run as a chain of three
        # coroutines on every call to find what is the same wrapped handler for every call of a
        # method (callgrind, server process: 1.55M -> 1.53M instructions per InitSession+CloseSession).
        interceptor = MeshInterceptor(
            self.mesh.tokens,
            observe=self.metrics.rpc_done if self.metrics is not None else None,
            tracer=self._tracer,
        )
        add_handlers = server.add_generic_rpc_handlers
        server.add_generic_rpc_handlers = lambda handlers: add_handlers(interceptor.around(handlers))
        # Every service is served by the generic handler its add_*_to_server adds, not also as
        # grpc's "registered methods": grpc.aio keeps a request outstanding per registered method
        # and waits on all of them for every call it accepts (48 methods here: about 270,000 CPU
        # instructions more per call, callgrind, a third of a bare unary call's cost).
        server.add_registered_method_handlers = _not_registered
        auth_service_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(self.mesh), server)
        session_service_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(self.mesh), server)
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(self.mesh), server)
        message_service_pb2_grpc.add_MessageServiceServicer_to_server(MessageServicer(self.mesh), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        a2a_services = self.a2a.add_to(server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                *a2a_services,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            self.port = server.add_insecure_port(self.settings.grpc_address)
        except RuntimeError as exc:
            await self.adapters.stop()
            await self.http.stop()
            await self.mesh.stop()
            raise SettingsError(f"grpc_address: cannot bind {self.settings.grpc_address}: {exc}") from None
        await server.start()
        self._server = server
        self.a2a.grpc_target = self.settings.public_grpc_target(self.port)
        self.mesh.now_serving()
        self._ready = True
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        # Everything made so far lives as long as the server: keep the collector from rescanning it.
        gc.freeze()
        # Streams allocate in bursts (an event to 1,000 watchers: a few thousand short-lived
        # futures and callbacks, freed by reference counting a moment later). At the default
        # young-generation threshold (700) each burst ran the collector ~9 times and now and
        # then a full pass of up to ~140 ms, ~20% of the server's CPU in bench/scale_streams.py.
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        host = self.settings.grpc_address.rpartition(":")[0]
        _log.info(
            "svantic-grpc serving gRPC on %s:%d (store: %s, event loop: %s)",
            host,
            self.port,
            self.settings.store,
            type(asyncio.get_running_loop()).__module__.partition(".")[0],
        )
        _log.info("svantic-grpc serving HTTP on %s:%d", self.http.host, self.http.port)

    async def _stop_starting(self) -> None:
        """A start that failed: the mesh stops and the database is let go."""
        await self.mesh.stop()
        self._let_go_of_the_database()

    def _let_go_of_the_database(self) -> None:
        if self._database_hold is not None:
            self._database_hold.close()  # the lock goes with it (and with the process, however it ends)
            self._database_hold = None

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: health NOT_SERVING, background work stops, in-flight calls get ``grace``.

        Safe to call twice.
        """
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        self._ready = False  # /readyz: 503 from here on
        self.mesh.begin_stop()  # before the streams end: waiting work stays for the next start
        await self._health.enter_graceful_shutdown()  # every service NOT_SERVING from here on
        await self.mesh.sessions.reaper.stop()
        self.mesh.bus.shutdown()  # open streams end now with UNAVAILABLE instead of eating the grace
        self.console.close()  # and so do the console's live pages
        if self._server is not None:
            await self._server.stop(grace)
        await self.http.stop(grace)
        await self.adapters.stop()
        await self.mesh.stop()
        self._let_go_of_the_database()
        if self._own_tracing is not None:
            self._own_tracing.shutdown()  # flush the batched spans; a provider passed in is its owner's
        _log.info("svantic-grpc stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    @property
    def target(self) -> str:
        """``host:port`` a client on this machine dials."""
        return dial_address(self.settings.grpc_address, self.port)

    async def __aenter__(self) -> MeshServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop(grace=0)


def _refuse_an_unusable_database(store: Store) -> None:
    """Stop before opening a database file that is not where it was meant to be, or cannot be written.

    SQLite would create a missing directory, so a mistyped path would quietly start a new,
    empty database; and a place this user cannot write ends deep in start-up. Both are
    refused here, naming the settings key.
    """
    if isinstance(store, MemoryStore):
        return
    from svantic_grpc.stores.sqlite import SqliteStore  # already loaded: open_store made one

    if not isinstance(store, SqliteStore):
        return
    path = store.path.absolute()
    directory = path.parent
    if not directory.exists():
        raise SettingsError(
            f"store: directory {directory} does not exist; create it, or correct the path "
            "(a mistyped one would start a new, empty database)"
        )
    if not directory.is_dir():
        raise SettingsError(f"store: {directory} is not a directory")
    if path.is_dir():
        raise SettingsError(f"store: {path} is a directory, not a database file")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise SettingsError(f"store: {path} cannot be read and written by this user")
    try:  # a real write, not a look at permission bits: root, read-only mounts, immutable flags
        with tempfile.TemporaryFile(dir=directory):
            pass  # needed even when the file exists: SQLite keeps its write-ahead log beside it
    except OSError as exc:
        raise SettingsError(f"store: directory {directory} is not writable: {exc.strerror}") from None


def _hold_the_database(store: Store) -> IO[bytes] | None:
    """Lock a SQLite file for this server: a second server on the same file would take the first
    one's running work for a crash's leftovers (start-up recovery) and end it. The lock is on a
    companion file (``<file>.serving``), so the database itself is untouched; the system drops it
    when the process ends, even by ``kill -9``. Several servers share PostgreSQL, never a file."""
    from svantic_grpc.stores.sqlite import SqliteStore

    if not isinstance(store, SqliteStore):
        return None
    path = store.path.absolute()
    hold = open(path.with_name(path.name + ".serving"), "ab")  # noqa: SIM115 (held until stop)
    try:
        fcntl.flock(hold.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        hold.close()
        raise SettingsError(
            f"store: {path} is served by another svantic-grpc process (it holds {hold.name}); a SQLite "
            "file is one server's: stop that one, or run several replicas on PostgreSQL"
        ) from None
    return hold


def _server_options() -> list[tuple[str, int]]:
    # Not grpc.max_concurrent_streams per connection: measured, it cut another connection's wait
    # during a burst of 20,000 cheap streams (9.0 s -> 1.3 s) but made the bursting connection's own
    # later calls wait behind its queued streams (30 s instead of 0.1 s with 3,000 replaying streams),
    # and would leave calls waiting without an error on a connection shared by several tenants.
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
    ]


def _not_registered(service_name: str, method_handlers: Mapping[str, object]) -> None:
    """Drop a service's registration as grpc "registered methods" (its generic handler serves it)."""
