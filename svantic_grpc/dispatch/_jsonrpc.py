"""a2a-sdk's JSON-RPC client transport, with its streaming call carried by aiohttp directly.

Every hosted message is one ``SendStreamingMessage`` call. In a2a-sdk's ``JsonRpcTransport``
that call goes through httpx (request building, its cookie jar, its response and line
iterators) over ``httpx-aiohttp``, then a2a-sdk's SSE helpers, about a dozen async
generators per event: ~1 ms of the mesh's CPU per message more than the bytes need
(``bench/hosted_ab.py``). ``StreamingJsonRpcTransport`` is that transport with this one
method written over aiohttp's public client: the same JSON-RPC request, the same headers,
each SSE event parsed into a2a-sdk's ``StreamResponse`` (``_protojson``: what a2a-sdk's own
parser gives, at a fraction of its cost), and the same errors (a2a-sdk's classes, an agent's
JSON-RPC error mapped by a2a-sdk's code table).
Every other call (cancel, get task, ...) is a2a-sdk's own, over httpx. The mesh registers it
for JSON-RPC agents with ``ClientFactory.register``, a2a-sdk's seam for client transports,
and keeps a2a-sdk's ``Client`` above it.

The mesh's own dispatches skip the protobuf request and the ``Client`` layers too: the producer
(``JsonRpcProducer``) keeps the transport it made for an agent that streams (``take``), and the
mesh hands its ``stream`` the request's ProtoJSON, built as JSON from the mesh's message. The
``Client`` adds nothing to that call with the mesh's configuration (no interceptors, polling,
push notifications or output modes); an interface with a tenant goes through the ``Client``.

Errors keep the cause the mesh's fail-over rule reads: a connection never made (refused,
unreachable, timed out connecting) is an ``aiohttp.ClientConnectorError`` or
``aiohttp.ConnectionTimeoutError`` under ``A2AClientError``; anything later is not.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any
from uuid import uuid4

import aiohttp
import httpx
from a2a.client import A2AClientError, A2AClientTimeoutError, ClientCallContext, ClientConfig
from a2a.client.transports import ClientTransport, JsonRpcTransport
from a2a.compat.v0_3.jsonrpc_transport import CompatJsonRpcTransport
from a2a.compat.v0_3.versions import is_legacy_version
from a2a.types import AgentCard, SendMessageRequest, StreamResponse
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER, TransportProtocol
from a2a.utils.errors import JSON_RPC_ERROR_CODE_MAP
from google.protobuf import json_format

from svantic_grpc.dispatch._protojson import parse

__all__ = ["JsonRpcProducer", "StreamingJsonRpcTransport"]

_ERRORS = {code: error for error, code in JSON_RPC_ERROR_CODE_MAP.items()}
_ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_HEADERS = {
    "Accept": "text/event-stream",
    "Cache-Control": "no-store",
    "Content-Type": "application/json",
    VERSION_HEADER: PROTOCOL_VERSION_CURRENT,
}


class StreamingJsonRpcTransport(JsonRpcTransport):
    """``JsonRpcTransport`` whose ``send_message_streaming`` speaks over an aiohttp session.

    Args:
        httpx_client: For every other call, as in ``JsonRpcTransport`` (shared: never closed here).
        session: Returns the aiohttp session the streaming calls use (made in the event loop).
        timeout: Connect and read timeouts of a streaming call.
    """

    def __init__(
        self,
        httpx_client: httpx.AsyncClient,
        agent_card: AgentCard,
        url: str,
        *,
        session: Callable[[], aiohttp.ClientSession],
        timeout: aiohttp.ClientTimeout,
    ) -> None:
        super().__init__(httpx_client, agent_card, url, is_shared_httpx=True)
        self._session = session
        self._timeout = timeout

    def send_message_streaming(
        self, request: SendMessageRequest, *, context: ClientCallContext | None = None
    ) -> AsyncGenerator[StreamResponse]:
        """The agent's events for ``request`` as they come, to the end of its stream."""
        headers = context.service_parameters if context is not None else None
        limit = context.timeout if context is not None else None
        return self.stream(json_format.MessageToDict(request), headers=headers, timeout_s=limit)

    async def stream(
        self,
        params: dict[str, Any],
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[StreamResponse]:
        """``SendStreamingMessage`` with ``params`` (a ``SendMessageRequest`` as ProtoJSON) and
        ``headers`` besides the protocol's: the agent's events as they come, to the end of its
        stream. ``timeout_s`` bounds each phase (connect, each read) instead of the transport's
        timeouts, as a ``ClientCallContext.timeout`` does in a2a-sdk."""
        payload = {"jsonrpc": "2.0", "id": str(uuid4()), "method": "SendStreamingMessage", "params": params}
        body = _encode(payload).encode()
        sent = {**_HEADERS, **headers} if headers else _HEADERS
        timeout = self._timeout
        if timeout_s is not None:  # each phase, as a2a-sdk's httpx.Timeout(timeout)
            timeout = aiohttp.ClientTimeout(connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s)
        session = self._session()
        if session.closed:
            raise A2AClientError("HTTP client is closed")
        try:
            # No redirect is followed (as a2a-sdk's httpx client does not): a redirect is an error.
            call = session.post(self.url, data=body, headers=sent, timeout=timeout, allow_redirects=False)
            async with call as response:
                if response.status >= 300:
                    text = await response.text(errors="replace")
                    raise A2AClientError(f"HTTP Error {response.status}: {text[:500]}")
                if "text/event-stream" not in response.headers.get("Content-Type", ""):
                    yield _result(await response.read())  # e.g. a JSON-RPC error answered at once
                    return
                async for event, data in _events(response.content):
                    if event == "error":
                        raise _sse_error(data)
                    yield _result(data)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise A2AClientTimeoutError("Client Request timed out") from exc
        except aiohttp.ClientError as exc:
            raise A2AClientError(f"Network communication error: {exc}") from exc


class JsonRpcProducer:
    """A ``ClientFactory`` producer for JSON-RPC: ``StreamingJsonRpcTransport``, or a2a-sdk's
    own 0.3 transport for an agent whose interface speaks that older protocol version.

    Args:
        httpx_client: For every call but the streaming one (shared: never closed here).
        session: Returns the aiohttp session the streaming calls use (made in the event loop).
        timeout: Connect and read timeouts of a streaming call.
    """

    def __init__(
        self,
        httpx_client: httpx.AsyncClient,
        session: Callable[[], aiohttp.ClientSession],
        timeout: aiohttp.ClientTimeout,
    ) -> None:
        self._httpx_client = httpx_client
        self._session = session
        self._timeout = timeout
        self._made: StreamingJsonRpcTransport | None = None

    def __call__(self, card: AgentCard, url: str, config: ClientConfig) -> ClientTransport:
        interfaces = [
            interface
            for interface in card.supported_interfaces
            if interface.protocol_binding == TransportProtocol.JSONRPC and interface.url == url
        ]
        if interfaces and is_legacy_version(interfaces[0].protocol_version):
            self._made = None
            return CompatJsonRpcTransport(self._httpx_client, card, url, is_shared_httpx=True)
        transport = StreamingJsonRpcTransport(
            self._httpx_client, card, url, session=self._session, timeout=self._timeout
        )
        streams = config.streaming and card.capabilities.streaming
        self._made = transport if streams and not any(i.tenant for i in interfaces) else None
        return transport

    def take(self) -> StreamingJsonRpcTransport | None:
        """The transport the last call made, if the mesh may call its ``stream`` directly (the
        agent streams, over 1.0, with no tenant); ``None`` otherwise. Once per transport."""
        made, self._made = self._made, None
        return made


async def _events(content: aiohttp.StreamReader) -> AsyncGenerator[tuple[str, bytes]]:
    """Server-sent events as (event name, data): lines end with LF or CRLF, a blank line ends an
    event, ``:`` starts a comment; events with empty data are skipped (as a2a-sdk does)."""
    pending = bytearray()
    name = "message"
    data: list[bytes] = []
    async for chunk in content.iter_any():
        pending += chunk
        end = pending.rfind(b"\n")
        if end < 0:
            continue
        lines = bytes(pending[:end]).split(b"\n")
        del pending[: end + 1]
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if any(data):
                    yield name, b"\n".join(data)
                name, data = "message", []
                continue
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                name = value.decode(errors="replace")
    if any(data):  # a stream that ends without the last blank line
        yield name, b"\n".join(data)


def _result(data: bytes) -> StreamResponse:
    """One JSON-RPC response's result as a2a-sdk's ``StreamResponse``; its error raised as the
    A2A error its code maps to."""
    try:
        response = json.loads(data.decode())  # SSE is UTF-8: no encoding to detect
    except ValueError as exc:
        raise A2AClientError(f"Invalid JSON-RPC response in SSE stream: {exc}") from exc
    if not isinstance(response, dict):
        raise A2AClientError(f"Invalid JSON-RPC response: expected an object, got {type(response).__name__}")
    error = response.get("error")
    if error:
        if not isinstance(error, dict):
            raise A2AClientError(f"Invalid JSON-RPC response: error is not an object: {error!r}")
        raise _rpc_error(error)
    if "result" not in response:
        raise A2AClientError("Invalid JSON-RPC response: it has neither 'result' nor 'error'")
    return parse(response["result"], StreamResponse)


def _sse_error(data: bytes) -> Exception:
    try:
        response = json.loads(data)
    except ValueError:
        response = None
    if isinstance(response, dict) and isinstance(response.get("error"), dict):
        return _rpc_error(response["error"])
    return A2AClientError(f"SSE stream error: {data.decode(errors='replace')}")


def _rpc_error(error: dict[str, Any]) -> Exception:
    """The A2A error for a JSON-RPC error object, as a2a-sdk's own JSON-RPC transport maps it."""
    code = error.get("code")
    message = error.get("message", str(error))
    details = error.get("data")
    info: dict[str, Any] | None = None
    if isinstance(details, list):
        for detail in details:
            if isinstance(detail, dict) and detail.get("@type") == _ERROR_INFO_TYPE:
                info = detail.get("metadata") or None
                break
    if isinstance(code, int) and code in _ERRORS:
        return _ERRORS[code](message, data=info)
    return A2AClientError(f"JSON-RPC Error {code}: {message}")
