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
import http.cookiejar
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import httpx_aiohttp

__all__ = ["AgentHttpClient", "AiohttpTransport"]

_PARSED_URLS = 1024
"""Parsed URLs kept (one per agent URL and path called); all are dropped when it is reached."""


class AiohttpTransport(httpx_aiohttp.AiohttpTransport):
    """``httpx_aiohttp.AiohttpTransport`` whose errors say whether the request can have gone out."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _remapped(request):
            response = await super().handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _RemappedStream(response.stream, request)
        return response


class AgentHttpClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` over ``AiohttpTransport`` for the calls to agents.

    It keeps no cookies, in httpx's jar or in aiohttp's: a cookie one session's agent sets must
    never reach another session's call. Each agent URL is parsed once (httpx parses the URL of
    every request afresh, ~50 us).
    """

    def __init__(self, *, timeout: httpx.Timeout, limits: httpx.Limits) -> None:
        refuse_all = http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
        super().__init__(
            timeout=timeout,
            transport=AiohttpTransport(limits=limits, client=self.session),
            cookies=http.cookiejar.CookieJar(policy=refuse_all),
        )
        self._limits = limits
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, httpx.URL] = {}

    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session under this client (made at the first call, in the event loop),
        for calls that use aiohttp directly: one connection pool and no cookies for both."""
        if self._session is None:
            limits = self._limits
            connector = aiohttp.TCPConnector(
                keepalive_timeout=limits.keepalive_expiry or 5.0, limit=limits.max_connections or 0
            )
            self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def aclose(self) -> None:
        await super().aclose()
        if self._session is not None:  # closed by the transport when httpx used it; closing twice is harmless
            await self._session.close()

    def build_request(self, method: str, url: httpx.URL | str, **kwargs: Any) -> httpx.Request:
        if isinstance(url, str):
            parsed = self._urls.get(url)
            if parsed is None:
                if len(self._urls) >= _PARSED_URLS:
                    self._urls.clear()
                parsed = self._urls[url] = httpx.URL(url)
            url = parsed
        return super().build_request(method, url, **kwargs)


class _RemappedStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _remapped(self._request):
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        with _remapped(self._request):
            await self._stream.aclose()


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
