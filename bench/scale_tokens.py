"""Tokens at scale (issue 12, item 7): server CPU for 1,000 agents getting a token.

Run from the repository root::

    .venv/bin/python bench/scale_tokens.py                  # ~1-2 min on 2 cores (1,000 scrypts)
    .venv/bin/python bench/scale_tokens.py --agents 200     # quicker
    .venv/bin/python bench/scale_tokens.py --cost 10        # stored hashes made with scrypt N=2**10

The mesh server runs in its own process (``MeshServer``, memory store, every stored
hash made with scrypt N=2**``--cost``, by default the production 2**14) with one
tenant holding ``--agents`` + 1 credentials: ``shared`` (used by every agent in the
shared phases) and ``agent-NNNN`` (one per agent in the distinct phases). The distinct
credentials share one hash string (one secret, one salt) so the setup costs one scrypt,
not a thousand: the server still verifies each client id on its own (what it
remembers is per client id and hash).

Each agent is what ``ConnectedAgent`` does when it (re)connects: a new channel (TCP and
HTTP/2 set-up included), ``GetToken``, close. ``--concurrency`` agents at a time. An
agent refused with RESOURCE_EXHAUSTED waits the delay the server names (bounded) and
tries again, as a client honouring the retry hint would; the refusals are counted.

Phases, in this order, each measured as the server process's user+sys CPU from /proc:

1. shared, first: every agent with the one credential, on a server that has verified
   nothing yet (as after a restart);
2. shared, again: the same, once more;
3. distinct, first: every agent with its own credential, none verified yet;
4. distinct, again;
5. failed attempts: wrong secrets from this (one) peer until it is limited, then
   ``--failed`` more, measured: what an attempt costs once the limit holds.

Printed against the target: 1,000 agents (re)connecting <= 5 s of server CPU in all.
The reference "without the cache" is this machine's scrypt cost (measured here) x agents.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import secrets
import sys
import tempfile
import time
from pathlib import Path

import grpc
from _child import Child, revision, say, until_stdin_closes, watchdog
from grpc import aio

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
HOST = "127.0.0.1"
TARGET_S = 5.0
TARGET_AGENTS = 1000
MAX_TRIES = 100  # per agent: refused attempts retried at most this often
MAX_WAIT_S = 5.0  # longest retry delay honoured


# --------------------------------------------------------------------------- child


async def run_mesh_server(data: dict[str, object]) -> None:
    from svantic_grpc.config import parse_settings
    from svantic_grpc.server import MeshServer

    server = MeshServer(parse_settings(data), env={"SVANTIC_SIGNING_KEY": os.environ["BENCH_SIGNING_KEY"]})
    await server.start()
    say(f"PORT {server.port}")
    try:
        await until_stdin_closes()
    finally:
        await server.stop(0)


# --------------------------------------------------------------------------- parent


class Server(Child):
    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pushback_s(error: aio.AioRpcError) -> float:
    trailers = dict(error.trailing_metadata() or ())
    return min(MAX_WAIT_S, int(trailers.get("grpc-retry-pushback-ms", "1000")) / 1000)


class Agents:
    """Agents getting tokens: each a new channel, ``GetToken``, close."""

    def __init__(self, target: str, concurrency: int) -> None:
        from svantic_grpc.pb import auth_service_pb2, auth_service_pb2_grpc

        self._pb, self._stub = auth_service_pb2, auth_service_pb2_grpc.AuthServiceStub
        self._target = target
        self._gate = asyncio.Semaphore(concurrency)
        self.refusals = 0

    async def one(self, client_id: str, secret: str) -> None:
        async with self._gate, aio.insecure_channel(self._target) as channel:
            request = self._pb.GetTokenRequest(client_id=client_id, client_secret=secret, agent_type="bench")
            for _ in range(MAX_TRIES):
                try:
                    await self._stub(channel).GetToken(request, timeout=60)
                    return
                except aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    self.refusals += 1
                    await asyncio.sleep(_pushback_s(error))
            raise RuntimeError(f"{client_id}: still refused after {MAX_TRIES} tries")


async def _phase(server: Server, name: str, work: list[tuple[str, str]], agents: Agents) -> float:
    agents.refusals = 0
    cpu, wall = server.cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(agents.one(client_id, secret) for client_id, secret in work))
    cpu, wall = server.cpu_seconds() - cpu, time.perf_counter() - wall
    scaled = cpu * TARGET_AGENTS / len(work)
    verdict = "met" if scaled <= TARGET_S else "MISSED"
    print(
        f"{name:<16} {len(work):>5} agents  server CPU {cpu:7.2f} s ({cpu / len(work) * 1000:6.2f} ms/agent)"
        f"  per 1,000: {scaled:6.2f} s vs {TARGET_S:g} s target: {verdict}"
        f"  | wall {wall:5.1f} s, refused-and-retried {agents.refusals}"
    )
    return cpu


async def _failed_attempts(server: Server, target: str, count: int, scrypt_ms: float) -> None:
    from svantic_grpc.pb import auth_service_pb2, auth_service_pb2_grpc

    async with aio.insecure_channel(target) as channel:
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)

        async def attempt(n: int) -> grpc.StatusCode:
            request = auth_service_pb2.GetTokenRequest(
                client_id=f"guess-{n}", client_secret="wrong", agent_type="bench"
            )
            try:
                await stub.GetToken(request, timeout=60)
            except aio.AioRpcError as error:
                return error.code()
            raise RuntimeError("a wrong secret was accepted")

        for n in range(1000):  # until this peer is limited (bounded)
            if await attempt(n) == grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
        cpu, wall = server.cpu_seconds(), time.perf_counter()
        codes = [await attempt(1000 + n) for n in range(count)]
        cpu, wall = server.cpu_seconds() - cpu, time.perf_counter() - wall
    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    checked = codes.count(grpc.StatusCode.UNAUTHENTICATED)
    per_refused = max(0.0, cpu - checked * scrypt_ms / 1000) / max(refused, 1) * 1000
    print(
        f"failed attempts  {count:>5} wrong secrets once limited: {refused} refused (RESOURCE_EXHAUSTED),"
        f" {checked} let through as the bucket refilled (scrypt each); server CPU {cpu:.2f} s in {wall:.1f} s"
        f" = {cpu / count * 1000:.2f} ms/attempt, ~{per_refused:.2f} ms per refused attempt"
        f" (an unlimited wrong secret: one scrypt, {scrypt_ms:.0f} ms)"
    )


def _scrypt_ms(cost: int) -> float:
    from svantic_grpc.core.auth import hash_secret, verify_secret

    stored = hash_secret("reference", cost=2**cost)
    start = time.process_time()
    for _ in range(5):
        verify_secret("reference", stored)
    return (time.process_time() - start) / 5 * 1000


def _settings(agents: int, secret: str, cost: int) -> dict[str, object]:
    from svantic_grpc.core.auth import hash_secret

    stored = hash_secret(secret, cost=2**cost)
    credentials = [{"client_id": "shared", "secret_hash": stored}]
    credentials += [{"client_id": f"agent-{n:04d}", "secret_hash": stored} for n in range(agents)]
    return {
        "grpc_address": f"{HOST}:0",
        "http_address": f"{HOST}:0",
        "shutdown_grace_s": 0,
        "log_level": "WARNING",
        "metrics": {"enabled": False},
        "tenants": [{"tenant_id": "bench", "credentials": credentials}],
    }


async def parent(args: argparse.Namespace) -> int:
    print(
        f"nproc {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))})"
        f" | Python {platform.python_version()} | grpcio {grpc.__version__}"
        f" | svantic-grpc at {revision('svantic_grpc')}"
    )
    scrypt_ms = _scrypt_ms(args.cost)
    print(
        f"{args.agents} agents, {args.concurrency} at a time, each a new channel + GetToken;"
        f" scrypt (N=2**{args.cost}) here: {scrypt_ms:.1f} ms CPU, so without the cache 1,000 tokens cost"
        f" {scrypt_ms:.0f} s of server CPU"
    )
    secret = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "settings.json"
        path.write_text(json.dumps(_settings(args.agents, secret, args.cost)))
        env = {**os.environ, "BENCH_SIGNING_KEY": secrets.token_urlsafe(48)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), "--role", "mesh-server", "--settings", str(path),
            "--max-seconds", str(args.max_run_s),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
        )  # fmt: skip
        server = Server("mesh-server", process)
        try:
            target = f"{HOST}:{await server.expect('PORT', 60)}"
            agents = Agents(target, args.concurrency)
            shared = [("shared", secret)] * args.agents
            distinct = [(f"agent-{n:04d}", secret) for n in range(args.agents)]
            await _phase(server, "shared, first", shared, agents)
            await _phase(server, "shared, again", shared, agents)
            await _phase(server, "distinct, first", distinct, agents)
            await _phase(server, "distinct, again", distinct, agents)
            await _failed_attempts(server, target, args.failed, scrypt_ms)
        finally:
            await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=TARGET_AGENTS, help="agents (credentials) per phase")
    parser.add_argument("--concurrency", type=int, default=100, help="agents getting a token at once")
    parser.add_argument("--failed", type=int, default=1000, help="wrong secrets measured once limited")
    parser.add_argument("--cost", type=int, default=14, help="scrypt N=2**COST of the stored hashes")
    parser.add_argument("--max-run-s", type=float, default=600.0, help="the server stops itself after this")
    # Internal: how the parent starts the server.
    parser.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="", help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "parent":
        if args.agents < 1 or args.concurrency < 1 or args.failed < 1 or not 1 <= args.cost <= 20:
            raise SystemExit("--agents, --concurrency and --failed must be >= 1, --cost 1..20")
        return asyncio.run(asyncio.wait_for(parent(args), args.max_run_s))
    logging.basicConfig(level=logging.ERROR)
    if args.max_seconds:
        watchdog(args.max_seconds)
    asyncio.run(run_mesh_server(json.loads(Path(args.settings).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
