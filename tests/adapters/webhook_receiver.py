"""A webhook receiver on loopback that records every delivery and can be told to fail."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook
from starlette.routing import BaseRoute

from svantic_grpc.http_server import HttpServer

WAIT_S = 5.0


@dataclass(frozen=True)
class Delivery:
    """One POST as received."""

    headers: dict[str, str]
    body: str

    @property
    def payload(self) -> Any:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    def verify(self, secret: str) -> Any:
        """The payload, after checking the signature (raises ``WebhookVerificationError`` if wrong)."""
        return Webhook(secret).verify(self.body, self.headers)


class Receiver:
    """Answers 200 unless told otherwise; ``failures`` are answered first, one per delivery."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.failures: list[int] = []
        self.url = ""
        self._arrived = asyncio.Condition()

    def fail(self, times: int, status: int = 500) -> None:
        """Answer the next ``times`` deliveries with ``status``."""
        self.failures.extend([status] * times)

    async def _handle(self, request: web.Request) -> web.Response:
        delivery = Delivery({k.lower(): v for k, v in request.headers.items()}, await request.text())
        async with self._arrived:
            self.deliveries.append(delivery)
            self._arrived.notify_all()
        status = self.failures.pop(0) if self.failures else 200
        return web.Response(status=status, text="ok" if status == 200 else "no")

    async def wait_for(self, count: int) -> list[Delivery]:
        """The first ``count`` deliveries, once they arrived (within ``WAIT_S`` seconds)."""
        async with asyncio.timeout(WAIT_S), self._arrived:
            await self._arrived.wait_for(lambda: len(self.deliveries) >= count)
        return self.deliveries[:count]


@asynccontextmanager
async def receiving(path: str = "/hook") -> AsyncIterator[Receiver]:
    """A receiver listening on 127.0.0.1 at a free port; ``receiver.url`` is where to POST."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_post(path, receiver._handle)
    async with serving(app) as base:
        receiver.url = base + path
        yield receiver


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` on 127.0.0.1 at a free port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serving_routes(routes: Sequence[BaseRoute]) -> AsyncIterator[str]:
    """Adapter ``routes`` on the mesh's own HTTP server, on 127.0.0.1 at a free port; yields its base URL."""
    server = HttpServer("127.0.0.1:0", ready=lambda: True)
    server.mount(routes)
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()
