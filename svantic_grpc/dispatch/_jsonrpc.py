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
mesh hands its ``results`` the request's ProtoJSON, built as JSON from the mesh's message, and
reads each result's JSON itself (``_events``). Closed at the final update, ``results`` does not
wait for the stream's end: the connection goes back to the pool when it comes. The
``Client`` adds nothing to that call with the mesh's configuration (no interceptors, polling,
push notifications or output modes); an interface with a tenant goes through the ``Client``.

Errors keep the cause the mesh's fail-over rule reads: a connection never made (refused,
unreachable, timed out connecting) is an ``aiohttp.ClientConnectorError`` or
``aiohttp.ConnectionTimeoutError`` under ``A2AClientError``; anything later is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any
from uuid import uuid4

import aiohttp
import httpx
import orjson
from a2a.client import A2AClientError, A2AClientTimeoutError, ClientCallContext, ClientConfig
from a2a.client.transports import ClientTransport, JsonRpcTransport
from a2a.compat.v0_3.jsonrpc_transport import CompatJsonRpcTransport
from a2a.compat.v0_3.versions import is_legacy_version
from a2a.types import AgentCard, SendMessageRequest, StreamResponse
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER, TransportProtocol
from a2a.utils.errors import JSON_RPC_ERROR_CODE_MAP
from google.protobuf import json_format

from svantic_grpc._json import lone_surrogate
from svantic_grpc.dispatch._protojson import parse

__all__ = ["JsonRpcProducer", "StreamingJsonRpcTransport", "close_left"]

_ERRORS = {code: error for error, code in JSON_RPC_ERROR_CODE_MAP.items()}
_ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
_TAIL_S = 0.5
"""How long the rest of a stream its caller stopped reading may take to end before its
connection is dropped instead of going back to the pool."""
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
        """``results`` as a2a-sdk's ``StreamResponse``s."""
        async with contextlib.aclosing(self.results(params, headers=headers, timeout_s=timeout_s)) as results:
            async for read in results:
                for result in read:
                    yield parse(result, StreamResponse)

    async def results(
        self,
        params: dict[str, Any],
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[list[Any]]:
        """``SendStreamingMessage`` with ``params`` (a ``SendMessageRequest`` as ProtoJSON) and
        ``headers`` besides the protocol's: the ``result`` of each JSON-RPC response the agent
        streams (a ``StreamResponse`` as decoded ProtoJSON), as they come, to the end of its
        stream, a list per read (those that arrived together, which the mesh may write at once).
        ``timeout_s`` bounds each phase (connect, each read) instead of the transport's
        timeouts, as a ``ClientCallContext.timeout`` does in a2a-sdk.

        Closed before the stream's end (its caller has what it needs: an A2A server ends the
        stream after a final or interrupted state), it does not wait for the rest: the response
        goes on arriving, and its connection goes back to the pool when the stream ends, or is
        closed if that takes longer than ``_TAIL_S``."""
        payload = {"jsonrpc": "2.0", "id": str(uuid4()), "method": "SendStreamingMessage", "params": params}
        body = _encode(payload)
        sent = {**_HEADERS, **headers} if headers else _HEADERS
        timeout = self._timeout
        if timeout_s is not None:  # each phase, as a2a-sdk's httpx.Timeout(timeout)
            timeout = aiohttp.ClientTimeout(connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s)
        session = self._session()
        if session.closed:
            raise A2AClientError("HTTP client is closed")
        response: aiohttp.ClientResponse | None = None
        try:
            # No redirect is followed (as a2a-sdk's httpx client does not): a redirect is an error.
            response = await session.post(
                self.url, data=body, headers=sent, timeout=timeout, allow_redirects=False
            )
            if response.status >= 300:
                text = await response.text(errors="replace")
                raise A2AClientError(f"HTTP Error {response.status}: {text[:500]}")
            if "text/event-stream" not in response.headers.get("Content-Type", ""):
                yield [_result(await response.read())]  # e.g. a JSON-RPC error answered at once
                return
            events = _Events()
            async for chunk in response.content.iter_any():
                read, error = _results(events.feed(chunk))
                if read:
                    yield read
                if error is not None:
                    raise error
            read, error = _results(events.end())
            if read:
                yield read
            if error is not None:
                raise error
        except GeneratorExit:
            if response is not None:  # closed by its caller at a result: the rest may end on its own
                _leave(response)
                response = None
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise A2AClientTimeoutError("Client Request timed out") from exc
        except aiohttp.ClientError as exc:
            raise A2AClientError(f"Network communication error: {exc}") from exc
        finally:
            if response is not None:  # read to its end (the connection is back in the pool), or failed
                response.release()


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


_LEFT: set[aiohttp.ClientResponse] = set()
"""Responses left to end by themselves (``_leave``), until they do or are closed."""


def _leave(response: aiohttp.ClientResponse) -> None:
    """Let the rest of ``response`` arrive unread: aiohttp puts its connection back in the pool
    when the response ends (as when it is read to its end), and ``response.close()`` drops the
    connection if that has not happened after ``_TAIL_S`` (an agent that keeps the stream open)."""
    if response.closed:  # ended already: its connection is back in the pool
        return
    _LEFT.add(response)

    def close() -> None:
        _LEFT.discard(response)
        response.close()

    timer = asyncio.get_running_loop().call_later(_TAIL_S, close)

    def ended() -> None:
        timer.cancel()
        _LEFT.discard(response)

    response.content.on_eof(ended)


def close_left() -> None:
    """Close every response still left to end (the client is closing: none may outlive it)."""
    while _LEFT:
        _LEFT.pop().close()


class _Events:
    """Server-sent events from chunks cut anywhere, as (event name, data): lines end with LF or
    CRLF, a blank line ends an event, ``:`` starts a comment; events with empty data are skipped
    (as a2a-sdk does)."""

    __slots__ = ("_data", "_name", "_pending")

    def __init__(self) -> None:
        self._pending = bytearray()
        self._name = "message"
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        """The events that ``chunk`` completes."""
        pending = self._pending
        if pending:
            pending += chunk
            end = pending.rfind(b"\n")
            if end < 0:
                return []
            lines = bytes(pending[:end]).split(b"\n")
            del pending[: end + 1]
        else:
            end = chunk.rfind(b"\n")
            if end < 0:
                pending += chunk
                return []
            lines = chunk[:end].split(b"\n") if end + 1 < len(chunk) else chunk.split(b"\n")[:-1]
            if end + 1 < len(chunk):
                pending += chunk[end + 1 :]
        return self._lines(lines)

    def end(self) -> list[tuple[str, bytes]]:
        """The last event of a stream that ends without its blank line (and without a line end)."""
        lines = [bytes(self._pending)] if self._pending else []
        self._pending = bytearray()
        events = self._lines(lines)
        if any(self._data):
            events.append((self._name, b"\n".join(self._data)))
        return events

    def _lines(self, lines: list[bytes]) -> list[tuple[str, bytes]]:
        events = []
        data = self._data
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if any(data):
                    events.append((self._name, data[0] if len(data) == 1 else b"\n".join(data)))
                self._name, data = "message", []
                continue
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                self._name = value.decode(errors="replace")
        self._data = data
        return events


def _results(events: list[tuple[str, bytes]]) -> tuple[list[Any], Exception | None]:
    """The results of events read together, up to the first that is an error (an error event,
    a JSON-RPC error, a response that cannot be read), and that error: the results before it
    go to the caller first, as when they are read one by one."""
    results = []
    for name, data in events:
        try:
            if name == "error":
                raise _sse_error(data)
            results.append(_result(data))
        except Exception as exc:  # what _result raises: the A2A error the response maps to
            return results, exc
    return results, None


def _result(data: bytes) -> Any:
    """One JSON-RPC response's result (as decoded JSON); its error raised as the A2A error its
    code maps to."""
    response = _loads(data)
    if not isinstance(response, dict):
        raise A2AClientError(f"Invalid JSON-RPC response: expected an object, got {type(response).__name__}")
    error = response.get("error")
    if error:
        if not isinstance(error, dict):
            raise A2AClientError(f"Invalid JSON-RPC response: error is not an object: {error!r}")
        raise _rpc_error(error)
    if "result" not in response:
        raise A2AClientError("Invalid JSON-RPC response: it has neither 'result' nor 'error'")
    return response["result"]


def _loads(data: bytes) -> Any:
    """JSON as ``json.loads`` reads it (SSE is UTF-8: no encoding to detect), with orjson first:
    what orjson refuses (``NaN``, integers beyond 64 bits, lone surrogates) is read by ``json``,
    except a lone surrogate escape: kept, it would fail every later encoding of the message that
    stores it (its answers, its session's stream), so the agent's response is refused."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        value = json.loads(data.decode())
    except ValueError as exc:
        raise A2AClientError(f"Invalid JSON-RPC response in SSE stream: {exc}") from exc
    if (where := lone_surrogate(value)) is not None:
        raise A2AClientError(
            f"Invalid JSON-RPC response: it holds a lone surrogate escape in {where}, "
            "which is not a Unicode character"
        )
    return value


def _encode(payload: dict[str, Any]) -> bytes:
    """The request's JSON (orjson; ``json`` for an integer beyond 64 bits)."""
    try:
        return orjson.dumps(payload)
    except TypeError:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _sse_error(data: bytes) -> Exception:
    try:
        response = _loads(data)
    except A2AClientError:
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
