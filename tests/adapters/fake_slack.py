"""A fake Slack Web API on loopback: records every call and answers like Slack would.

Slack cannot be reached from the test machine, so the adapter's ``AsyncWebClient``
is pointed here through its ``base_url``.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FakeSlack", "SlackCall", "fake_slack"]


@dataclass(frozen=True)
class SlackCall:
    method: str
    """The Web API method, e.g. ``chat.postMessage``."""
    args: dict[str, Any]
    """The call's arguments (JSON or form body)."""
    token: str


@dataclass
class FakeSlack:
    base_url: str = ""
    calls: list[SlackCall] = field(default_factory=list)
    failing: bool = False
    """When set, every call answers HTTP 500."""
    scripted: dict[str, list[int | str]] = field(default_factory=dict)
    """Per method, what its next calls answer before it answers normally again: an HTTP status
    (429 with ``Retry-After: 0``, like Slack's rate limit) or a Slack error code (200 with
    ``ok: false``); see ``fail_next``."""
    _ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _posted_ts: dict[int, str] = field(default_factory=dict)

    def ts_of(self, posted: dict[str, Any]) -> str:
        """The ``ts`` Slack answered for a ``chat.postMessage`` (its arguments, from ``of``)."""
        return self._posted_ts[id(posted)]

    def fail_next(self, method: str, *statuses: int | str) -> None:
        """The next calls of ``method`` answer these statuses or Slack errors, in order."""
        self.scripted.setdefault(method, []).extend(statuses)

    def of(self, method: str) -> list[dict[str, Any]]:
        """Arguments of every call to ``method``, oldest first."""
        return [c.args for c in self.calls if c.method == method]

    async def handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.content_type == "application/json":
            args = dict(await request.json())
        else:
            args = dict(await request.post())
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.calls.append(SlackCall(method, args, token))
        if self.failing:
            return web.json_response({"ok": False, "error": "internal_error"}, status=500)
        scripted = self.scripted.get(method)
        if scripted:
            status = scripted.pop(0)
            if isinstance(status, str):
                return web.json_response({"ok": False, "error": status})
            if status == 429:
                return web.json_response(
                    {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": "0"}
                )
            return web.Response(text="<html>bad gateway</html>", content_type="text/html", status=status)
        answer: dict[str, Any] = {"ok": True}
        if method == "auth.test":
            answer |= {
                "user_id": "UBOT",
                "bot_id": "BBOT",
                "team_id": "T1",
                "team": "Test",
                "user": "svantic",
            }
        elif method == "chat.postMessage":
            answer |= {"channel": args.get("channel"), "ts": f"{next(self._ts)}.000100"}
            self._posted_ts[id(args)] = answer["ts"]
        elif method == "chat.update":
            answer |= {"channel": args.get("channel"), "ts": args.get("ts")}
        elif method == "chat.postEphemeral":
            answer |= {"message_ts": f"{next(self._ts)}.000200"}
        elif method == "views.open":
            answer |= {"view": {"id": "V1", **args.get("view", {})}}
        else:
            answer = {"ok": False, "error": "unknown_method"}
        return web.json_response(answer)


@asynccontextmanager
async def fake_slack() -> AsyncIterator[FakeSlack]:
    """Serve a ``FakeSlack`` on 127.0.0.1 (port 0); ``base_url`` ends in ``/api/``."""
    fake = FakeSlack()
    app = web.Application()
    app.router.add_post("/api/{method}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.base_url = f"http://127.0.0.1:{port}/api/"
    try:
        yield fake
    finally:
        await runner.cleanup()
