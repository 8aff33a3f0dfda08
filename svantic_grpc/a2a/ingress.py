"""The A2A ingress: the mesh's agent card and its A2A bindings, built with a2a-sdk's own routes.

One ``MeshRequestHandler`` serves every binding:

- JSON-RPC (A2A 1.0 with the ``A2A-Version`` header, and 0.3 ``message/send`` and
  friends without it) at ``/send`` (the product's path) and at ``/a2a/jsonrpc``;
- HTTP+JSON (REST) under ``/a2a/rest`` (0.3 under ``/a2a/rest/v1``);
- gRPC (``lf.a2a.v1.A2AService`` and 0.3's ``a2a.v1.A2AService``) on the mesh's gRPC
  server, behind its interceptor (token check, error mapping);
- the public card at ``/.well-known/agent-card.json`` and the extended card (the
  tenant's skills) through each binding's own call.

HTTP calls need ``Authorization: Bearer <mesh token>``; a missing or bad token is
HTTP 401 before anything is read, so no state changes.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from a2a.compat.v0_3 import a2a_v0_3_pb2, a2a_v0_3_pb2_grpc
from a2a.compat.v0_3.grpc_handler import CompatGrpcHandler
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import DefaultGrpcServerCallContextBuilder, GrpcHandler
from a2a.server.routes import DefaultServerCallContextBuilder, create_agent_card_routes, create_rest_routes
from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
    a2a_pb2,
    a2a_pb2_grpc,
)
from a2a.utils.constants import PROTOCOL_VERSION_0_3, PROTOCOL_VERSION_1_0, TransportProtocol
from grpc import aio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from svantic_grpc.a2a.handler import CALLER, SESSION_HINT, MeshRequestHandler
from svantic_grpc.api._context import current_caller
from svantic_grpc.core.errors import MeshError, Unauthenticated
from svantic_grpc.core.mesh import Mesh

__all__ = ["JSONRPC_PATHS", "REST_PREFIX", "A2AIngress"]

JSONRPC_PATHS = ("/send", "/a2a/jsonrpc")
REST_PREFIX = "/a2a/rest"
_SCHEME = "bearer"

Endpoint = Callable[[Request], Awaitable[Response]]


class A2AIngress:
    """The mesh as an A2A agent, on the HTTP app's routes and the gRPC server.

    Args:
        mesh: The core.
        http_base_url: Where the HTTP routes are reached, e.g. ``http://127.0.0.1:8080``
            (settable later, once the port is bound).
        grpc_target: ``host:port`` of the gRPC server (settable later).
    """

    def __init__(self, mesh: Mesh, *, http_base_url: str = "", grpc_target: str = "") -> None:
        self.mesh = mesh
        self.http_base_url = http_base_url.rstrip("/")
        self.grpc_target = grpc_target
        self.handler = MeshRequestHandler(mesh, self.card)

    def card(self) -> AgentCard:
        """The public agent card: the mesh, its bindings and its security scheme."""
        base = self.http_base_url
        interfaces = [
            AgentInterface(
                url=f"{base}{JSONRPC_PATHS[1]}",
                protocol_binding=TransportProtocol.JSONRPC,
                protocol_version=PROTOCOL_VERSION_1_0,
            ),
            AgentInterface(
                url=f"{base}{REST_PREFIX}",
                protocol_binding=TransportProtocol.HTTP_JSON,
                protocol_version=PROTOCOL_VERSION_1_0,
            ),
            AgentInterface(
                url=f"{base}{JSONRPC_PATHS[0]}",
                protocol_binding=TransportProtocol.JSONRPC,
                protocol_version=PROTOCOL_VERSION_0_3,
            ),
        ]
        if self.grpc_target:
            for version in (PROTOCOL_VERSION_1_0, PROTOCOL_VERSION_0_3):
                interfaces.append(
                    AgentInterface(
                        url=self.grpc_target,
                        protocol_binding=TransportProtocol.GRPC,
                        protocol_version=version,
                    )
                )
        return AgentCard(
            name="svantic mesh",
            description=(
                "An agent mesh: each message runs in a session, routed by the session's orchestrator to "
                "the registered agent that should handle it, pausing as input-required when a human must "
                "answer. Send configuration.sessionId (or contextId) to use a session; without one a new "
                "session is opened and returned as contextId."
            ),
            version="1.0",
            supported_interfaces=interfaces,
            capabilities=AgentCapabilities(
                streaming=True, push_notifications=False, extended_agent_card=True
            ),
            security_schemes={
                _SCHEME: SecurityScheme(
                    http_auth_security_scheme=HTTPAuthSecurityScheme(
                        scheme="Bearer",
                        bearer_format="JWT",
                        description="the mesh's own token (AuthService.GetToken): same scopes and tenancy",
                    )
                )
            },
            security_requirements=[SecurityRequirement(schemes={_SCHEME: StringList(list=[])})],
            default_input_modes=["text/plain", "application/json"],
            default_output_modes=["text/plain", "application/json"],
            skills=[
                AgentSkill(
                    id="mesh",
                    name="mesh",
                    description="Routes each message to the agent that should handle it.",
                    tags=["mesh", "router"],
                )
            ],
        )

    def routes(self) -> list[BaseRoute]:
        """Starlette routes: the card, JSON-RPC at ``/send`` and ``/a2a/jsonrpc``, and REST."""

        async def current_card(_: AgentCard) -> AgentCard:
            return self.card()

        routes: list[BaseRoute] = list(create_agent_card_routes(self.card(), card_modifier=current_card))
        builder = _HttpContext()
        dispatcher = JsonRpcDispatcher(self.handler, context_builder=builder, enable_v0_3_compat=True)
        for path in JSONRPC_PATHS:
            routes.append(Route(path, self._authenticated(dispatcher.handle_requests), methods=["POST"]))
        for route in create_rest_routes(
            self.handler, context_builder=builder, enable_v0_3_compat=True, path_prefix=REST_PREFIX
        ):
            # The SDK also mounts every route under "/{tenant}", which would shadow the other apps'
            # routes; tenancy comes from the token here.
            if isinstance(route, Route):
                routes.append(
                    Route(
                        route.path, self._authenticated(route.endpoint), methods=sorted(route.methods or ())
                    )
                )
        return routes

    def add_to(self, server: aio.Server) -> tuple[str, ...]:
        """Serve the gRPC bindings (1.0 and 0.3) on ``server``; returns their service names."""
        builder = _GrpcContext()
        a2a_pb2_grpc.add_A2AServiceServicer_to_server(GrpcHandler(self.handler, builder), server)  # type: ignore[no-untyped-call]
        a2a_v0_3_pb2_grpc.add_A2AServiceServicer_to_server(CompatGrpcHandler(self.handler, builder), server)  # type: ignore[no-untyped-call]
        return (
            a2a_pb2.DESCRIPTOR.services_by_name["A2AService"].full_name,
            a2a_v0_3_pb2.DESCRIPTOR.services_by_name["A2AService"].full_name,
        )

    def _authenticated(self, endpoint: Any) -> Endpoint:
        issuer = self.mesh.tokens

        async def call(request: Request) -> Response:
            try:
                caller = issuer.verify(_bearer(request.headers.get("authorization")))
            except MeshError as error:
                return JSONResponse(
                    {"error": {"code": 401, "reason": error.reason, "message": error.message}},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="svantic"'},
                )
            request.scope[CALLER] = caller
            if request.method == "POST":
                request.scope[SESSION_HINT] = _session_hint(await request.body())
            return await endpoint(request)  # type: ignore[no-any-return]

        return call


class _HttpContext(DefaultServerCallContextBuilder):
    """Carries the verified caller and ``configuration.sessionId`` into the handler."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        context.state[CALLER] = request.scope.get(CALLER)
        context.state[SESSION_HINT] = request.scope.get(SESSION_HINT)
        return context


class _GrpcContext(DefaultGrpcServerCallContextBuilder):
    """The caller the mesh's interceptor verified for this call."""

    def build(self, context: grpc.aio.ServicerContext) -> ServerCallContext:
        server_context = super().build(context)
        server_context.state[CALLER] = current_caller()
        return server_context


def _bearer(header: str | None) -> str:
    if not header:
        raise Unauthenticated(
            "this call needs an 'Authorization: Bearer <token>' header (AuthService.GetToken gives one)",
            reason="NO_TOKEN",
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'", reason="MALFORMED_AUTH")
    return token.strip()


def _session_hint(body: bytes) -> str | None:
    """``configuration.sessionId`` of a JSON-RPC (``params.configuration``) or REST body, if any.

    Neither A2A version has this field (the product's documentation uses it), so the
    SDK's parsers drop it; it is read here from the raw body. A body that is not JSON is
    left for the binding to refuse with its own error.
    """
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    params = parsed.get("params")
    holder = params if isinstance(params, dict) else parsed
    configuration = holder.get("configuration")
    if isinstance(configuration, dict):
        session_id = configuration.get("sessionId", configuration.get("session_id"))
        if isinstance(session_id, str) and session_id:
            return session_id
    return None
