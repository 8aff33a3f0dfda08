"""Real ``a2a-sdk`` agents on loopback, for testing hosted dispatch.

``hosted_agents(mesh_channel, HostedAgent("echo", "echo-1"), ...)`` serves each
agent at its own path of one uvicorn server on ``127.0.0.1`` (a random port),
inside the running event loop, speaking A2A JSON-RPC with an agent card and
skills. An agent with ``binding=TransportProtocol.GRPC`` keeps its card at that
path but speaks the A2A gRPC binding on a grpc.aio server of its own (also
``127.0.0.1``, a random port), and only that interface is on its card.
Every agent verifies the dispatch token the mesh sends as ``Authorization:
Bearer`` (an HTTP header, or gRPC metadata): an EdDSA JWT checked with the
mesh's public key (``AuthService.GetDispatchKeys`` on ``mesh_channel``, as
``jwt.PyJWK``), with the audience its own instance id and the issuer the mesh.
A missing or bad token makes the agent reject the task. Each agent records
what it saw (``Seen``: claims, context id, text), the A2A methods called on it
the tasks it was asked to cancel and the client address of each JSON-RPC call, for
tests to assert on.

Kinds of agent (``HostedAgent.kind``):

- ``echo``: an artifact ``"echo: <text>"``, then completes.
- ``slow``: says it is working, sleeps ``slow_s``, honours cancel.
- ``error``: starts working, then raises ``RuntimeError``.
- ``crash``: raises ``RuntimeError`` (after checking the token) before sending any event.
- ``streaming``: two progress status updates, an artifact, completes with "all done".
- ``ask``: input-required ("What is your name?") on the first turn.
- ``json``: its skill declares ``application/json`` output but it answers text.

Lessons from the a2a-sdk 1.3 prototype that this module follows: the listening
socket is created with ``IPPROTO_TCP`` (else asyncio leaves Nagle on and each
response waits ~40 ms); uvicorn runs with ``log_config=None`` and
``lifespan="off"``; each request handler is closed (``aclose``) before uvicorn
stops, so parked and slow tasks end and open SSE streams close; an executor
never sends an event after its task reached a final state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import jwt
import uvicorn
from a2a.helpers import new_data_part, new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import (
    DefaultGrpcServerCallContextBuilder,
    DefaultRequestHandler,
    GrpcHandler,
    RequestHandler,
)
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Task,
    TaskState,
    a2a_pb2_grpc,
)
from a2a.utils.constants import TransportProtocol
from google.protobuf import json_format
from grpc import aio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from svantic_grpc.pb import agent_types_pb2, auth_service_pb2, auth_service_pb2_grpc, registry_service_pb2

__all__ = [
    "ISSUER",
    "KINDS",
    "AgentServer",
    "HostedAgent",
    "HostedAgents",
    "Seen",
    "SkillSpec",
    "closed_port_url",
    "hosted_agents",
    "serve_a2a",
    "serve_a2a_grpc",
]

ISSUER = "svantic-grpc"


@dataclass(frozen=True)
class SkillSpec:
    """A skill as the agent card and the registration declare it."""

    id: str
    name: str
    tags: tuple[str, ...]
    output_modes: tuple[str, ...] = ("text/plain",)
    description: str = ""


#: The default skill of each kind of agent. Tags are distinct words so skill
#: matching in tests is unambiguous.
KINDS: dict[str, SkillSpec] = {
    "echo": SkillSpec("echo", "Echo", ("echo", "repeat")),
    "slow": SkillSpec("slow-work", "Slow work", ("slow", "ponder")),
    "error": SkillSpec("explode", "Explode", ("explode", "crash")),
    "crash": SkillSpec("collapse", "Collapse", ("collapse", "keel")),
    "streaming": SkillSpec("report", "Report", ("report", "stream")),
    "ask": SkillSpec("ask-name", "Ask name", ("ask", "question")),
    "json": SkillSpec("json-report", "Json report", ("json",), ("application/json",)),
    "deep": SkillSpec("deep-data", "Deep data", ("deep", "nested"), ("application/json",)),
}


@dataclass(frozen=True)
class HostedAgent:
    """One agent to serve: its kind, instance id and agent type (default ``<kind>-agent``)."""

    kind: str
    instance_id: str
    agent_type: str = ""
    slow_s: float = 30.0
    """How long the ``slow`` kind works before it completes."""
    binding: str = TransportProtocol.JSONRPC
    """The A2A protocol binding it serves and its card advertises: JSON-RPC, gRPC or HTTP+JSON."""

    @property
    def type(self) -> str:
        return self.agent_type or f"{self.kind}-agent"


@dataclass(frozen=True)
class Seen:
    """One request an agent received, as it saw it."""

    instance_id: str
    text: str
    context_id: str
    task_id: str
    claims: dict[str, Any] | None
    """The verified dispatch token's claims; ``None`` when it was rejected."""
    token_error: str
    """Why the token was rejected; empty when it verified."""
    metadata: dict[str, Any]
    """The A2A message's metadata."""
    token: str
    """The raw bearer token (empty when none came)."""
    at: float
    traceparent: str = ""
    """The W3C ``traceparent`` header the dispatch came with (empty when none)."""


class _Keys:
    """The mesh's dispatch-token keys, fetched once from ``GetDispatchKeys``."""

    def __init__(self, channel: aio.Channel) -> None:
        self._stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        self._keys: dict[str, jwt.PyJWK] | None = None
        self.issuer = ""
        self._lock = asyncio.Lock()

    async def load(self) -> dict[str, jwt.PyJWK]:
        async with self._lock:
            if self._keys is None:
                response = await self._stub.GetDispatchKeys(auth_service_pb2.GetDispatchKeysRequest())
                jwks = json_format.MessageToDict(response.jwks)
                self._keys = {str(k.get("kid", "")): jwt.PyJWK(k) for k in jwks["keys"]}
                self.issuer = response.issuer
            return self._keys

    async def verify(self, token: str, audience: str) -> dict[str, Any]:
        keys = await self.load()
        kid = str(jwt.get_unverified_header(token).get("kid", ""))
        key = keys.get(kid)
        if key is None:
            raise jwt.InvalidKeyError(f"no dispatch key with kid {kid!r}")
        if self.issuer != ISSUER:
            raise jwt.InvalidIssuerError(f"the mesh says its issuer is {self.issuer!r}, not {ISSUER!r}")
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=["EdDSA"],
            audience=audience,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "aud", "iss"]},
        )
        return claims


class AgentServer(AgentExecutor):
    """One served agent: verifies tokens, records what it saw, then acts per its kind."""

    def __init__(self, spec: HostedAgent, keys: _Keys, url: str, interface_url: str = "") -> None:
        if spec.kind not in KINDS:
            raise ValueError(f"unknown agent kind {spec.kind!r}; kinds: {', '.join(KINDS)}")
        self.spec = spec
        self.url = url
        self.skill = KINDS[spec.kind]
        self._keys = keys
        self.seen: list[Seen] = []
        """Every request, in order, including rejected ones."""
        self.cancels: list[str] = []
        """Task ids the mesh asked to cancel."""
        self.cancelled_work = 0
        """Times a running ``execute`` was interrupted by cancellation."""
        self.methods: list[str] = []
        """A2A methods called on this agent, in order (``SendStreamingMessage``, ``CancelTask``...)."""
        self.peers: list[tuple[str, int]] = []
        """The client address (host, port) of each JSON-RPC call, in order: one port is one connection."""
        self.card = _card(spec, interface_url or url, self.skill)

    @property
    def instance_id(self) -> str:
        return self.spec.instance_id

    @property
    def agent_type(self) -> str:
        return self.spec.type

    @property
    def accepted(self) -> list[Seen]:
        """Requests whose token verified."""
        return [s for s in self.seen if s.claims is not None]

    def skills_pb(self) -> list[agent_types_pb2.AgentSkill]:
        s = self.skill
        return [
            agent_types_pb2.AgentSkill(
                id=s.id,
                name=s.name,
                description=s.description or f"{s.name} ({self.spec.kind} test agent)",
                tags=list(s.tags),
                output_modes=list(s.output_modes),
            )
        ]

    def registration(self, **fields: Any) -> registry_service_pb2.RegisterAgentRequest:
        """A RegisterAgentRequest for this agent (``fields`` override: url, max_concurrent_sessions...)."""
        request: dict[str, Any] = {
            "agent_type": self.agent_type,
            "instance_id": self.instance_id,
            "url": self.url,
            "deployment_mode": agent_types_pb2.DEPLOYMENT_MODE_HOSTED,
            "skills": self.skills_pb(),
        }
        request.update(fields)
        return registry_service_pb2.RegisterAgentRequest(**request)

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        first_turn = context.current_task is None
        task: Task | None = context.current_task
        if task is None:
            assert context.message is not None
            task = new_task_from_user_message(context.message)
        token = _bearer(context)
        claims, error = await self._check_token(token, context.context_id or "")
        self.seen.append(
            Seen(
                instance_id=self.instance_id,
                text=context.get_user_input(),
                context_id=context.context_id or "",
                task_id=task.id,
                claims=claims,
                token_error=error,
                metadata=json_format.MessageToDict(context.message.metadata) if context.message else {},
                token=token,
                at=time.time(),
                traceparent=(context.call_context.state.get("headers") or {}).get("traceparent", "")
                if context.call_context
                else "",
            )
        )
        if claims is not None and self.spec.kind == "crash":
            raise RuntimeError("agent crashed: out of memory")  # before its first event
        if first_turn:
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        if claims is None:
            await updater.reject(
                updater.new_agent_message([new_text_part(f"dispatch token rejected: {error}")])
            )
            return
        try:
            await self._act(context, updater, first_turn)
        except asyncio.CancelledError:
            self.cancelled_work += 1
            raise

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        # The framework calls this before cancelling the running execute().
        self.cancels.append(context.task_id or "")
        updater = TaskUpdater(event_queue, context.task_id or "", context.context_id or "")
        await updater.cancel(updater.new_agent_message([new_text_part("canceled on request")]))

    async def _check_token(self, token: str, context_id: str) -> tuple[dict[str, Any] | None, str]:
        """As the README tells a hosted agent: the mesh's signature, issuer, this instance as the
        audience, and the session the token names is the A2A context the call is in."""
        if not token:
            return None, "missing bearer token"
        try:
            claims = await self._keys.verify(token, self.instance_id)
        except jwt.PyJWTError as exc:
            return None, f"invalid token: {exc}"
        if claims.get("session_id") != context_id:
            return None, f"token is for session {claims.get('session_id')!r}, not context {context_id!r}"
        return claims, ""

    async def _act(self, context: RequestContext, updater: TaskUpdater, first_turn: bool) -> None:
        text = context.get_user_input()
        say = updater.new_agent_message
        kind = self.spec.kind
        if kind == "echo":
            await updater.add_artifact([new_text_part(f"echo: {text}")], name="echo")
            await updater.complete()
        elif kind == "slow":
            await updater.start_work(say([new_text_part("working slowly...")]))
            await asyncio.sleep(self.spec.slow_s)
            await updater.add_artifact([new_text_part("finally done")])
            await updater.complete()
        elif kind == "error":
            await updater.start_work()
            raise RuntimeError("agent blew up: database unavailable")
        elif kind == "streaming":
            for step in (1, 2):
                await updater.update_status(
                    TaskState.TASK_STATE_WORKING, message=say([new_text_part(f"progress {step}/2")])
                )
                if step == 1:
                    await updater.add_artifact([new_text_part(f"report on {text}")], name="report")
            await updater.complete(say([new_text_part("all done")]))
        elif kind == "ask":
            if first_turn:
                await updater.requires_input(say([new_text_part("What is your name?")]))
                return
            await updater.add_artifact([new_text_part(f"Nice to meet you, {text}")])
            await updater.complete()
        elif kind == "deep":  # a data part nested as many levels as the message's text says
            value: Any = "bottom"
            for _ in range(int(text) - 1):
                value = {"next": value}
            await updater.add_artifact([new_data_part({"next": value})], name="deep")
            await updater.complete()
        elif kind == "json":
            await updater.add_artifact([new_text_part("this is not json")], name="report")
            await updater.complete()


def _bearer(context: RequestContext) -> str:
    """The token of an ``Authorization: Bearer`` header (both bindings keep headers lower-case)."""
    headers: Mapping[str, str] = context.call_context.state.get("headers") or {}
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _card(spec: HostedAgent, interface_url: str, skill: SkillSpec) -> AgentCard:
    return AgentCard(
        name=spec.instance_id,
        description=f"{spec.kind} test agent ({spec.type})",
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url=interface_url, protocol_binding=spec.binding, protocol_version="1.0")
        ],
        capabilities=AgentCapabilities(streaming=True, push_notifications=False),
        default_input_modes=["text/plain"],
        default_output_modes=list(skill.output_modes),
        skills=[
            AgentSkill(
                id=skill.id,
                name=skill.name,
                description=skill.description or skill.name,
                tags=list(skill.tags),
                output_modes=list(skill.output_modes),
            )
        ],
    )


@dataclass
class HostedAgents:
    """The agents of one ``hosted_agents`` block, by instance id."""

    base_url: str
    agents: dict[str, AgentServer]
    handlers: list[DefaultRequestHandler] = field(default_factory=list)

    def __getitem__(self, instance_id: str) -> AgentServer:
        return self.agents[instance_id]

    def __iter__(self) -> Any:
        return iter(self.agents.values())

    @property
    def seen(self) -> list[Seen]:
        """Every request any agent saw, in time order."""
        return sorted((s for a in self.agents.values() for s in a.seen), key=lambda s: s.at)


class _RecordMethods:
    """ASGI middleware: notes each agent's JSON-RPC method names, then passes the request on unchanged."""

    def __init__(self, app: ASGIApp, agents: Mapping[str, AgentServer]) -> None:
        self.app = app
        self.agents = agents

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        agent = self.agents.get(str(scope.get("path", "")).strip("/"))
        if scope["type"] != "http" or scope["method"] != "POST" or agent is None:
            await self.app(scope, receive, send)
            return
        received: list[ASGIMessage] = []
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in received)
        host, port = scope.get("client") or ("", 0)
        agent.peers.append((str(host), int(port)))
        try:
            request = json.loads(body)
            agent.methods.append(str(request.get("method", "")) if isinstance(request, dict) else "")
        except ValueError:
            agent.methods.append("")
        replay = iter(received)

        async def replayed() -> ASGIMessage:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)


class _RecordGrpcMethods(aio.ServerInterceptor):  # type: ignore[misc]
    """gRPC interceptor: notes the A2A method of each call to one agent, then passes the call on."""

    def __init__(self, agents: Mapping[str, AgentServer], instance_id: str) -> None:
        self.agents = agents
        self.instance_id = instance_id

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # "/lf.a2a.v1.A2AService/SendStreamingMessage"
        self.agents[self.instance_id].methods.append(method.rpartition("/")[2])
        return await continuation(handler_call_details)


class _GrpcHeaders(DefaultGrpcServerCallContextBuilder):
    """Puts a gRPC call's metadata in ``state["headers"]``, where the JSON-RPC binding keeps headers.

    gRPC metadata keys are lower-case, like those headers, so one ``_bearer`` reads both bindings.
    """

    def build(self, context: aio.ServicerContext) -> ServerCallContext:
        call_context = super().build(context)
        metadata = context.invocation_metadata() or ()
        call_context.state["headers"] = {key: value for key, value in metadata if isinstance(value, str)}
        return call_context


def _grpc_server(*interceptors: aio.ServerInterceptor) -> tuple[aio.Server, str]:
    """A grpc.aio server bound to a random loopback port, not started, and its ``host:port`` target."""
    server = aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    return server, f"127.0.0.1:{port}"


def _listening_socket() -> socket.socket:
    # IPPROTO_TCP: asyncio sets TCP_NODELAY only on accepted sockets of that proto.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def closed_port_url(path: str = "gone") -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"


@contextlib.asynccontextmanager
async def hosted_agents(mesh_channel: aio.Channel, *specs: HostedAgent) -> AsyncIterator[HostedAgents]:
    """Serve ``specs`` on one loopback port.

    Each agent verifies dispatch tokens with the keys of the mesh behind ``mesh_channel``.
    """
    ids = [spec.instance_id for spec in specs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate instance ids in {ids}")
    keys = _Keys(mesh_channel)
    agents: dict[str, AgentServer] = {}
    grpc_servers: dict[str, aio.Server] = {}
    async with contextlib.AsyncExitStack() as stack:
        sock = _listening_socket()
        stack.callback(sock.close)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        for spec in specs:
            interface_url = ""  # JSON-RPC is served where the card is
            if spec.binding == TransportProtocol.HTTP_JSON:
                interface_url = f"{base}/{spec.instance_id}/rest"
            if spec.binding == TransportProtocol.GRPC:
                server, interface_url = _grpc_server(_RecordGrpcMethods(agents, spec.instance_id))
                stack.push_async_callback(server.stop, None)  # in case serving never starts
                grpc_servers[spec.instance_id] = server
            agents[spec.instance_id] = AgentServer(spec, keys, f"{base}/{spec.instance_id}", interface_url)
        entries = [(instance_id, agent, agent.card) for instance_id, agent in agents.items()]
        handlers = await stack.enter_async_context(
            serve_a2a(sock, entries, [Middleware(_RecordMethods, agents=agents)])
        )
        by_id = dict(zip(agents, handlers, strict=True))
        for instance_id, server in grpc_servers.items():
            await stack.enter_async_context(serve_a2a_grpc(server, by_id[instance_id]))
        yield HostedAgents(base, agents, handlers)


@contextlib.asynccontextmanager
async def serve_a2a(
    sock: socket.socket,
    entries: Iterable[tuple[str, AgentExecutor, AgentCard]],
    middleware: Sequence[Middleware] = (),
) -> AsyncIterator[list[DefaultRequestHandler]]:
    """Serve a2a-sdk agents with uvicorn in this loop: cards under ``/<name>``, and JSON-RPC there
    (HTTP+JSON under ``/<name>/rest`` for a card that offers it).

    A card without a JSON-RPC interface gets no JSON-RPC route; its handler (one per entry,
    in order) is for ``serve_a2a_grpc``.
    """
    handlers: list[DefaultRequestHandler] = []
    routes: list[BaseRoute] = []
    for name, executor, card in entries:
        handler = DefaultRequestHandler(
            agent_executor=executor, task_store=InMemoryTaskStore(), agent_card=card
        )
        handlers.append(handler)
        routes += create_agent_card_routes(card, card_url=f"/{name}/.well-known/agent-card.json")
        bindings = {i.protocol_binding for i in card.supported_interfaces}
        if TransportProtocol.JSONRPC in bindings:
            routes += create_jsonrpc_routes(handler, rpc_url=f"/{name}")
        if TransportProtocol.HTTP_JSON in bindings:
            # Mounted: a2a-sdk's REST routes end with a ``/{tenant}`` mount that ignores
            # ``path_prefix`` and would swallow the later agents' cards.
            routes.append(Mount(f"/{name}/rest", routes=create_rest_routes(handler)))
    config = uvicorn.Config(
        Starlette(routes=routes, middleware=list(middleware)),
        log_level="warning",
        log_config=None,  # leave the process's logging alone (pytest's caplog)
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(5):
            while not server.started:
                if serving.done():
                    serving.result()
                    raise RuntimeError("the agent server stopped before it started")
                await asyncio.sleep(0.005)
        yield handlers
    finally:
        # Parked (input-required) and slow tasks end, and their SSE streams close, before uvicorn stops.
        for handler in handlers:
            with contextlib.suppress(Exception):
                await handler.aclose()
        server.should_exit = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await serving
        if not serving.done():
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving
        sock.close()


@contextlib.asynccontextmanager
async def serve_a2a_grpc(server: aio.Server, handler: RequestHandler) -> AsyncIterator[None]:
    """Serve ``handler`` over the A2A gRPC binding on ``server`` (bound, not started) until exit.

    The handler's owner closes it (``serve_a2a`` does); calls still open when this exits are
    cancelled, so nothing waits on a slow or parked task.
    """
    servicer = GrpcHandler(handler, _GrpcHeaders())
    a2a_pb2_grpc.add_A2AServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    await server.start()
    try:
        yield
    finally:
        await server.stop(None)
