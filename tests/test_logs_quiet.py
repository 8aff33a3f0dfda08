"""Below DEBUG the server's log is its own: the libraries that log every request stay quiet.

httpx logs a line for every call the mesh makes to a hosted agent and a2a-sdk logs every agent
card it reads, whole, both at INFO; at the default level they would bury the mesh's own lines
(and cost CPU on every hosted message). At DEBUG they speak again.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from svantic_grpc import logs
from tests._support import running_server


@contextmanager
def _configured(level: str) -> Iterator[io.StringIO]:
    """``logs.configure(level)`` writing to a buffer; the logging set-up before it comes back after."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), {n: logging.getLogger(n).level for n in logs.CHATTY})
    out, real_stderr = io.StringIO(), sys.stderr
    sys.stderr = out
    try:
        logs.configure(level)
    finally:
        sys.stderr = real_stderr
    try:
        yield out
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for name, level_before in saved[2].items():
            logging.getLogger(name).setLevel(level_before)


@pytest.mark.parametrize(("level", "heard"), [("INFO", False), ("WARNING", False), ("DEBUG", True)])
async def test_request_lines_of_http_libraries_appear_only_at_debug(level: str, heard: bool) -> None:
    async with running_server() as client:
        with _configured(level) as out:
            logging.getLogger("svantic_grpc").warning("the mesh's own line")
            async with httpx.AsyncClient() as http:
                response = await http.get(f"{client.server.http.url}/.well-known/agent-card.json")
            assert response.status_code == 200
            logging.getLogger("a2a.client.card_resolver").info("Successfully fetched agent card data")
    written = out.getvalue()
    assert "the mesh's own line" in written
    assert ("HTTP Request: GET" in written) is heard
    assert ("Successfully fetched agent card" in written) is heard
