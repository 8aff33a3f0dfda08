"""The mesh's one HTTP server: always on, probes, adapters' and mounted routes, port 0, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import re
import socket

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from svantic_grpc.config import SettingsError, parse_settings
from svantic_grpc.http_server import HttpServer, HttpServerError
from svantic_grpc.server import MeshServer
from tests._support import SIGNING_ENV, running_server

WAIT = 5.0


async def test_the_http_server_is_on_without_any_adapter(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="svantic_grpc"):
        async with running_server() as client:
            http = client.server.http
            assert http.port > 0  # port 0 in settings: the bound port is discoverable
            assert http.url == f"http://127.0.0.1:{http.port}"
            async with httpx.AsyncClient(base_url=http.url, timeout=WAIT) as web:
                health = await web.get("/healthz")
                ready = await web.get("/readyz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "serving"})
    assert f"serving HTTP on 127.0.0.1:{http.port}" in caplog.text


async def test_readyz_is_503_until_the_mesh_serves_and_once_it_stops() -> None:
    serving = False
    server = HttpServer("127.0.0.1:0", ready=lambda: serving)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as web:
            starting = await web.get("/readyz")
            serving = True
            up = await web.get("/readyz")
            serving = False
            stopping = await web.get("/readyz")
            alive = await web.get("/healthz")
    finally:
        await server.stop()
    assert [r.status_code for r in (starting, up, stopping, alive)] == [503, 200, 503, 200]
    assert starting.json() == {"status": "not serving"}


async def test_routes_mounted_by_the_composition_root_are_served() -> None:
    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"hello": request.path_params["name"]})

    settings = parse_settings({"grpc_address": "127.0.0.1:0", "http_address": "127.0.0.1:0"})
    server = MeshServer(settings, env=SIGNING_ENV)
    server.http.mount([Route("/hello/{name}", hello, methods=["GET"])])
    async with server:
        async with httpx.AsyncClient(base_url=server.http.url, timeout=WAIT) as web:
            response = await web.get("/hello/mesh")
            missing = await web.get("/nothing-here")
        with pytest.raises(RuntimeError, match="before the HTTP server starts"):
            server.http.mount([Route("/late", hello)])
    assert (response.status_code, response.json()) == (200, {"hello": "mesh"})
    assert missing.status_code == 404


async def test_two_routes_on_one_path_are_refused_naming_it() -> None:
    async def one(request: Request) -> PlainTextResponse:
        return PlainTextResponse("one")

    server = HttpServer("127.0.0.1:0", ready=lambda: True)
    server.mount([Route("/webhooks/receive", one, methods=["POST"])])
    server.mount([Route("/webhooks/receive", one, methods=["POST"])])
    with pytest.raises(HttpServerError, match="two routes are mounted on /webhooks/receive"):
        await server.start()


async def test_an_http_address_in_use_stops_the_server_naming_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = parse_settings({"grpc_address": "127.0.0.1:0", "http_address": f"127.0.0.1:{port}"})
        server = MeshServer(settings, env=SIGNING_ENV)
        with pytest.raises(SettingsError, match=f"http_address: cannot bind 127.0.0.1:{port}"):
            await server.start()
        await server.stop()


def test_development_mode_refuses_a_non_loopback_http_address() -> None:
    settings = parse_settings({"grpc_address": "127.0.0.1:0", "http_address": "0.0.0.0:0"})
    with pytest.raises(SettingsError, match=re.escape("http_address '0.0.0.0:0' is not loopback")):
        MeshServer(settings, env={})


async def test_a_request_in_flight_finishes_within_the_grace_and_is_cut_after_it() -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: Request) -> PlainTextResponse:
        arrived.set()
        await release.wait()
        return PlainTextResponse("done")

    for grace, finishes in ((WAIT, True), (0.0, False)):
        arrived.clear()
        release.clear()
        server = HttpServer("127.0.0.1:0", ready=lambda: True)
        server.mount([Route("/slow", slow)])
        await server.start()
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as web:
            call = asyncio.create_task(web.get("/slow"))
            await asyncio.wait_for(arrived.wait(), WAIT)
            stopping = asyncio.create_task(server.stop(grace))
            if finishes:
                release.set()
            response = await asyncio.wait_for(call, WAIT)
            await asyncio.wait_for(stopping, WAIT)
            # Past the grace the handler is cancelled and the caller told so, never left hanging.
            assert response.status_code == (200 if finishes else 500)
            assert (response.text == "done") is finishes
        with pytest.raises(httpx.ConnectError):  # nothing listens any more
            async with httpx.AsyncClient(timeout=WAIT) as again:
                await again.get(server.url + "/healthz")


async def test_accepted_connections_send_small_responses_at_once() -> None:
    # Without TCP_NODELAY each small response waits for the client's delayed ACK (~40 ms a
    # request on a kept-alive connection): the A2A JSON-RPC binding ran at a quarter speed.
    server = HttpServer("127.0.0.1:0", ready=lambda: True)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as web:
            assert (await web.get("/healthz")).status_code == 200
            uvicorn_server = server._server
            assert uvicorn_server is not None
            connections = list(uvicorn_server.server_state.connections)
            assert connections
            for connection in connections:
                sock = connection.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        await server.stop()


async def _echo_length_server(limit: int) -> tuple[HttpServer, list[int]]:
    """An HTTP server with the body limit and one route that records the size of each body it got."""
    got: list[int] = []

    async def upload(request: Request) -> JSONResponse:
        body = await request.body()
        got.append(len(body))
        return JSONResponse({"bytes": len(body)})

    server = HttpServer("127.0.0.1:0", ready=lambda: True, max_body_bytes=limit)
    server.mount([Route("/upload", upload, methods=["POST"])])
    await server.start()
    return server, got


async def test_a_body_over_the_limit_is_refused_413_and_never_reaches_the_route() -> None:
    server, got = await _echo_length_server(1000)

    async def streamed(size: int, step: int = 300):  # type: ignore[no-untyped-def]  # chunked: no Content-Length
        for start in range(0, size, step):
            yield b"x" * min(step, size - start)

    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as web:
            declared = await web.post("/upload", content=b"x" * 1001)
            chunked = await web.post("/upload", content=streamed(5000))
            at_limit = await web.post("/upload", content=b"x" * 1000)
            chunked_ok = await web.post("/upload", content=streamed(900))
            empty = await web.post("/upload")
    finally:
        await server.stop()
    for refused in (declared, chunked):
        assert refused.status_code == 413
        assert refused.json() == {
            "error": "request body too large",
            "reason": "BODY_TOO_LARGE",
            "limit_bytes": 1000,
        }
    assert [r.json()["bytes"] for r in (at_limit, chunked_ok, empty)] == [1000, 900, 0]
    assert got == [1000, 900, 0]  # the refused ones never reached the route


async def test_every_route_of_the_mesh_is_bounded_by_http_max_body_bytes() -> None:
    big = b'{"padding": "' + b"x" * 5000 + b'"}'
    async with running_server(http_max_body_bytes=4096) as client:
        token = await client.token()
        async with httpx.AsyncClient(base_url=client.server.http.url, timeout=WAIT) as web:
            answers = [
                await web.post(path, content=big, headers={"authorization": f"Bearer {token}"})
                for path in ("/send", "/a2a/jsonrpc", "/a2a/rest/message:send", "/console/login")
            ]
            small = await web.post(
                "/send",
                json={"jsonrpc": "2.0", "id": "1", "method": "tasks/get", "params": {"id": "nope"}},
                headers={"authorization": f"Bearer {token}"},
            )
    assert [a.status_code for a in answers] == [413, 413, 413, 413]
    assert small.status_code == 200 and small.json()["error"]["code"] == -32001  # task not found: served


def test_http_max_body_bytes_must_be_positive() -> None:
    with pytest.raises(SettingsError, match="http_max_body_bytes"):
        parse_settings({"http_max_body_bytes": 0})


async def _raw(server: HttpServer, first: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(first)
    await writer.drain()
    return reader, writer


async def test_slow_clients_do_not_hold_connections_for_ever() -> None:
    """Found from outside (review 6, V5): a client that sent its headers or its body a byte at a
    time, or never finished them, held its connection (and a file descriptor) for ever."""
    got: list[int] = []

    async def upload(request: Request) -> JSONResponse:
        got.append(len(await request.body()))
        return JSONResponse({"bytes": got[-1]})

    async def slow(request: Request) -> PlainTextResponse:
        await asyncio.sleep(0.8)  # longer than the read timeout: an answer being made is never cut
        return PlainTextResponse("done")

    server = HttpServer("127.0.0.1:0", ready=lambda: True, read_timeout_s=0.3)
    server.mount([Route("/upload", upload, methods=["POST"]), Route("/slow", slow)])
    await server.start()
    try:
        # Headers never finished: the server closes the connection.
        reader, writer = await _raw(server, b"POST /upload HTTP/1.1\r\nHost: x\r\n")
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed, without an answer
        writer.close()
        # A connection that never sends anything is closed too.
        reader, writer = await _raw(server, b"")
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()
        # A body that does not arrive in time: 408 with a reason, and the route never runs.
        reader, writer = await _raw(
            server, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
        )
        answer = await asyncio.wait_for(reader.read(), WAIT)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"reason": "REQUEST_TIMEOUT"' in answer
        writer.close()
        assert got == []
        # A client that keeps up is served, however long the answer takes, also on a kept-alive
        # connection after a first request.
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as web:
            assert (await web.post("/upload", content=b"x" * 10)).json() == {"bytes": 10}
            slow_answer = await web.get("/slow")
            assert (slow_answer.status_code, slow_answer.text) == (200, "done")
    finally:
        await server.stop()
