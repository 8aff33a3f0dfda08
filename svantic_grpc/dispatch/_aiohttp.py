"""httpx over aiohttp's HTTP/1.1 client, for the calls to hosted agents.

a2a-sdk's client speaks through an ``httpx.AsyncClient``; httpx's own stack (httpcore, h11,
anyio) costs about 0.6 ms more CPU per A2A call than aiohttp's, which the mesh pays on every
hosted message (``bench/message_roundtrip.py --hosted``). ``httpx-aiohttp`` keeps httpx as the
interface and lets aiohttp carry the bytes.

Its error mapping turns every aiohttp connection error into ``httpx.ConnectTimeout``, a server
that hung up after the request went out included. The hosted transport fails over only when a
call cannot have reached the agent, so this module maps those errors again: a connection that
was never made (refused, unreachable, timed out connecting) stays a connect error, and one lost
afterwards becomes a read or protocol error.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import httpx_aiohttp
import httpx_aiohttp.transport
from httpx._client import USE_CLIENT_DEFAULT, UseClientDefault

__all__ = ["AgentHttpClient", "AiohttpTransport"]

_PARSED_URLS = 1024
"""Parsed URLs kept (one per agent URL and path called); all are dropped when it is reached."""


class AiohttpTransport(httpx_aiohttp.AiohttpTransport):
    """``httpx_aiohttp.AiohttpTransport`` whose errors say whether the request can have gone out."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _remapped(request):
            response = await super().handle_async_request(request)
        stream = response.stream
        assert isinstance(stream, httpx_aiohttp.transport.AiohttpResponseStream)
        # One generator that maps errors twice, rather than a generator around the library's.
        response.stream = _RemappedStream(stream._aiohttp_response, request)
        return response


class AgentHttpClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` over ``AiohttpTransport`` that sends each request straight to it.

    httpx's ``send`` runs every request through its auth flow, redirect handling, event hooks,
    cookie jar and response timing; the calls to agents use none of them (no auth flow: the
    token is a header; redirects are not followed; a cookie one session's agent sets must not
    reach another session's call, so aiohttp keeps none either). Each agent URL is parsed once,
    and a server-sent event stream is UTF-8 by definition, so its charset is not looked up.
    """

    def __init__(self, *, timeout: httpx.Timeout, limits: httpx.Limits) -> None:
        self._direct = AiohttpTransport(limits=limits, client=self._session)
        super().__init__(timeout=timeout, transport=self._direct)
        self._urls: dict[str, httpx.URL] = {}

    def _session(self) -> aiohttp.ClientSession:
        """The session ``httpx_aiohttp`` would make (made at the first call, in the event loop),
        without a cookie jar."""
        direct = self._direct
        connector = aiohttp.TCPConnector(
            keepalive_timeout=direct.limits.keepalive_expiry,
            ssl=direct.ssl_context,
            limit=direct.limits.max_connections or 0,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    def build_request(self, method: str, url: httpx.URL | str, **kwargs: Any) -> httpx.Request:
        """httpx parses the URL of each request afresh (~50 us); an agent's URL is parsed once."""
        if isinstance(url, str):
            parsed = self._urls.get(url)
            if parsed is None:
                if len(self._urls) >= _PARSED_URLS:
                    self._urls.clear()
                parsed = self._urls[url] = httpx.URL(url)
            url = parsed
        return super().build_request(method, url, **kwargs)

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: httpx._types.AuthTypes | UseClientDefault | None = USE_CLIENT_DEFAULT,
        follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        if not isinstance(auth, UseClientDefault) or follow_redirects is True:  # not asked by the mesh
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        request.extensions.setdefault("timeout", self.timeout.as_dict())
        response = await self._direct.handle_async_request(request)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            response.encoding = "utf-8"  # always, for server-sent events: no charset to look up
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response


class _RemappedStream(httpx_aiohttp.transport.AiohttpResponseStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        super().__init__(response)
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _remapped(self._request), httpx_aiohttp.transport.map_aiohttp_exceptions():
            async for chunk in self._aiohttp_response.content.iter_chunked(self.CHUNK_SIZE):
                yield chunk

    async def aclose(self) -> None:
        with _remapped(self._request):
            await super().aclose()


@contextlib.contextmanager
def _remapped(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except httpx.ConnectTimeout as exc:
        cause = exc.__cause__
        if isinstance(cause, aiohttp.ClientConnectorError):  # refused, unreachable: never connected
            raise httpx.ConnectError(str(exc), request=request) from cause
        if isinstance(cause, aiohttp.ConnectionTimeoutError):  # timed out connecting
            raise
        if isinstance(cause, aiohttp.ServerConnectionError):  # hung up, e.g. after the request
            raise httpx.RemoteProtocolError(str(exc), request=request) from cause
        if isinstance(cause, aiohttp.ClientConnectionError):  # reset, broken pipe on a live connection
            raise httpx.ReadError(str(exc), request=request) from cause
        raise
