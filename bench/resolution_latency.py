"""Resolution latency: from a human's answer arriving at the mesh to the agent holding the decision.

Run from the repository root::

    .venv/bin/python bench/resolution_latency.py                      # ~15 s
    .venv/bin/python bench/resolution_latency.py --requests 500 --concurrency 4
    .venv/bin/python bench/resolution_latency.py --modes token        # the webhook callback token only

What runs, each in its own process (``subprocess``), all on 127.0.0.1:

* **mesh**: a ``MeshServer`` (in-memory store, development mode on loopback) with
  the policy ``deletes`` (``crm.delete_*`` requires approval) and the webhook
  adapter (``adapters.webhook``): one target, this benchmark's own receiver, and
  an inbound secret for signed resolutions. Both secrets are made per run and
  reach the server through environment variables, as in production.
* **agent**: a connected agent (``ConnectedAgent``, type ``crm``) whose handler
  calls ``await reply.ask_approval("crm.delete_records", {"ids": [n]})``, takes
  ``time.perf_counter()`` the moment the decision is back in the handler, writes
  it to its stdout pipe, and completes the message.
* **bench** (this process): the webhook receiver (records each ``input.required``
  notification with its callback token, after checking its signature) and the
  client. For each request it sends a message to the agent (``SendMessage``,
  which returns once the message is input-required), waits for the
  notification, then resolves it with ``approve`` one of three ways:

  - ``token``: ``POST /webhooks/receive`` with ``{"callback_token", "decision"}``
    (the benchmark of issue 4);
  - ``signed``: the same POST signed with the inbound secret (Standard Webhooks
    headers, ``request_id`` and ``tenant_id`` in the body) instead of a token;
  - ``grpc``: ``MessageService.ResolveInput`` over gRPC, for comparison.

  It takes ``time.perf_counter()`` just before the POST (or the call) leaves; the
  figure is the agent's timestamp minus that one. The request is signed and the
  body built before the clock starts. The modes alternate request by request, so
  drift of the machine affects them alike. After each measurement the bench waits
  (untimed) until the message is completed before the worker's next request.

Clock: ``time.perf_counter()`` in both processes. On Linux it is
``clock_gettime(CLOCK_MONOTONIC)``, one system-wide clock, so timestamps taken in
the agent process and in this one compare directly; the header prints the clock's
implementation, and the run refuses to start when it is not system-wide monotonic.

Reported per mode: p50/p90/p99/max of resolution -> agent (the benchmark), of
resolution -> HTTP/gRPC answer back at the resolver ("ack"), and of message sent
-> notification received at the webhook target ("notify", the outbound path, the
same for every mode). HTTP uses one keep-alive connection, as a busy resolver would.

Every process stops by itself: children when the parent closes their stdin, and
each after ``--max-seconds`` whatever happens; every wait in the parent is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import platform
import secrets
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _child import Child, revision, say, start_role, until_stdin_closes, watchdog

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
HOST = "127.0.0.1"
DEV_CLIENT = ("svantic", "your-secret")  # the loopback-only development credential
DEV_TENANT = "dev"
TARGET_SECRET_ENV = "BENCH_WEBHOOK_TARGET_SECRET"
INBOUND_SECRET_ENV = "BENCH_WEBHOOK_INBOUND_SECRET"
TOOL = "crm.delete_records"
MODES = ("token", "signed", "grpc")
STEP_TIMEOUT_S = 10.0  # any single wait of the parent


# --------------------------------------------------------------------------- children


async def run_mesh_server(args: argparse.Namespace) -> None:
    from svantic_grpc.config import parse_settings
    from svantic_grpc.server import MeshServer

    settings = parse_settings(
        {
            "grpc_address": f"{HOST}:0",
            "http_address": f"{HOST}:{args.http_port}",
            "session_ttl_ms": 0,
            "shutdown_grace_s": 0,
            "store": "memory",
            "log_level": "WARNING",
            "dispatch": {"max_dispatches_per_session": 0},
            "policies": [
                {"name": "deletes", "match": {"tool": "crm.delete_*"}, "enforcement": "require_approval"}
            ],
            "adapters": {
                "webhook": {
                    "targets": [{"url": args.receiver_url, "secret_env": TARGET_SECRET_ENV}],
                    "inbound_secret_env": INBOUND_SECRET_ENV,
                }
            },
        }
    )
    # Only the two webhook secrets: no signing key, so the development default (loopback, 'svantic').
    env = {name: os.environ[name] for name in (TARGET_SECRET_ENV, INBOUND_SECRET_ENV)}
    server = MeshServer(settings, env=env)
    await server.start()
    say(f"PORT {server.port} {server.http.port}")
    try:
        await until_stdin_closes()
    finally:
        await server.stop(0)


async def run_agent(args: argparse.Namespace) -> None:
    from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Reply

    async def handle(dispatch: Dispatch, reply: Reply) -> None:
        approved = await reply.ask_approval(TOOL, {"ids": [len(dispatch.text)]})
        decided = time.perf_counter()  # the decision is in the handler's hands
        say(f"DECIDED {dispatch.text} {decided!r} {int(approved)}")
        await reply.complete("deleted" if approved else "kept")

    agent = ConnectedAgent(
        args.target,
        client_id=DEV_CLIENT[0],
        client_secret=DEV_CLIENT[1],
        agent_type="crm",
        instance_id="crm-bench-1",
        handler=handle,
    )
    task = asyncio.create_task(agent.run())
    connected = asyncio.create_task(agent.connected.wait())
    done, _ = await asyncio.wait({task, connected}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if connected not in done:
        task.cancel()
        raise SystemExit("the crm agent did not connect within 30s")
    say("READY")
    try:
        await until_stdin_closes()
    finally:
        await agent.stop()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(task, 5)


# --------------------------------------------------------------------------- parent


async def spawn(name: str, role: str, max_seconds: float, *extra: str, env: dict[str, str]) -> Child:
    process = await start_role(SCRIPT, role, max_seconds, *extra, env=env)
    return Child(name, process)


def _whsec() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Sample:
    mode: str
    latency_s: float
    """resolution sent -> decision in the agent's handler"""
    ack_s: float
    """resolution sent -> the resolver got its answer"""
    notify_s: float
    """message sent -> input.required received by the webhook target"""


@dataclass
class Rig:
    """What the parent measures with: the receiver's notifications and the agent's decisions."""

    target_secret: str
    inbound_secret: str
    notified: dict[str, asyncio.Future[tuple[float, dict[str, Any]]]] = field(default_factory=dict)
    decided: dict[str, asyncio.Future[tuple[float, bool]]] = field(default_factory=dict)
    bad_notifications: int = 0

    def expect(self, message_id: str) -> None:
        loop = asyncio.get_running_loop()
        self.notified[message_id] = loop.create_future()
        self.decided[message_id] = loop.create_future()

    async def receive(self, request: Any) -> Any:
        """The webhook target: keep each input.required notification, keyed by its message id."""
        from aiohttp import web
        from standardwebhooks import Webhook

        arrived = time.perf_counter()
        body = await request.text()
        try:
            payload = Webhook(self.target_secret).verify(
                body, {k.lower(): v for k, v in request.headers.items()}
            )
        except Exception:
            self.bad_notifications += 1
            return web.Response(status=400, text="bad signature")
        if payload.get("type") == "input.required":
            future = self.notified.get(payload["request"]["message"])
            if future is not None and not future.done():
                future.set_result((arrived, payload))
        return web.Response(text="ok")

    async def read_agent(self, agent: Child) -> None:
        """``DECIDED <message id> <perf_counter> <approved>`` lines from the agent process."""
        while True:
            assert agent.process.stdout is not None
            raw = await agent.process.stdout.readline()
            if not raw:
                return
            parts = raw.decode().split()
            if len(parts) == 4 and parts[0] == "DECIDED":
                future = self.decided.get(parts[1])
                if future is not None and not future.done():
                    future.set_result((float(parts[2]), parts[3] == "1"))


class Worker:
    """One session; sends a message, resolves its approval one way, repeats."""

    def __init__(self, number: int, rig: Rig, http: Any, stubs: Any, md: Any, base_url: str) -> None:
        self.number = number
        self.rig = rig
        self.http = http
        self.messages, self.sessions = stubs
        self.md = md
        self.base_url = base_url
        self.session_id = ""
        self.count = 0

    async def open(self) -> None:
        from svantic_grpc.pb import session_service_pb2

        response = await self.sessions.InitSession(session_service_pb2.InitSessionRequest(), metadata=self.md)
        self.session_id = response.session.session_id

    async def one(self, mode: str) -> Sample:
        from svantic_grpc.pb import message_service_pb2, message_types_pb2

        self.count += 1
        message_id = f"bench-w{self.number}-{self.count}-{mode}"
        self.rig.expect(message_id)
        data = message_types_pb2.Part()
        data.data.update({"target_agent": "crm"})
        outgoing = message_service_pb2.OutgoingMessage(
            message_id=message_id, parts=[message_types_pb2.Part(text=message_id), data]
        )
        sent = time.perf_counter()
        response = await self.messages.SendMessage(
            message_service_pb2.SendMessageRequest(session_id=self.session_id, message=outgoing),
            metadata=self.md,
            timeout=STEP_TIMEOUT_S,
        )
        if response.message.state != message_types_pb2.MESSAGE_STATE_INPUT_REQUIRED:
            raise RuntimeError(f"{message_id}: expected input-required, got {response.message}")
        # The futures stay registered until they are done: the answers may come before we wait.
        notified_at, notification = await asyncio.wait_for(self.rig.notified[message_id], STEP_TIMEOUT_S)
        del self.rig.notified[message_id]
        request = notification["request"]
        callback = notification["callback"]
        if request["tool_call"]["name"] != TOOL or callback is None:
            raise RuntimeError(f"{message_id}: unexpected notification {notification}")
        if callback["url"] != self.base_url + "/webhooks/receive":
            raise RuntimeError(f"callback URL {callback['url']} is not the mesh's {self.base_url}")

        began, acked = await self._resolve(mode, request, callback)
        decided_at, approved = await asyncio.wait_for(self.rig.decided[message_id], STEP_TIMEOUT_S)
        del self.rig.decided[message_id]
        if not approved:
            raise RuntimeError(f"{message_id}: the agent was told no")
        await self._completed(message_id)
        return Sample(mode, decided_at - began, acked - began, notified_at - sent)

    async def _resolve(
        self, mode: str, request: dict[str, Any], callback: dict[str, Any]
    ) -> tuple[float, float]:
        """Send ``approve`` the way ``mode`` says; (clock before it left, clock when its answer came)."""
        from svantic_grpc.pb import message_service_pb2, message_types_pb2

        if mode == "grpc":
            call = message_service_pb2.ResolveInputRequest(
                request_id=request["id"],
                resolution=message_types_pb2.Resolution(decision=message_types_pb2.DECISION_APPROVE),
            )
            began = time.perf_counter()
            await self.messages.ResolveInput(call, metadata=self.md, timeout=STEP_TIMEOUT_S)
            return began, time.perf_counter()
        if mode == "token":
            body = json.dumps({"callback_token": callback["token"], "decision": "approve"})
            headers = {"content-type": "application/json"}
        else:
            from standardwebhooks import Webhook

            body = json.dumps(
                {
                    "request_id": request["id"],
                    "tenant_id": request["tenant"],
                    "decision": "approve",
                    "responder": "bench",
                }
            )
            webhook_id = f"msg_{secrets.token_hex(12)}"
            stamp = int(time.time())
            signature = Webhook(self.rig.inbound_secret).sign(
                webhook_id, datetime.fromtimestamp(stamp, tz=UTC), body
            )
            headers = {
                "content-type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": str(stamp),
                "webhook-signature": signature,
            }
        url = callback["url"] if mode == "token" else self.base_url + "/webhooks/receive"
        began = time.perf_counter()
        async with self.http.post(url, data=body.encode(), headers=headers) as answer:
            text = await answer.text()
            acked = time.perf_counter()
        if answer.status != 200 or json.loads(text).get("status") != "resolved":
            raise RuntimeError(f"{mode} resolution refused: HTTP {answer.status} {text}")
        return began, acked

    async def _completed(self, message_id: str) -> None:
        from svantic_grpc.pb import message_service_pb2, message_types_pb2

        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            response = await self.messages.GetMessage(
                message_service_pb2.GetMessageRequest(session_id=self.session_id, message_id=message_id),
                metadata=self.md,
                timeout=STEP_TIMEOUT_S,
            )
            if response.message.state == message_types_pb2.MESSAGE_STATE_COMPLETED:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{message_id} stayed {response.message.state}")
            await asyncio.sleep(0.002)


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p * len(ordered)) - 1))] * 1000

    return {
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": ordered[-1] * 1000,
        "mean": statistics.fmean(ordered) * 1000,
    }


def _revision() -> str:
    return revision("svantic_grpc", "adapters")


async def parent(args: argparse.Namespace) -> int:
    import aiohttp
    import grpc
    from aiohttp import web
    from grpc import aio

    from svantic_grpc.pb import auth_service_pb2
    from svantic_grpc.pb.auth_service_pb2_grpc import AuthServiceStub
    from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub
    from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise SystemExit(f"--modes: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(MODES)}")
    clock = time.get_clock_info("perf_counter")
    if sys.platform != "linux" or "CLOCK_MONOTONIC" not in clock.implementation:
        raise SystemExit(
            f"perf_counter is {clock.implementation} here: not known to be one clock across processes"
        )
    print(
        f"nproc {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}) | Python "
        f"{platform.python_version()} | grpcio {grpc.__version__} | aiohttp {aiohttp.__version__}"
        f" | {platform.machine()} {platform.system()} {platform.release()} | svantic-grpc at {_revision()}"
    )
    print(
        f"{args.requests} requests per mode ({', '.join(modes)}, interleaved) + {args.warmup} warm-up each,"
        f" concurrency {args.concurrency}; clock: time.perf_counter = {clock.implementation}"
        " in the bench and agent processes"
    )
    sys.stdout.flush()

    rig = Rig(target_secret=_whsec(), inbound_secret=_whsec())
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SVANTIC_")}
    child_env |= {TARGET_SECRET_ENV: rig.target_secret, INBOUND_SECRET_ENV: rig.inbound_secret}
    app = web.Application()
    app.router.add_post("/hook", rig.receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    receiver_url = f"http://{HOST}:{runner.addresses[0][1]}/hook"

    life = 60 + args.max_run_s
    children: list[Child] = []
    samples: list[Sample] = []
    reader: asyncio.Task[None] | None = None
    started = time.monotonic()
    try:
        mesh = await spawn(
            "mesh-server",
            "mesh-server",
            life,
            "--receiver-url",
            receiver_url,
            "--http-port",
            str(_free_port()),
            env=child_env,
        )
        children.append(mesh)
        grpc_port, http_port = (await mesh.expect("PORT", 60)).split()
        target = f"{HOST}:{grpc_port}"
        agent = await spawn("agent", "agent", life, "--target", target, env=child_env)
        children.append(agent)
        await agent.expect("READY", 60)
        reader = asyncio.create_task(rig.read_agent(agent))

        async with (
            aio.insecure_channel(target) as channel,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT_S)) as http,
        ):
            token = await AuthServiceStub(channel).GetToken(
                auth_service_pb2.GetTokenRequest(
                    client_id=DEV_CLIENT[0], client_secret=DEV_CLIENT[1], agent_type="bench-resolver"
                )
            )
            md = (("authorization", f"Bearer {token.token}"),)
            stubs = (MessageServiceStub(channel), SessionServiceStub(channel))
            base_url = f"http://{HOST}:{http_port}"
            workers = [Worker(n, rig, http, stubs, md, base_url) for n in range(args.concurrency)]
            for worker in workers:
                await worker.open()

            async def drive(worker: Worker, plan: list[tuple[str, bool]]) -> None:
                for mode, counted in plan:
                    if time.monotonic() - started > args.max_run_s:
                        raise RuntimeError(f"stopped after --max-run-s {args.max_run_s:g}s")
                    sample = await worker.one(mode)
                    if counted:
                        samples.append(sample)

            # Every mode in turn, request by request: warm-ups first, then the counted ones.
            plan = [(mode, False) for _ in range(args.warmup) for mode in modes]
            plan += [(mode, True) for _ in range(args.requests) for mode in modes]
            shares = [plan[n :: args.concurrency] for n in range(args.concurrency)]
            await asyncio.gather(*(drive(w, share) for w, share in zip(workers, shares, strict=True)))
    finally:
        for child in reversed(children):
            await child.stop()
        if reader is not None:
            reader.cancel()
        await runner.cleanup()

    elapsed = time.monotonic() - started
    print(f"\n{len(samples)} resolutions measured in {elapsed:.1f}s (all approved, every message completed)")
    if rig.bad_notifications:
        print(f"WARNING: {rig.bad_notifications} notifications failed signature verification")
    header = (
        f"{'mode':<8}{'n':>5}  {'resolution -> agent ms':^34}  {'-> resolver answer ms':^22}"
        f"  {'send -> notified ms':^22}"
    )
    sub = (
        f"{'':<8}{'':>5}  {'p50':>7}{'p90':>9}{'p99':>9}{'max':>9}"
        f"  {'p50':>10}{'p99':>10}  {'p50':>10}{'p99':>10}"
    )
    print(header)
    print(sub)
    print("-" * len(sub))
    for mode in modes:
        rows = [s for s in samples if s.mode == mode]
        lat = _percentiles([s.latency_s for s in rows])
        ack = _percentiles([s.ack_s for s in rows])
        notify = _percentiles([s.notify_s for s in rows])
        print(
            f"{mode:<8}{len(rows):>5}  {lat['p50']:>7.2f}{lat['p90']:>9.2f}{lat['p99']:>9.2f}"
            f"{lat['max']:>9.2f}"
            f"  {ack['p50']:>10.2f}{ack['p99']:>10.2f}  {notify['p50']:>10.2f}{notify['p99']:>10.2f}"
        )
    print(
        "\nresolution -> agent: perf_counter just before the POST/call leaves the bench, to perf_counter in"
        " the agent's handler when ask_approval returns (one CLOCK_MONOTONIC across the processes)."
    )
    print(
        "token = POST /webhooks/receive with the callback token; signed = the same POST with a Standard"
        " Webhooks signature; grpc = MessageService.ResolveInput."
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="measured resolutions per mode")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured resolutions per mode first")
    parser.add_argument("--concurrency", type=int, default=1, help="workers, each with its own session")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)} (default: all)"
    )
    parser.add_argument(
        "--max-run-s", type=float, default=120.0, help="stop (with an error) if the run takes longer"
    )
    # Internal: how the parent starts its children.
    parser.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    parser.add_argument("--receiver-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--http-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "parent":
        if args.requests < 1 or args.warmup < 0 or args.concurrency < 1:
            raise SystemExit("--requests and --concurrency must be >= 1, --warmup >= 0")
        raise SystemExit(asyncio.run(parent(args)))
    logging.basicConfig(level=logging.ERROR)
    if args.max_seconds:
        watchdog(args.max_seconds)
    roles = {"mesh-server": run_mesh_server, "agent": run_agent}
    asyncio.run(roles[args.role](args))


if __name__ == "__main__":
    main()
