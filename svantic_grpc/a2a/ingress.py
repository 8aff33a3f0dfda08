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

import base64
import binascii
import inspect
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
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
from a2a.utils.error_handlers import rest_error_handler
from a2a.utils.errors import A2AError
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from grpc import aio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from svantic_grpc import _json
from svantic_grpc.a2a.errors import to_a2a_error
from svantic_grpc.a2a.handler import CALLER, SESSION_HINT, MeshRequestHandler
from svantic_grpc.api._context import current_caller
from svantic_grpc.core._validate import MAX_JSON_DEPTH
from svantic_grpc.core.auth import Scope
from svantic_grpc.core.errors import InvalidArgument, MeshError, Unauthenticated
from svantic_grpc.core.mesh import Mesh

__all__ = ["JSONRPC_PATHS", "REST_PREFIX", "A2AIngress"]

JSONRPC_PATHS = ("/send", "/a2a/jsonrpc")
REST_PREFIX = "/a2a/rest"
_SCHEME = "bearer"

Endpoint = Callable[[Request], Awaitable[Response]]

_SDK_LOGGERS = (
    "a2a.server.routes.jsonrpc_dispatcher",
    "a2a.compat.v0_3.jsonrpc_adapter",
    "a2a.utils.error_handlers",
)
"""a2a-sdk's request routes the mesh mounts: they log every refused request themselves."""
_BAD_INPUT = frozenset(
    {
        "Failed to validate base JSON-RPC request",
        "Failed to validate base JSON-RPC request for v0.3",
        "Failed to parse request params",
    }
)
"""What they log at ERROR, with a traceback, about a body the client got wrong."""


class _ClientErrorsAtDebug(logging.Filter):
    """A request the client got wrong is answered with the protocol's error; a2a-sdk also logs it,
    at WARNING (with the client's data) or at ERROR with a traceback, once per request: any caller
    with a token could fill the log and trip alerts. Those lines go out at DEBUG, without the
    traceback; an internal error (JSON-RPC -32603, an unhandled exception) stays an ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        client_error = record.levelno == logging.WARNING or (
            record.levelno == logging.ERROR and record.msg in _BAD_INPUT
        )
        if not client_error:
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return True


def _task_id_whole(path: str) -> tuple[str, bool]:
    """A REST route of one task with its ``{id}`` taking the rest of the path, and whether it was
    changed: a task id may hold ``/`` (a message id sent over gRPC, ``core._validate.check_id``),
    which a client sends as it is or as ``%2F`` and the router sees as a ``/`` either way. The push
    configuration routes keep theirs (``{id}`` then more path)."""
    if "/tasks/{id}" not in path or "pushNotificationConfigs" in path:
        return path, False
    return path.replace("{id}", "{id:path}"), True


def _quiet_client_errors() -> None:
    for name in _SDK_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ClientErrorsAtDebug) for f in logger.filters):
            logger.addFilter(_ClientErrorsAtDebug())


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
            AgentInterface(  # a 0.3 client adds /v1/... to it
                url=f"{base}{REST_PREFIX}",
                protocol_binding=TransportProtocol.HTTP_JSON,
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

        _quiet_client_errors()
        routes: list[BaseRoute] = list(create_agent_card_routes(self.card(), card_modifier=current_card))
        builder = _HttpContext()
        dispatcher = JsonRpcDispatcher(self.handler, context_builder=builder, enable_v0_3_compat=True)
        for path in JSONRPC_PATHS:
            routes.append(Route(path, self._authenticated(dispatcher.handle_requests), methods=["POST"]))
        by_task: list[BaseRoute] = []
        for route in create_rest_routes(
            self.handler, context_builder=builder, enable_v0_3_compat=True, path_prefix=REST_PREFIX
        ):
            # The SDK also mounts every route under "/{tenant}", which would shadow the other apps'
            # routes; tenancy comes from the token here.
            if isinstance(route, Route):
                path, whole = _task_id_whole(route.path)
                endpoint = route.endpoint
                if path.endswith((":stream", ":subscribe")):
                    endpoint = _refused_before_streaming(endpoint)
                writes = path.endswith((":send", ":stream", ":cancel"))  # the core checks again
                (by_task if whole else routes).append(
                    Route(
                        path,
                        self._authenticated(endpoint, needs=Scope.FULL if writes else None),
                        methods=sorted(route.methods or ()),
                    )
                )
        # After every other route (push configurations, the task list), in the SDK's order (a task's
        # ``:cancel`` and ``:subscribe`` before the task itself).
        return routes + by_task

    def add_to(self, server: aio.Server) -> tuple[str, ...]:
        """Serve the gRPC bindings (1.0 and 0.3) on ``server``; returns their service names."""
        builder = _GrpcContext()
        a2a_pb2_grpc.add_A2AServiceServicer_to_server(_GrpcBinding(self.handler, builder), server)  # type: ignore[no-untyped-call]
        a2a_v0_3_pb2_grpc.add_A2AServiceServicer_to_server(
            _CheckedCompatHandler(self.handler, builder), server
        )  # type: ignore[no-untyped-call]
        return (
            a2a_pb2.DESCRIPTOR.services_by_name["A2AService"].full_name,
            a2a_v0_3_pb2.DESCRIPTOR.services_by_name["A2AService"].full_name,
        )

    def _authenticated(self, endpoint: Any, *, needs: Scope | None = None) -> Endpoint:
        """``endpoint`` for a caller with a valid token (and, over REST, ``needs``: a token without
        that scope is 403 before the SDK reads the request, which would answer 400)."""
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
            if needs is not None:
                try:
                    caller.require(needs)
                except MeshError as error:
                    return await _rest_error(to_a2a_error(error))
            if request.method == "POST":
                try:
                    parsed = _read_body(await request.body())
                    _check_version_of_method(request, parsed)
                except _BadBody as bad:
                    return _refused(request, bad)
                request.scope[SESSION_HINT] = _session_hint(parsed)
            elif "status" in request.query_params:  # REST ListTasks
                try:
                    _check_task_state("status", request.query_params["status"])
                except _BadBody as bad:
                    return _refused(request, bad)
            return await endpoint(request)  # type: ignore[no-any-return]

        return call


def _refused_before_streaming(endpoint: Any) -> Endpoint:
    """``endpoint`` (a REST stream) with its first event taken before the response starts, so a
    refusal (an unknown task, a body the SDK cannot read) is the binding's error with its status
    instead of a ``200 text/event-stream`` cut off at once. The 1.0 binding does this itself;
    a2a-sdk's 0.3 REST adapter does not."""

    async def call(request: Request) -> Response:
        response = await endpoint(request)
        events = getattr(response, "body_iterator", None)
        if not inspect.isasyncgen(events):
            return response  # type: ignore[no-any-return]
        try:
            first = await anext(events)
        except StopAsyncIteration:
            return response  # type: ignore[no-any-return]
        except Exception as error:  # what the SDK maps to its REST errors, as before a stream
            return await _rest_error(error)

        async def rest() -> AsyncIterator[Any]:
            yield first
            async for event in events:
                yield event

        response.body_iterator = rest()
        return response  # type: ignore[no-any-return]

    return call


async def _rest_error(error: Exception) -> Response:
    """The REST binding's answer to ``error``: the SDK's own mapping of its errors, with a token
    that lacks the scope told 403 ``PERMISSION_DENIED``."""
    if _missing_scope(error):
        message = getattr(error, "message", str(error))
        body = {"code": 403, "status": "PERMISSION_DENIED", "message": message, "reason": "MISSING_SCOPE"}
        return JSONResponse({"error": body}, status_code=403)
    return await _sdk_rest_error(error)


@rest_error_handler
async def _sdk_rest_error(error: Exception) -> Response:
    raise error


def _missing_scope(error: Any) -> bool:
    """Whether an A2A error says the token lacks a scope (``to_a2a_error`` keeps the core's reason):
    A2A has no error of its own for it, so each binding shows it as its own "permission denied"."""
    data = getattr(error, "data", None)
    return isinstance(data, dict) and data.get("reason") == "MISSING_SCOPE"


class _GrpcBinding(GrpcHandler):
    """a2a-sdk's A2A 1.0 gRPC binding, with a token that lacks the scope told PERMISSION_DENIED (as
    on the mesh's own services) instead of the INVALID_ARGUMENT its request error maps to."""

    async def abort_context(self, error: A2AError, context: grpc.aio.ServicerContext) -> None:
        if _missing_scope(error):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, error.message)
        await super().abort_context(error, context)


class _CheckedCompatHandler(CompatGrpcHandler):
    """A2A 0.3 over gRPC, with what is sent checked first: a2a-sdk's 0.3 conversion fails on a
    number JSON cannot hold (NaN, an infinity in a data part or metadata) or file bytes that are
    not base64 text, and the client would get INTERNAL; here it is INVALID_ARGUMENT naming the
    field, as on every other door. A missing scope is PERMISSION_DENIED, as on 1.0."""

    async def abort_context(self, error: Any, context: grpc.aio.ServicerContext) -> None:
        if _missing_scope(error):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, error.message)
        await super().abort_context(error, context)

    async def SendMessage(
        self, request: a2a_v0_3_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> a2a_v0_3_pb2.SendMessageResponse:
        _check_0_3(request)
        return await super().SendMessage(request, context)

    async def SendStreamingMessage(
        self, request: a2a_v0_3_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[a2a_v0_3_pb2.StreamResponse]:
        _check_0_3(request)
        async for response in super().SendStreamingMessage(request, context):
            yield response


def _check_0_3(request: a2a_v0_3_pb2.SendMessageRequest) -> None:
    _check_numbers(request, "")
    for index, part in enumerate(request.request.content):
        if part.HasField("file") and part.file.HasField("file_with_bytes"):
            try:  # 0.3 carries a file's contents as base64 text in a bytes field
                base64.b64decode(part.file.file_with_bytes.decode("ascii"), validate=True)
            except (UnicodeDecodeError, binascii.Error, ValueError):
                field = f"request.content[{index}].file.file_with_bytes"
                raise InvalidArgument(field, "must be base64 text") from None


def _check_numbers(message: Message, path: str) -> None:
    """Every ``google.protobuf.Value`` number in ``message`` is finite; else InvalidArgument naming it."""
    if isinstance(message, struct_pb2.Value):
        kind = message.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(message.number_value):
            raise InvalidArgument(path, "numbers must be finite (JSON has no NaN or Infinity)")
        if kind == "struct_value":
            _check_numbers(message.struct_value, path)
        elif kind == "list_value":
            for index, item in enumerate(message.list_value.values):
                _check_numbers(item, f"{path}[{index}]")
    elif isinstance(message, struct_pb2.Struct):
        for key, item in message.fields.items():
            _check_numbers(item, f"{path}.{key}")
    else:
        _check_numbers_in(message, path)


def _check_numbers_in(message: Message, path: str) -> None:
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        where = f"{path}.{field.name}" if path else field.name
        if field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, Message):
                    _check_numbers(item, f"{where}.{key}")
        elif isinstance(value, Message):
            _check_numbers(value, where)
        else:
            for index, item in enumerate(value):
                _check_numbers(item, f"{where}[{index}]")


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


_BODY_DEPTH = MAX_JSON_DEPTH + 8
"""How deep a request body may nest: a data part's own limit plus the envelope around it
(``params.message.parts[i].data``, with room to spare)."""


class _BadBody(Exception):
    """A request body the mesh refuses before the SDK reads it: ``parse`` (not JSON at all) or not."""

    request_id: str | int | None = None
    """The JSON-RPC request's id, when the body was a request the mesh could read."""
    code: int | None = None
    """The JSON-RPC error code, when not -32700 / -32602."""

    def __init__(self, message: str, *, parse: bool, field: str = "") -> None:
        super().__init__(message)
        self.parse = parse
        self.field = field


def _read_body(body: bytes) -> Any:
    """The body as strict JSON (what the gRPC API accepts: nesting bounded, integers within 64
    bits, no NaN), with file contents that are base64; ``None`` for an empty body (a REST call
    without one). Refused here, a bad body gets the binding's own error instead of an SDK
    failure reported as an internal error (or, nested 100,000 deep, an HTTP 500)."""
    if not body:
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadBody(f"the body is not UTF-8 text ({exc.reason} at byte {exc.start})", parse=True) from None
    try:
        parsed = _json.loads(text, max_depth=_BODY_DEPTH)
    except _json.JsonTextError as exc:
        unparsable = str(exc).startswith(("is not valid JSON", "nests"))
        raise _BadBody(f"the body {exc}", parse=unparsable) from None
    try:
        _check_files(parsed)
        _check_history_lengths(parsed)
        holder = parsed.get("params") if isinstance(parsed, dict) else None
        if isinstance(holder, dict) and "status" in holder:  # JSON-RPC ListTasks
            _check_task_state("status", holder["status"])
    except _BadBody as bad:
        if isinstance(parsed, dict) and isinstance(parsed.get("id"), str | int):
            bad.request_id = parsed["id"]  # a well-formed request's error names it
        raise
    return parsed


_INT32 = 2**31
"""``historyLength`` is an int32 in A2A's protobuf: a larger one fails a2a-sdk's conversion."""


def _check_history_lengths(parsed: Any) -> None:
    holder = parsed.get("params", parsed) if isinstance(parsed, dict) else None
    if not isinstance(holder, dict):
        return
    configuration = holder.get("configuration")
    for field, value in (
        ("historyLength", holder.get("historyLength")),
        (
            "configuration.historyLength",
            configuration.get("historyLength") if isinstance(configuration, dict) else None,
        ),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value >= _INT32:
            raise _BadBody(f"{field}: must be below {_INT32}", parse=False, field=field)


def _check_version_of_method(request: Request, parsed: Any) -> None:
    """A JSON-RPC method of A2A 0.3 (``tasks/get``) sent with ``A2A-Version: 1.0`` is the client's
    mistake, named (-32601) rather than left to a2a-sdk's 0.3 handler (-32603, an internal error)."""
    if request.url.path.startswith(REST_PREFIX) or not isinstance(parsed, dict):
        return
    method = parsed.get("method")
    version = request.headers.get("a2a-version", "").strip()
    if isinstance(method, str) and "/" in method and version and not version.startswith("0."):
        bad = _BadBody(
            f"method {method!r} is A2A 0.3; with 'A2A-Version: {version}' call its {version} name "
            "(SendMessage, SendStreamingMessage, GetTask, CancelTask, SubscribeToTask, ListTasks), "
            "or send no A2A-Version header for 0.3",
            parse=False,
            field="method",
        )
        bad.code = -32601
        if isinstance(parsed.get("id"), str | int):
            bad.request_id = parsed["id"]
        raise bad


_TASK_STATES = frozenset(
    (*a2a_pb2.TaskState.keys(), *(str(n) for n in a2a_pb2.TaskState.values()), *a2a_pb2.TaskState.values())
)
"""What a ``status`` filter may be: a ``TaskState`` by name or number (protobuf's JSON takes both)."""


def _check_task_state(field: str, value: Any) -> None:
    """A filter by a state A2A does not have is refused naming it: protobuf's JSON parsing, as
    a2a-sdk runs it, would read it as no filter and list every task."""
    if value is None or isinstance(value, bool) or value not in _TASK_STATES:
        raise _BadBody(
            f"{field}: {value!r} is not a task state (one of {', '.join(a2a_pb2.TaskState.keys()[1:])})",
            parse=False,
            field=field,
        )


def _check_files(parsed: Any) -> None:
    """File contents (``raw`` in 1.0, ``file.bytes`` in 0.3) must be base64."""
    holder = parsed.get("params", parsed) if isinstance(parsed, dict) else None
    message = holder.get("message") if isinstance(holder, dict) else None
    parts = message.get("parts") if isinstance(message, dict) else None
    if not isinstance(parts, list):
        return
    for index, part in enumerate(parts):
        if not isinstance(part, dict):
            continue
        file = part.get("file")
        for field, value in (
            (f"message.parts[{index}].raw", part.get("raw")),
            (f"message.parts[{index}].file.bytes", file.get("bytes") if isinstance(file, dict) else None),
        ):
            if isinstance(value, str):
                try:
                    base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise _BadBody(f"{field}: is not base64", parse=False, field=field) from None


def _refused(request: Request, bad: _BadBody) -> Response:
    """A body refused before the SDK read it, as the binding answers bad input: JSON-RPC's parse
    error (-32700) or invalid params (-32602), or REST's 400 ``INVALID_ARGUMENT``."""
    if request.url.path.startswith(REST_PREFIX):
        return JSONResponse(
            {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": str(bad)}}, status_code=400
        )
    code = bad.code or (-32700 if bad.parse else -32602)
    error: dict[str, Any] = {"code": code, "message": str(bad)}
    if bad.field:
        error["data"] = {"field": bad.field}
    return JSONResponse({"jsonrpc": "2.0", "id": bad.request_id, "error": error})


def _session_hint(parsed: Any) -> str | None:
    """``configuration.sessionId`` of a JSON-RPC (``params.configuration``) or REST body, if any.

    Neither A2A version has this field (the product's documentation uses it), so the
    SDK's parsers drop it; it is read here from the parsed body.
    """
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
