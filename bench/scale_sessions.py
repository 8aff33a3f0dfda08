"""Sessions at scale (issue 12, items 3 and 6): memory per session, session churn, ListSessions pages.

Run from the repository root::

    .venv/bin/python bench/scale_sessions.py                      # 100,000 sessions, a few minutes
    .venv/bin/python bench/scale_sessions.py --sessions 20000 --list-at 5000,20000 --duration 3

Each server runs in its own process on 127.0.0.1 (in-memory store, development
credential, the default idle TTL so the reaper tracks every session); this process is
the gRPC client.

* **(a) memory**: a mesh server; ``--sessions`` are opened with ``InitSession``
  (``--create-concurrency`` calls in flight). The server's RSS (``/proc``) grows by the
  figure per idle open session, measured from a baseline taken after a warm-up. Then
  ``--close`` of them are closed with ``CloseSession``: the RSS they add per closed
  session before the retention sweep; then the sweep runs (the server's own
  ``RetentionSweeper.run_once``, with ``closed_sessions_s`` 1) and the store is counted.
* **(b) churn**: a fresh mesh server and a bare ``grpc.aio`` unary echo server (as in
  ``bench/message_roundtrip.py``). ``--concurrency`` tasks each do, until the time is up,
  ``InitSession`` then ``CloseSession`` (mesh) or two echo calls (bare): pairs/s,
  alternating for ``--rounds`` rounds, and each server's CPU (user+sys) per pair. The two
  clients are equally lean: bytes in and out, each multi-callable, fixed request and the
  metadata made once; the mesh pair parses InitSession's answer for the session id (as any
  client must) and leaves CloseSession's unread, as the bare pair leaves its echoes.
  With ``--instructions``, instead: each server under valgrind's callgrind (all its
  threads), its instructions per pair over ``--pairs`` pairs after a warm-up, the same
  on every machine load; with ``--profile FILE`` the mesh server's own Python under
  ``cProfile`` during the first round's measured window (its stats written to FILE).
* **(c) listing**: on the (a) server, at each count of ``--list-at``: ``ListSessions``
  pages of 50 (first page; a deep page from a cursor at the middle; a page filtered on
  active and paused), ``--list-calls`` each, one at a time; p50 and p90 client latency,
  beside an echo call's.

Targets: (a) <= 2 KB per idle open session; (b) churn >= 0.75x bare; (c) <= 5 ms per page
of 50 at 100,000 sessions, the same whatever the total.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from _child import Child, revision, say, start_role, watchdog
from grpc import aio

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
HOST = "127.0.0.1"
ECHO_METHOD = "/bench.Echo/Echo"
DEV_CLIENT = ("svantic", "your-secret")  # the loopback-only development credential
PAGE = 50
TICK = os.sysconf("SC_CLK_TCK")
OPEN_STATUSES = (2, 3)  # SESSION_STATUS_ACTIVE, SESSION_STATUS_PAUSED

# --------------------------------------------------------------------------- children


def _own_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def _commands(handle: Callable[[str], Awaitable[str | None]]) -> None:
    """Answer the parent's stdin lines until it closes stdin."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        with contextlib.suppress(Exception):
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line.strip())
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, daemon=True).start()
    while (line := await lines.get()) is not None:
        answer = await handle(line)
        if answer is not None:
            say(answer)


async def run_mesh(args: argparse.Namespace) -> None:
    from svantic_grpc.config import parse_settings
    from svantic_grpc.server import MeshServer

    settings = parse_settings(
        {
            "grpc_address": f"{HOST}:0",
            "http_address": f"{HOST}:0",
            "shutdown_grace_s": 0,
            "store": "memory",
            "log_level": "WARNING",
            # Closed sessions are due at once, but swept only when the parent says so.
            "retention": {"closed_sessions_s": 1, "sweep_interval_s": 86_400},
        }
    )
    server = MeshServer(settings, env={})
    await server.start()
    say(f"PORT {server.port}")
    store = server.mesh.store

    async def handle(line: str) -> str | None:
        if line == "SWEEP":
            started = time.perf_counter()
            swept = await server.mesh.retention.run_once()
            return f"SWEPT {swept} {time.perf_counter() - started:.3f}"
        if line == "COUNT":
            sessions = getattr(store, "_sessions", {})
            logs = getattr(store, "_events", {})
            return f"COUNT {len(sessions)} {len(logs)}"
        if line == "RSS":  # after a full collection, so garbage of the last calls does not count
            gc.collect()
            return f"RSS {_own_rss()}"
        if line == "PROFILE":
            profiler.enable()
            return "PROFILING"
        if line.startswith("PROFILED "):
            profiler.disable()
            profiler.dump_stats(line.split(" ", 1)[1])
            return "PROFILED"
        return None

    import cProfile

    profiler = cProfile.Profile()

    try:
        await _commands(handle)
    finally:
        await server.stop(0)


async def run_bare(args: argparse.Namespace) -> None:
    async def echo(request: bytes, context: aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo)},
    )
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    say(f"PORT {port}")

    async def ignore(line: str) -> None:
        return None

    await _commands(ignore)
    await server.stop(0)


# --------------------------------------------------------------------------- parent side


class Server:
    """A server child: its port, RSS and CPU from /proc, and commands on stdin."""

    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.port = port
        self.pid = child.process.pid
        self.callgrind: Path | None = None
        self.dumps = 0

    @classmethod
    async def spawn(
        cls, role: str, max_seconds: float, code: Path | None = None, callgrind: Path | None = None
    ) -> Server:
        """Start a server child; with ``code``, its ``svantic_grpc`` is that checkout's; with
        ``callgrind``, under valgrind's callgrind writing its files there (``count`` reads them)."""
        env = None if code is None else {**os.environ, "PYTHONPATH": str(code)}
        if callgrind is None:
            process = await start_role(SCRIPT, role, max_seconds, env=env)
        else:
            name = f"{role}-base" if code is not None else role
            process = await asyncio.create_subprocess_exec(
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={callgrind / name}.%p",
                sys.executable,
                str(SCRIPT),
                "--role",
                role,
                "--max-seconds",
                str(max_seconds),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                cwd=ROOT,
                env=env,
            )
        child = Child(role, process)
        server = cls(child, int(await child.expect("PORT", 60 if callgrind is None else 1800)))
        server.callgrind = callgrind
        return server

    async def count(self, flag: str) -> int:
        """Under callgrind: ``--zero`` its counters, or ``--dump`` them and return the instructions
        since the zero (every thread of the process)."""
        await asyncio.to_thread(
            subprocess.run,
            ["callgrind_control", flag, str(self.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        if flag == "--zero":
            return 0
        assert self.callgrind is not None
        self.dumps += 1
        dump = next(self.callgrind.glob(f"*.{self.pid}.{self.dumps}"))  # the one this --dump wrote
        found = re.search(r"^summary: (\d+)", dump.read_text(), re.MULTILINE)
        assert found is not None, f"no summary in {dump}"
        return int(found[1])

    async def rss(self) -> int:
        """The server's RSS after a full garbage collection."""
        return int(await self.ask("RSS", "RSS"))

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    async def ask(self, command: str, answer: str, wait_s: float = 600) -> str:
        assert self.child.process.stdin is not None
        self.child.process.stdin.write(command.encode() + b"\n")
        await self.child.process.stdin.drain()
        return await self.child.expect(answer, wait_s)


class Mesh:
    """Client side of one mesh server: a channel and a token."""

    def __init__(self, channel: aio.Channel, token: str) -> None:
        from svantic_grpc.pb import session_service_pb2 as pb
        from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub

        self.channel = channel
        # Made once: grpc.aio builds a Metadata from a tuple of pairs on every call.
        self.md = aio.Metadata(("authorization", f"Bearer {token}"))
        self.sessions = SessionServiceStub(channel)
        # The churn pair's calls, made as lean as the bare pair's echo calls (bytes in, bytes out,
        # each multi-callable and fixed request made once): InitSession's answer is parsed for the
        # session id, as any client must; CloseSession's goes unread, as the echo's does.
        self._init_call = channel.unary_unary(
            "/svantic.v1.SessionService/InitSession", response_deserializer=pb.InitSessionResponse.FromString
        )
        self._close_call = channel.unary_unary("/svantic.v1.SessionService/CloseSession")
        self._init_request = pb.InitSessionRequest().SerializeToString()
        self._close_request = pb.CloseSessionRequest

    @classmethod
    async def connect(cls, channel: aio.Channel) -> Mesh:
        from svantic_grpc.pb import auth_service_pb2
        from svantic_grpc.pb.auth_service_pb2_grpc import AuthServiceStub

        token = await AuthServiceStub(channel).GetToken(
            auth_service_pb2.GetTokenRequest(
                client_id=DEV_CLIENT[0], client_secret=DEV_CLIENT[1], agent_type="bench-client"
            )
        )
        return cls(channel, token.token)

    async def pair(self) -> None:
        """One churn pair: InitSession, then CloseSession of the session it opened."""
        created = await self._init_call(self._init_request, metadata=self.md)
        request = self._close_request(session_id=created.session.session_id).SerializeToString()
        await self._close_call(request, metadata=self.md)

    async def init(self) -> tuple[float, str]:
        from svantic_grpc.pb import session_service_pb2 as pb

        created = await self.sessions.InitSession(pb.InitSessionRequest(), metadata=self.md)
        return created.session.created_at.ToNanoseconds() / 1e9, created.session.session_id

    async def close(self, session_id: str) -> None:
        from svantic_grpc.pb import session_service_pb2 as pb

        await self.sessions.CloseSession(pb.CloseSessionRequest(session_id=session_id), metadata=self.md)

    async def page(self, *, token: str = "", statuses: Sequence[int] = ()) -> int:
        from svantic_grpc.pb import session_service_pb2 as pb

        request = pb.ListSessionsRequest(page_size=PAGE, page_token=token, statuses=statuses)
        response = await self.sessions.ListSessions(request, metadata=self.md)
        return len(response.sessions)


async def _in_parallel(count: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> None:
    """``one(i)`` for i in range(count), ``concurrency`` at a time."""
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _latencies(call: Callable[[], Awaitable[object]], calls: int) -> tuple[float, float]:
    """p50 and p90 in ms of ``calls`` calls made one at a time (after two unmeasured)."""
    for _ in range(2):
        await call()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.9)]


async def memory_and_listing(args: argparse.Namespace) -> dict[str, object]:
    from svantic_grpc.stores._cursor import encode_cursor

    results: dict[str, object] = {}
    server = await Server.spawn("mesh", args.max_seconds)
    bare = await Server.spawn("bare", args.max_seconds)
    try:
        async with (
            aio.insecure_channel(f"{HOST}:{server.port}") as channel,
            aio.insecure_channel(f"{HOST}:{bare.port}") as bare_channel,
        ):
            mesh = await Mesh.connect(channel)
            echo = bare_channel.unary_unary(ECHO_METHOD)
            payload = b"x" * 64
            keys: list[tuple[float, str]] = []

            async def create(_: int) -> None:
                keys.append(await mesh.init())

            await _in_parallel(args.warmup_sessions, args.create_concurrency, create)
            await asyncio.sleep(1)
            base = await server.rss()
            started = time.perf_counter()
            listing: list[dict[str, object]] = []
            for target in sorted({*args.list_at, args.sessions}):
                missing = target - len(keys)
                if missing > 0:
                    await _in_parallel(missing, args.create_concurrency, create)
                if target not in args.list_at:
                    continue
                middle = sorted(keys)[len(keys) // 2]
                deep = encode_cursor(*middle)
                row: dict[str, object] = {"sessions": len(keys)}
                for name, call in (
                    ("echo", lambda: echo(payload)),
                    ("first", lambda: mesh.page()),
                    ("deep", lambda deep=deep: mesh.page(token=deep)),  # type: ignore[misc]
                    ("open only", lambda: mesh.page(statuses=OPEN_STATUSES)),
                ):
                    row[name] = await _latencies(call, args.list_calls)
                listing.append(row)
                print(f"  listed at {len(keys)} sessions", flush=True)
            created_s = time.perf_counter() - started
            await asyncio.sleep(1)
            opened = len(keys) - args.warmup_sessions
            per_open = (await server.rss() - base) / opened
            results.update(opened=opened, per_open=per_open, create_rate=opened / created_s, listing=listing)
            print(f"  opened {opened} sessions in {created_s:.0f} s", flush=True)

            to_close = [session_id for _, session_id in keys[: min(args.close, len(keys))]]
            before_close = await server.rss()

            async def close(i: int) -> None:
                await mesh.close(to_close[i])

            await _in_parallel(len(to_close), args.create_concurrency, close)
            await asyncio.sleep(1)
            per_closed = per_open + (await server.rss() - before_close) / max(len(to_close), 1)
            counted = (await server.ask("COUNT", "COUNT")).split()
            swept, sweep_s = (await server.ask("SWEEP", "SWEPT")).split()
            after = (await server.ask("COUNT", "COUNT")).split()
            results.update(
                closed=len(to_close),
                per_closed=per_closed,
                store_before_sweep=int(counted[0]),
                swept=int(swept),
                sweep_s=float(sweep_s),
                store_after_sweep=int(after[0]),
                logs_after_sweep=int(after[1]),
            )
    finally:
        await server.child.stop()
        await bare.child.stop()
    return results


async def churn(args: argparse.Namespace) -> dict[str, object]:
    server = await Server.spawn("mesh", args.max_seconds)
    bare = await Server.spawn("bare", args.max_seconds)
    base = await Server.spawn("mesh", args.max_seconds, args.base) if args.base else None
    rounds: list[dict[str, float]] = []
    profiled: list[str] = []
    try:
        async with (
            aio.insecure_channel(f"{HOST}:{server.port}") as channel,
            aio.insecure_channel(f"{HOST}:{bare.port}") as bare_channel,
            aio.insecure_channel(f"{HOST}:{base.port if base else bare.port}") as base_channel,
        ):
            mesh = await Mesh.connect(channel)
            base_mesh = await Mesh.connect(base_channel) if base else None
            echo = bare_channel.unary_unary(ECHO_METHOD)
            payload = b"x" * 64

            async def mesh_pair() -> None:
                await mesh.pair()

            async def base_pair() -> None:
                assert base_mesh is not None
                await base_mesh.pair()

            async def bare_pair() -> None:
                await echo(payload)
                await echo(payload)

            async def measure(pair: Callable[[], Awaitable[None]], target: Server) -> tuple[float, float]:
                stop_at = time.perf_counter() + args.warmup
                count = 0
                measuring = False
                cpu0 = 0.0
                t0 = 0.0

                async def worker() -> None:
                    nonlocal count
                    while time.perf_counter() < stop_at:
                        await pair()
                        if measuring:
                            count += 1

                profile = bool(args.profile) and target is server and not profiled
                if profile:
                    profiled.append(args.profile)

                async def clock() -> None:
                    nonlocal stop_at, measuring, cpu0, t0
                    await asyncio.sleep(args.warmup * 0.9)
                    if profile:
                        await target.ask("PROFILE", "PROFILING")
                    measuring, cpu0, t0 = True, target.cpu_s(), time.perf_counter()
                    stop_at = t0 + args.duration

                await asyncio.gather(clock(), *(worker() for _ in range(args.concurrency)))
                elapsed = time.perf_counter() - t0
                cpu = target.cpu_s() - cpu0
                if profile:
                    await target.ask(f"PROFILED {args.profile}", "PROFILED")
                return count / elapsed, cpu * 1000 / max(count, 1)

            async def measure_with_client(
                pair: Callable[[], Awaitable[None]], target: Server
            ) -> tuple[float, float, float]:
                before = os.times()
                rate, cpu_ms = await measure(pair, target)
                after = os.times()
                client_s = (after.user - before.user) + (after.system - before.system)
                return rate, cpu_ms, client_s * 1000 / max(rate * (args.duration + args.warmup * 0.1), 1)

            for n in range(args.rounds):
                order = [("bare", bare_pair, bare), ("mesh", mesh_pair, server)]
                if base is not None:  # the other checkout's mesh server, in the same rounds
                    order.append(("base", base_pair, base))
                if n % 2:
                    order.reverse()
                row: dict[str, float] = {}
                for name, pair, target in order:
                    rate, cpu_ms, client_ms = await measure_with_client(pair, target)
                    row[f"{name}_rate"], row[f"{name}_cpu_ms"] = rate, cpu_ms
                    row[f"{name}_client_ms"] = client_ms
                row["ratio"] = row["mesh_rate"] / row["bare_rate"]
                row["load"] = os.getloadavg()[0]
                line = f"  churn round {n + 1}: mesh/bare {row['ratio']:.2f}"
                if base is not None:
                    row["base_ratio"] = row["base_rate"] / row["bare_rate"]
                    row["mesh_base"] = row["mesh_rate"] / row["base_rate"]
                    line += f", base/bare {row['base_ratio']:.2f}, mesh/base {row['mesh_base']:.2f}"
                rounds.append(row)
                print(line, flush=True)
    finally:
        await server.child.stop()
        await bare.child.stop()
        if base is not None:
            await base.child.stop()
    return {"rounds": rounds}


async def _pairs_counted(server: Server, role: str, args: argparse.Namespace) -> float:
    """A server's instructions per pair (``role`` mesh or bare) over ``--pairs`` after a warm-up."""
    async with aio.insecure_channel(f"{HOST}:{server.port}") as channel:
        if role == "bare":
            echo = channel.unary_unary(ECHO_METHOD)

            async def pair(_: int) -> None:
                await echo(b"x" * 64)
                await echo(b"x" * 64)

        else:
            mesh = await Mesh.connect(channel)

            async def pair(_: int) -> None:
                await mesh.pair()

        await _in_parallel(args.warmup_pairs, args.concurrency, pair)
        await server.count("--zero")
        await _in_parallel(args.pairs, args.concurrency, pair)
        return await server.count("--dump") / args.pairs


async def churn_instructions(args: argparse.Namespace) -> dict[str, object]:
    """(b) by instructions: each server under callgrind in turn, ``--pairs`` pairs after a warm-up."""
    counts: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        out = args.keep or Path(scratch)  # --keep is made by main
        kinds: list[tuple[str, str, Path | None]] = [("bare", "bare", None), ("mesh", "mesh", None)]
        if args.base:
            kinds.append(("base", "mesh", args.base))
        if args.servers:  # e.g. only the two meshes, when the bare server's figure is known
            kinds = [kind for kind in kinds if kind[0] in args.servers.split(",")]
        for name, role, code in kinds:
            server = await Server.spawn(role, args.max_seconds, code, callgrind=out)
            try:
                counts[name] = await _pairs_counted(server, role, args)
            finally:
                await server.child.stop()
            print(f"  {name}: {counts[name]:,.0f} instructions per pair", flush=True)
    return {"instructions": counts, "load": os.getloadavg()[0]}


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def report(
    args: argparse.Namespace, memory: dict[str, object] | None, churned: dict[str, object] | None
) -> None:
    print(f"\nscale_sessions at {revision('svantic_grpc', 'bench')}, Python {sys.version.split()[0]}")
    if memory is not None:
        per_open, per_closed = float(memory["per_open"]), float(memory["per_closed"])  # type: ignore[arg-type]
        m = memory
        print(f"\n(a) memory, in-memory store ({m['opened']} sessions opened at {m['create_rate']:.0f}/s)")
        verdict = _verdict(per_open <= 2048)
        print(f"  RSS per idle open session:   {per_open / 1024:.2f} KB   target <= 2 KB: {verdict}")
        print(
            f"  RSS per closed session (before the sweep, {m['closed']} closed): {per_closed / 1024:.2f} KB"
        )
        print(
            f"  retention sweep: {m['swept']} deleted in {m['sweep_s']} s; sessions in the store "
            f"{m['store_before_sweep']} -> {m['store_after_sweep']}, event logs left {m['logs_after_sweep']}"
        )
        print("\n(c) ListSessions, page of 50: p50 / p90 ms (client latency; echo = a bare unary call)")
        print("  sessions | echo        | first page  | deep page   | open only")
        worst = 0.0
        for row in memory["listing"]:  # type: ignore[attr-defined]
            cells = [f"{row[k][0]:5.2f} / {row[k][1]:5.2f}" for k in ("echo", "first", "deep", "open only")]
            print(f"  {row['sessions']:>8} | " + " | ".join(cells))
            worst = max(worst, *(row[k][0] for k in ("first", "deep", "open only")))
        print(f"  slowest page p50 {worst:.2f} ms   target <= 5 ms: {_verdict(worst <= 5)}")
    if churned is not None and "instructions" in churned:
        counts: dict[str, float] = churned["instructions"]  # type: ignore[assignment]
        print(
            f"\n(b) server instructions per InitSession+CloseSession pair (callgrind, every thread;"
            f" {args.pairs} pairs after {args.warmup_pairs}, {args.concurrency} in flight)"
        )
        for name, count in counts.items():
            against = f"   {count / counts['bare']:.2f}x bare" if "bare" in counts else ""
            print(f"  {name:<5} {count:>12,.0f}{against}")
        if "base" in counts and "mesh" in counts:
            print(f"  mesh/base {counts['mesh'] / counts['base']:.3f} (--base {args.base})")
    elif churned is not None:
        rows = churned["rounds"]
        print(f"\n(b) InitSession+CloseSession vs two bare echo calls, {args.concurrency} clients")
        print("  cpu ms/pair: server / client (about; the client process's CPU over warm-up and window)")
        print("  round | bare pairs/s (cpu ms/pair) | mesh pairs/s (cpu ms/pair) | mesh/bare")
        for n, row in enumerate(rows, 1):  # type: ignore[arg-type]
            print(
                f"  {n:>5} | {row['bare_rate']:8.0f} ({row['bare_cpu_ms']:.2f} / {row['bare_client_ms']:.2f})"
                f"      | {row['mesh_rate']:8.0f} ({row['mesh_cpu_ms']:.2f} / {row['mesh_client_ms']:.2f})"
                f"      | {row['ratio']:.2f}"
            )
        ratio = statistics.median(r["ratio"] for r in rows)  # type: ignore[attr-defined]
        print(f"  median mesh/bare {ratio:.2f}x   target >= 0.75x: {_verdict(ratio >= 0.75)}")
        if args.base:
            for n, row in enumerate(rows, 1):  # type: ignore[arg-type]
                print(
                    f"  round {n}: base {row['base_rate']:8.0f} pairs/s ({row['base_cpu_ms']:.2f} ms/pair)"
                    f", base/bare {row['base_ratio']:.2f}, mesh/base {row['mesh_base']:.2f}"
                )
            base_ratio = statistics.median(r["base_ratio"] for r in rows)  # type: ignore[attr-defined]
            print(f"  median base/bare {base_ratio:.2f}x (--base {args.base})")
        loads = [r["load"] for r in rows]  # type: ignore[attr-defined]
        print(f"  load average (1 min) at the rounds' ends: {min(loads):.1f}-{max(loads):.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"memory": memory, "churn": churned}, indent=1))


async def parent(args: argparse.Namespace) -> int:
    memory = churned = None
    if "churn" in args.parts:
        print("(b) churn ...", flush=True)
        churned = await (churn_instructions(args) if args.instructions else churn(args))
    if "memory" in args.parts:
        print(f"(a)+(c) memory and listing, {args.sessions} sessions ...", flush=True)
        memory = await memory_and_listing(args)
    report(args, memory, churned)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000, help="idle sessions to open for (a)")
    parser.add_argument("--list-at", default="10000,100000", help="session counts at which (c) lists")
    parser.add_argument("--list-calls", type=int, default=30, help="calls per page kind in (c)")
    parser.add_argument("--close", type=int, default=20_000, help="sessions closed for the closed figure")
    parser.add_argument("--create-concurrency", type=int, default=64, help="InitSession calls in flight")
    parser.add_argument("--warmup-sessions", type=int, default=5000, help="opened before the RSS baseline")
    parser.add_argument("--concurrency", type=int, default=16, help="clients in (b)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per (b) point")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each (b) point")
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare/mesh rounds in (b)")
    parser.add_argument(
        "--base", type=Path, default=None, help="(b): also a mesh server of this checkout, in the same rounds"
    )
    parser.add_argument(
        "--instructions", action="store_true", help="(b): each server's instructions per pair (callgrind)"
    )
    parser.add_argument("--pairs", type=int, default=400, help="pairs counted with --instructions")
    parser.add_argument(
        "--servers", default="", help="with --instructions: only these of bare,mesh,base (default all)"
    )
    parser.add_argument("--warmup-pairs", type=int, default=100, help="pairs before the count")
    parser.add_argument(
        "--keep", type=Path, default=None, help="with --instructions: keep callgrind's files here"
    )
    parser.add_argument(
        "--profile", default="", help="(b): cProfile the mesh server's first measured window into this file"
    )
    parser.add_argument("--parts", default="churn,memory", help="which parts to run: churn, memory")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    parser.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=1800, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.list_at = sorted({int(n) for n in args.list_at.split(",") if n and int(n) <= args.sessions})
    args.parts = set(args.parts.split(","))
    if args.profile:
        args.profile = str(Path(args.profile).resolve())  # the server child writes it
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    if args.role == "mesh":
        watchdog(args.max_seconds)
        asyncio.run(run_mesh(args))
        return 0
    if args.role == "bare":
        watchdog(args.max_seconds)
        asyncio.run(run_bare(args))
        return 0
    return asyncio.run(parent(args))


if __name__ == "__main__":
    sys.exit(main())
