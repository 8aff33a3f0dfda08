"""Where one hosted message's time goes at 1 client (issue 12, item 1): the critical path, by stage.

    .venv/bin/python bench/hosted_stages.py                 # the a2a-sdk echo agent of --hosted
    .venv/bin/python bench/hosted_stages.py --canned        # an agent that answers at once
    .venv/bin/python bench/hosted_stages.py --tree /tmp/before --messages 600

At one client the hosted path is pure latency: the client's ``SendMessage`` reaches the mesh, the
mesh calls the agent, the agent's final event comes back, the mesh answers. Every process here
stamps ``time.perf_counter_ns()`` (``CLOCK_MONOTONIC``, one clock for every process of the
machine), so the stamps of the client, the mesh server and the agent's bytes line up:

* **in-hop**: the client calls ``SendMessage`` -> the mesh deserializes the request (grpc: the
  client's send, the server's I/O thread, its completion-queue thread, the event loop);
* **mesh**: request deserialized -> the hosted transport's ``dispatch`` starts (interceptor,
  servicer, validation, routing, the message stored, its run started, the dispatch set up);
* **transport**: ``dispatch`` starts -> the HTTP request is written (token, request, aiohttp);
* **agent**: request written -> the read holding the agent's final event (the agent's work, its
  first events read and written on the way);
* **reply**: that read -> the ``SendMessage`` response serialized (the event parsed, the
  message's end written, the servicer woken, the message converted);
* **out-hop**: response serialized -> the client has it.

The mesh server is ``message_roundtrip.py``'s (in-memory store, metrics on), from ``--tree``
(default this checkout), with the stamps patched in at five places (a few microseconds each).
A bare ``grpc.aio`` echo server is then called the same way, each call after a pause as long as
the hosted message's agent stage, so its server is as idle between calls: its in- and out-hops
are what grpc itself costs on this machine at that rhythm (an idle vCPU wakes slowly: the hops
grow with the pause). Prints the median of each stage in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _child import ROOT, say, start_role, until_stdin_closes, watchdog

HOST = "127.0.0.1"
ECHO_METHOD = "/bench.Stages/Echo"
THIS = Path(__file__).resolve()
STAGES = ("in-hop", "mesh", "transport", "agent", "reply", "out-hop")


def _install_stamps(stamps: list[tuple[str, int]]) -> None:
    """Stamp the mesh server's stages (in this process, before the server is made)."""
    import asyncio.selector_events as selector_events

    import svantic_grpc.cli  # noqa: F401  (first: what `svantic-grpc serve` sets before a2a-sdk loads)
    from svantic_grpc.dispatch import a2a
    from svantic_grpc.pb import message_service_pb2 as pb

    now = time.perf_counter_ns
    request_from = pb.SendMessageRequest.FromString

    def from_string(data: bytes) -> Any:
        stamps.append(("deserialized", now()))
        return request_from(data)

    pb.SendMessageRequest.FromString = staticmethod(from_string)  # type: ignore[method-assign]
    serialize = pb.SendMessageResponse.SerializeToString

    def serialized(self: Any) -> bytes:
        stamps.append(("serialized", now()))
        return serialize(self)

    pb.SendMessageResponse.SerializeToString = serialized  # type: ignore[method-assign]
    to_a2a = a2a._to_a2a_message  # the first thing A2ATransport.dispatch does for a new call

    def dispatched(job: Any) -> Any:
        stamps.append(("dispatch", now()))
        return to_a2a(job)

    a2a._to_a2a_message = dispatched  # type: ignore[assignment]
    transport = selector_events._SelectorSocketTransport  # the loop's sockets: only HTTP here
    write = transport.write
    read = transport._read_ready__data_received

    def written(self: Any, data: Any) -> None:
        stamps.append(("written", now()))
        write(self, data)

    def received(self: Any) -> None:
        stamps.append(("read", now()))
        read(self)

    transport.write = written  # type: ignore[method-assign]
    transport._read_ready__data_received = received  # type: ignore[method-assign]


async def run_mesh_server(args: argparse.Namespace) -> None:
    stamps: list[tuple[str, int]] = []
    _install_stamps(stamps)
    sys.path.insert(0, str(Path.cwd() / "bench"))  # the measured tree's (its cwd)
    import message_roundtrip

    server_args = argparse.Namespace(metrics_off=False, trace_variant="", otlp_endpoint="", profile_out="")
    try:
        await message_roundtrip.run_mesh_server(server_args)
    finally:
        _write(args.out, stamps)


async def run_bare_server(args: argparse.Namespace) -> None:
    import grpc
    from grpc import aio

    stamps: list[int] = []

    async def echo(request: bytes, context: Any) -> bytes:
        stamps.append(time.perf_counter_ns())
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Stages", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    say(f"PORT {port}")
    await until_stdin_closes()
    _write(args.out, stamps)
    await server.stop(0)


def _write(path: str, stamps: list[Any]) -> None:
    Path(path).write_text(json.dumps(stamps))


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def run_canned_agent(args: argparse.Namespace) -> None:
    """An A2A JSON-RPC agent that answers each streaming call at once with the a2a-sdk echo agent's
    bytes (task, artifact, completed status, each its own write ``--gap-ms`` apart, then the end)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((HOST, 0))
    base = f"http://{HOST}:{sock.getsockname()[1]}"
    card = json.dumps(
        {
            "name": "canned echo",
            "description": "answers at once",
            "version": "1.0",
            "supportedInterfaces": [{"url": base, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}],
            "capabilities": {"streaming": True},
            "defaultInputModes": ["text/plain"],
            "defaultOutputModes": ["text/plain"],
            "skills": [{"id": "echo", "name": "echo", "description": "echoes", "tags": ["echo"]}],
        }
    ).encode()
    gap = args.gap_ms / 1000

    async def answer(request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        message = request["params"]["message"]
        context, task = message.get("contextId", ""), str(uuid.uuid4())

        def event(result: dict[str, Any]) -> bytes:
            body = json.dumps({"result": result, "id": request["id"], "jsonrpc": "2.0"}).encode()
            return _chunk(b"data: " + body + b"\r\n\r\n")

        text = " ".join(p["text"] for p in message["parts"] if "text" in p)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
            + event({"task": {"id": task, "contextId": context, "status": {"state": "TASK_STATE_SUBMITTED"}}})
        )
        artifact = {"artifactId": str(uuid.uuid4()), "name": "echo", "parts": [{"text": f"echo: {text}"}]}
        status = {"state": "TASK_STATE_COMPLETED"}
        for part in (
            event({"artifactUpdate": {"taskId": task, "contextId": context, "artifact": artifact}}),
            event({"statusUpdate": {"taskId": task, "contextId": context, "status": status}}),
            b"0\r\n\r\n",
        ):
            await asyncio.sleep(gap)
            writer.write(part)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                if head.startswith("GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
                    writer.write(b"content-length: %d\r\n\r\n%s" % (len(card), card))
                else:
                    await answer(json.loads(body), writer)

    server = await asyncio.start_server(serve, sock=sock)
    say(f"URL {base}")
    await until_stdin_closes()
    server.close()


async def parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import _hosted
    from grpc import aio

    tree, this = Path(args.tree), THIS
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'bench'}"}
    life = 120 + args.messages * 0.05
    with tempfile.TemporaryDirectory() as tmp:
        if args.canned:
            agent = await start_role(this, "canned-agent", life, "--gap-ms", str(args.gap_ms))
        else:
            agent = await start_role(ROOT / "bench" / "message_roundtrip.py", "hosted-agent", life)
        assert agent.stdout is not None
        url = (await asyncio.wait_for(agent.stdout.readline(), 60)).decode().split()[1]
        out = Path(tmp) / "mesh.json"
        mesh = await start_role(this, "mesh-server", life, "--out", str(out), env=env, cwd=tree)
        assert mesh.stdout is not None
        while not (line := (await asyncio.wait_for(mesh.stdout.readline(), 60)).decode()).startswith("PORT"):
            if not line:
                raise RuntimeError(f"the mesh server from {tree} did not start")
        target = f"{HOST}:{line.split()[1]}"
        await _hosted.register(target, url)
        calls: list[tuple[int, int]] = []
        async with aio.insecure_channel(target) as channel:
            (call,) = await _hosted.hosted_calls(channel, 1)
            for _ in range(args.warmup + args.messages):
                started = time.perf_counter_ns()
                await call()
                calls.append((started, time.perf_counter_ns()))
        for child in (mesh, agent):
            assert child.stdin is not None
            child.stdin.close()
            await child.wait()
        stages = _stages(calls[args.warmup :], _read(out))
        medians = {name: statistics.median(values) for name, values in stages.items()}
        bare = await _bare_hops(this, Path(tmp) / "bare.json", args, pause_s=medians["agent"] / 1e6)
    total = statistics.median(stages["total"])
    load = os.getloadavg()[0]
    print(f"hosted message at 1 client, mesh from {tree} | {args.messages} messages | load {load:.1f}")
    print(f"  {'total':10s} {total:7.0f} us (p50 of each stage below; they need not add up to it)")
    for name in STAGES:
        print(f"  {name:10s} {medians[name]:7.0f} us")
    mesh_own = medians["mesh"] + medians["transport"] + medians["reply"]
    print(f"  the mesh server's own stages (mesh + transport + reply): {mesh_own:.0f} us")
    print(
        f"bare grpc.aio echo, a pause of {medians['agent']:.0f} us before each call: in-hop "
        f"{bare[0]:.0f} us, out-hop {bare[1]:.0f} us (the hosted path's hops: "
        f"{medians['in-hop']:.0f} / {medians['out-hop']:.0f} us)"
    )


def _stages(calls: list[tuple[int, int]], stamps: list[list[Any]]) -> dict[str, list[float]]:
    """Per message, the stages' lengths in microseconds, from the client's calls and the server's
    stamps (each message's stamps begin at its request's ``deserialized``)."""
    messages: list[list[tuple[str, int]]] = []
    for name, at in stamps:
        if name == "deserialized":
            messages.append([])
        if messages:
            messages[-1].append((name, at))
    stages: dict[str, list[float]] = {name: [] for name in (*STAGES, "total")}
    for (sent, answered), marks in zip(calls, messages[-len(calls) :], strict=True):
        first = {}
        for name, at in marks:
            first.setdefault(name, at)
        if not {"dispatch", "serialized"} <= first.keys():
            continue
        written = next((at for name, at in marks if name == "written" and at > first["dispatch"]), None)
        last_read = max(
            (at for name, at in marks if name == "read" and at < first["serialized"]), default=None
        )
        if written is None or last_read is None or last_read < written:
            continue
        points = (
            sent,
            first["deserialized"],
            first["dispatch"],
            written,
            last_read,
            first["serialized"],
            answered,
        )
        for name, begin, end in zip(STAGES, points, points[1:], strict=False):
            stages[name].append((end - begin) / 1e3)
        stages["total"].append((answered - sent) / 1e3)
    return stages


async def _bare_hops(
    this: Path, out: Path, args: argparse.Namespace, *, pause_s: float
) -> tuple[float, float]:
    """In- and out-hop medians of a bare grpc.aio echo called with ``pause_s`` before each call."""
    from grpc import aio

    server = await start_role(this, "bare-server", 120 + args.messages * 0.05, "--out", str(out))
    assert server.stdout is not None
    port = (await asyncio.wait_for(server.stdout.readline(), 60)).decode().split()[1]
    calls = []
    async with aio.insecure_channel(f"{HOST}:{port}") as channel:
        echo = channel.unary_unary(ECHO_METHOD)
        for _ in range(args.warmup + args.messages):
            await _pause(pause_s)
            started = time.perf_counter_ns()
            await echo(b"x" * 64)
            calls.append((started, time.perf_counter_ns()))
    assert server.stdin is not None
    server.stdin.close()
    await server.wait()
    stamps = _read(out)
    pairs = list(zip(calls, stamps, strict=True))[args.warmup :]
    return (
        statistics.median((at - sent) / 1e3 for (sent, _), at in pairs),
        statistics.median((answered - at) / 1e3 for (_, answered), at in pairs),
    )


async def _pause(seconds: float) -> None:
    """Idle for ``seconds`` (the event loop's timers round up to a millisecond: the rest is slept
    off in a thread, the loop idle meanwhile)."""
    await asyncio.to_thread(time.sleep, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", default=str(ROOT), help="the source tree whose mesh server is measured")
    parser.add_argument("--messages", type=int, default=1000, help="messages measured")
    parser.add_argument("--warmup", type=int, default=100, help="messages before those measured")
    parser.add_argument("--canned", action="store_true", help="an agent that answers at once")
    parser.add_argument("--gap-ms", type=float, default=0.5, help="with --canned: between its writes")
    parser.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tree = str(Path(args.tree).resolve())
    if args.max_seconds:
        watchdog(args.max_seconds)
    roles = {
        "parent": parent,
        "mesh-server": run_mesh_server,
        "bare-server": run_bare_server,
        "canned-agent": run_canned_agent,
    }
    asyncio.run(roles[args.role](args))


if __name__ == "__main__":
    main()
