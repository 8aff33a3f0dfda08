"""Test support for the console: a signed-in browser-less client (httpx) on a real server."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from tests._support import SECRET, Client
from tests.agents_connected import WAIT, data

__all__ = ["DELETES", "Web", "csrf_of", "signed_in", "tool_call_parts"]

DELETES: dict[str, Any] = {
    "name": "deletes",
    "match": {"tool": "crm.delete_*"},
    "enforcement": "require_approval",
}

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def tool_call_parts(tool: str, arguments: dict[str, Any], to: str = "crm") -> list[Any]:
    return [
        "please run this",
        data({"target_agent": to}),
        data({"calls": [{"tool": tool, "arguments": arguments}]}),
    ]


@dataclass
class Web:
    """A signed-in console user: the HTTP client with its cookie, and the CSRF token of its pages."""

    http: httpx.AsyncClient
    csrf: str

    async def resolve(self, request_id: str, **form: str) -> httpx.Response:
        return await self.http.post(f"/console/inputs/{request_id}/resolve", data={"csrf": self.csrf, **form})


async def sign_in_on(http: httpx.AsyncClient, client_id: str, secret: str = SECRET) -> httpx.Response:
    page = await http.get("/console/login")
    return await http.post(
        "/console/login",
        data={"csrf": csrf_of(page.text), "client_id": client_id, "client_secret": secret},
    )


@contextlib.asynccontextmanager
async def signed_in(client: Client, client_id: str = "acme-full") -> AsyncIterator[Web]:
    async with httpx.AsyncClient(base_url=client.server.http.url, timeout=WAIT) as http:
        response = await sign_in_on(http, client_id)
        assert response.status_code == 303, response.text
        queue = await http.get("/console/queue")
        assert queue.status_code == 200, queue.text
        yield Web(http, csrf_of(queue.text))
