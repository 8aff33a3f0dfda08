"""A2A ingress benchmark: an a2a-sdk client sending to the mesh, beside a plain a2a-sdk agent, in one run.

Run from the repository root::

    .venv/bin/python bench/a2a_ingress.py                       # ~1 minute
    .venv/bin/python bench/a2a_ingress.py --concurrency 1,16 --duration 5 --rounds 2

What runs, each in its own process, all on 127.0.0.1:

* **mesh**: a ``MeshServer`` (in-memory store, development mode, no TTL) with its A2A
  HTTP routes on its own HTTP server and its A2A gRPC bindings on its gRPC port,
  and a second process running the connected echo agent of ``examples/echo_agent.py``.
  An A2A message goes client -> mesh (token check, session, routing, message record
  and events) -> agent over ``Connect`` -> mesh -> client: two hops and real work.
* **plain**: a plain a2a-sdk agent server (``DefaultRequestHandler``, in-memory task
  store, an echo ``AgentExecutor`` answering with one artifact), JSON-RPC on uvicorn and
  gRPC on ``grpc.aio``: one hop.
* **client**: a2a-sdk's own client, non-streaming ``send_message`` (blocking, returns
  the completed task), ``--concurrency`` tasks sharing one client, for each binding
  (JSON-RPC 1.0 and gRPC 1.0). To the mesh each task has its own session (``contextId``)
  and a data part ``{"target_agent": "echo"}``; the bearer token is the mesh's.

Each point warms up ``--warmup`` s, then counts ``--duration`` s: messages/s and
p50/p99 latency. Target (issue 11): mesh >= 1.0x plain at 1 and 16 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import sys
from pathlib import Path
from typing import Any

from _child import ROOT, Child, revision, say, until_stdin_closes, watchdog

HOST = "127.0.0.1"
SCRIPT = Path(__file__).resolve()
BINDINGS = ("JSONRPC", "GRPC")


def _socket() -> socket.socket:
    # IPPROTO_TCP: asyncio sets TCP_NODELAY only on accepted sockets of that proto.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    return sock


async def _uvicorn(app: Any, sock: socket.socket) -> tuple[Any, asyncio.Task[None]]:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.01)
    return server, serving


async def run_mesh(args: argparse.Namespace) -> None:
    from svantic_grpc.config import parse_settings
    from svantic_grpc.server import MeshServer

    settings = parse_settings(
        {
            "grpc_address": f"{HOST}:0",
            "http_address": f"{HOST}:0",
            "session_ttl_ms": 0,
            "shutdown_grace_s": 0,
            "store": "memory",
            "log_level": "WARNING",
            "dispatch": {"max_dispatches_per_session": 0},
        }
    )
    server = MeshServer(settings, env={})  # development default: loopback, credential 'svantic'
    await server.start()  # the A2A routes are on its own HTTP server (http_address, port 0 here)
    say(f"READY {server.http.url} {server.target}")
    try:
        await until_stdin_closes()
    finally:
        await server.stop(0)


async def run_agent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    from echo_agent import make_agent

    agent = make_agent(args.target, "echo-bench-1")
    task = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.connected.wait(), 30)
    say("READY")
    try:
        await until_stdin_closes()
    finally:
        await agent.stop()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(task, 5)


async def run_plain(args: argparse.Namespace) -> None:
    from a2a.helpers import new_task_from_user_message, new_text_part
    from a2a.server.agent_execution import AgentExecutor, RequestContext
    from a2a.server.events import EventQueue
    from a2a.server.request_handlers import DefaultRequestHandler, GrpcHandler
    from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
    from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
    from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, a2a_pb2_grpc
    from grpc import aio
    from starlette.applications import Starlette

    class Echo(AgentExecutor):
        async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
            task = context.current_task
            if task is None:
                assert context.message is not None
                task = new_task_from_user_message(context.message)
                await event_queue.enqueue_event(task)
            updater = TaskUpdater(event_queue, task.id, task.context_id)
            await updater.add_artifact([new_text_part(f"echo: {context.get_user_input()}")], name="echo")
            await updater.complete()

        async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
            raise NotImplementedError

    sock = _socket()
    base = f"http://{HOST}:{sock.getsockname()[1]}"
    grpc_server = aio.server(options=[("grpc.so_reuseport", 0)])
    grpc_target = f"{HOST}:{grpc_server.add_insecure_port(f'{HOST}:0')}"
    card = AgentCard(
        name="plain echo",
        description="a2a-sdk DefaultRequestHandler with an echo executor",
        version="1.0",
        supported_interfaces=[
            AgentInterface(url=base, protocol_binding="JSONRPC", protocol_version="1.0"),
            AgentInterface(url=grpc_target, protocol_binding="GRPC", protocol_version="1.0"),
        ],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id="echo", name="echo", description="echoes the text", tags=["echo"])],
    )
    handler = DefaultRequestHandler(agent_executor=Echo(), task_store=InMemoryTaskStore(), agent_card=card)
    routes = create_agent_card_routes(card) + create_jsonrpc_routes(handler, rpc_url="/")
    a2a_pb2_grpc.add_A2AServiceServicer_to_server(GrpcHandler(handler), grpc_server)  # type: ignore[no-untyped-call]
    await grpc_server.start()
    http, serving = await _uvicorn(Starlette(routes=routes), sock)
    say(f"READY {base} {grpc_target}")
    try:
        await until_stdin_closes()
    finally:
        http.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 5)
        await grpc_server.stop(0)


async def run_client(args: argparse.Namespace) -> None:
    import httpx
    from a2a.client import A2ACardResolver, ClientCallContext, ClientConfig, ClientFactory
    from a2a.helpers import new_data_part
    from a2a.types import Message, Part, Role, SendMessageRequest
    from grpc import aio

    base, grpc_target = args.target.split(",")
    token = ""
    sessions = [""] * args.concurrency
    if args.mode == "mesh":
        from svantic_grpc.pb import (
            auth_service_pb2,
            auth_service_pb2_grpc,
            session_service_pb2,
            session_service_pb2_grpc,
        )

        async with aio.insecure_channel(grpc_target) as channel:
            got = await auth_service_pb2_grpc.AuthServiceStub(channel).GetToken(
                auth_service_pb2.GetTokenRequest(
                    client_id="svantic", client_secret="your-secret", agent_type="b"
                )
            )
            token = got.token
            stub = session_service_pb2_grpc.SessionServiceStub(channel)
            md = (("authorization", f"Bearer {token}"),)
            for index in range(args.concurrency):
                made = await stub.InitSession(session_service_pb2.InitSessionRequest(), metadata=md)
                sessions[index] = made.session.session_id
    limits = httpx.Limits(
        max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4
    )
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        card = await A2ACardResolver(http, base).get_agent_card()
        config = ClientConfig(
            streaming=False,
            httpx_client=http,
            supported_protocol_bindings=[args.binding],
            grpc_channel_factory=aio.insecure_channel,
        )
        client = ClientFactory(config).create(card)
        context = ClientCallContext(
            service_parameters={"Authorization": f"Bearer {token}"} if token else None
        )
        loop = asyncio.get_running_loop()
        measure_from = loop.time() + args.warmup
        measure_to = measure_from + args.duration
        latencies: list[float] = []
        errors: list[str] = []
        counted = 0
        sent = 0

        async def worker(index: int) -> None:
            nonlocal counted, sent
            while (began := loop.time()) < measure_to:
                sent += 1
                parts = [Part(text=f"hello {sent}")]
                if args.mode == "mesh":
                    parts.append(new_data_part({"target_agent": "echo"}))
                message = Message(
                    message_id=f"b-{index}-{sent}",
                    role=Role.ROLE_USER,
                    parts=parts,
                    context_id=sessions[index],
                )
                try:
                    async for _ in client.send_message(SendMessageRequest(message=message), context=context):
                        pass
                except Exception as error:
                    errors.append(f"{type(error).__name__}: {error}"[:200])
                    if len(errors) > 100:
                        return
                    continue
                ended = loop.time()
                if measure_from <= ended <= measure_to:
                    counted += 1
                    if began >= measure_from:
                        latencies.append(ended - began)

        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
        await client.close()
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")
        )

    say(
        "RESULT "
        + json.dumps(
            {
                "rate": counted / args.duration,
                "p50_ms": pct(0.5),
                "p99_ms": pct(0.99),
                "errors": len(errors),
                "first_error": errors[0] if errors else "",
            }
        )
    )


async def spawn(name: str, role: str, *extra: str) -> Child:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--role",
        role,
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    return Child(name, process)


async def parent(args: argparse.Namespace) -> None:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    mesh = await spawn("mesh", "mesh")
    plain = await spawn("plain", "plain")
    children = [mesh, plain]
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    try:
        mesh_base, mesh_grpc = (await mesh.expect("READY", 60)).split()
        agent = await spawn("agent", "agent", "--target", mesh_grpc)
        children.append(agent)
        await agent.expect("READY", 60)
        plain_base, plain_grpc = (await plain.expect("READY", 60)).split()
        targets = {"mesh": f"{mesh_base},{mesh_grpc}", "plain": f"{plain_base},{plain_grpc}"}
        for round_no in range(args.rounds):
            for concurrency in concurrencies:
                for binding in args.bindings.split(","):
                    modes = ("mesh", "plain") if round_no % 2 == 0 else ("plain", "mesh")
                    for mode in modes:
                        client = await spawn(
                            "client",
                            "client",
                            "--mode", mode, "--binding", binding, "--target", targets[mode],
                            "--concurrency", str(concurrency),
                            "--duration", str(args.duration), "--warmup", str(args.warmup),
                        )  # fmt: skip
                        try:
                            result = json.loads(
                                await client.expect("RESULT", args.warmup + args.duration + 60)
                            )
                        finally:
                            await client.stop()
                        results.setdefault((binding, mode, concurrency), []).append(result)
                        print(
                            f"round {round_no + 1} {binding:7} c={concurrency:<3} {mode:5} {_fmt(result)}",
                            flush=True,
                        )
    finally:
        for child in reversed(children):  # the agent before the mesh it is connected to
            await child.stop()
    print(f"\ncommit {revision('svantic_grpc', 'bench')}; medians of {args.rounds} round(s)\n")
    print("| binding | clients | plain a2a-sdk msgs/s (p50, p99) | mesh msgs/s (p50, p99) | mesh/plain |")
    print("|---|---|---|---|---|")
    for binding in args.bindings.split(","):
        for concurrency in concurrencies:
            plain_rate = statistics.median(r["rate"] for r in results[(binding, "plain", concurrency)])
            mesh_rate = statistics.median(r["rate"] for r in results[(binding, "mesh", concurrency)])
            p = _latency(results[(binding, "plain", concurrency)])
            m = _latency(results[(binding, "mesh", concurrency)])
            ratio = mesh_rate / plain_rate if plain_rate else float("nan")
            print(
                f"| {binding} | {concurrency} | {plain_rate:.0f} ({p}) | {mesh_rate:.0f} ({m}) "
                f"| {ratio:.2f}x |"
            )


def _latency(rows: list[dict[str, Any]]) -> str:
    p50 = statistics.median(r["p50_ms"] for r in rows)
    p99 = statistics.median(r["p99_ms"] for r in rows)
    return f"{p50:.1f} ms, {p99:.1f} ms"


def _fmt(result: dict[str, Any]) -> str:
    text = f"{result['rate']:8.1f} msgs/s  p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms"
    if result["errors"]:
        text += f"  errors {result['errors']} ({result['first_error']})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,16", help="concurrent clients; a comma list runs each")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each point")
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds (the order of mesh and plain alternates)"
    )
    parser.add_argument("--bindings", default=",".join(BINDINGS), help="JSONRPC, GRPC or both")
    parser.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="mesh", help=argparse.SUPPRESS)
    parser.add_argument("--binding", default="JSONRPC", help=argparse.SUPPRESS)
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "parent":
        asyncio.run(parent(args))
        return
    watchdog(600)
    if args.role == "client":
        args.concurrency = int(args.concurrency)
    runner = {"mesh": run_mesh, "agent": run_agent, "plain": run_plain, "client": run_client}[args.role]
    asyncio.run(runner(args))


if __name__ == "__main__":
    main()
