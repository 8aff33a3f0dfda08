"""The hosted path, before and after: two mesh servers from two source trees, one hosted agent.

    git worktree add /tmp/before <commit>   # or: git archive <commit> | tar -x -C /tmp/before
    .venv/bin/python bench/hosted_ab.py --before /tmp/before --concurrency 1,16 --cycles 6

Both meshes (``message_roundtrip.py --role mesh-server``, each run from its own tree with that
tree first on ``PYTHONPATH``) have the same a2a-sdk JSON-RPC echo agent registered as hosted
(``bench/_hosted.py``). This process is the client: ``SendMessage`` to a mesh, a session per
client task, as ``message_roundtrip.py --hosted`` does. It sends to one mesh for ``--seconds``,
then to the other, and again, swapping which goes first each cycle, so both see the same
machine load; per block it reads each mesh server's CPU from /proc and times each call. It
prints, per mesh, the median CPU per message, msgs/s and p50 latency, and the medians of the
per-cycle after/before ratios (and of the p50 differences): on a shared machine these are far
steadier than either figure alone.

With ``--instructions`` each mesh server runs under valgrind's callgrind instead, one after the
other: ``--messages`` hosted messages after a warm-up (the counters zeroed, then dumped), and it
prints the server's instructions per message (all its threads). Unlike CPU time, the count barely
moves with the machine's load. ``--keep DIR`` keeps callgrind's files for ``callgrind_annotate``.
With ``--connected`` the same server then also counts ``--messages`` messages to the example echo
agent over ``Connect`` (message_roundtrip's mesh mode), and prints hosted/connected: what a hosted
message costs beyond a connected one, in one setup.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _hosted
from _child import ROOT, start_role

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def _worker(call: _hosted.Call, stop: float, latencies: list[float]) -> None:
    while (started := time.perf_counter()) < stop:
        await call()
        latencies.append(time.perf_counter() - started)


async def _start(tree: Path, role: str, max_seconds: float) -> tuple[asyncio.subprocess.Process, str]:
    """``tree``'s ``message_roundtrip.py`` in ``role``; its first protocol line's value (port or URL)."""
    script = tree / "bench" / "message_roundtrip.py"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    process = await start_role(script, role, max_seconds, env=env, cwd=tree)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode().split()
    if len(line) < 2:
        raise RuntimeError(f"{role} from {tree} did not start")
    return process, line[1]


async def _instructions(
    args: argparse.Namespace, tree: Path, url: str, out: Path, name: str
) -> tuple[float, float | None]:
    """The mesh server of ``tree`` under callgrind: its instructions per hosted message, and with
    ``--connected`` per message to a connected echo agent (the same server, counted apart)."""
    from grpc import aio
    from message_roundtrip import _mesh_calls

    script = tree / "bench" / "message_roundtrip.py"
    mesh = await asyncio.create_subprocess_exec(
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out / name}.%p",
        sys.executable,
        str(script),
        "--role",
        "mesh-server",
        "--max-seconds",
        "3600",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    assert mesh.stdout is not None and mesh.stdin is not None
    agent: asyncio.subprocess.Process | None = None
    try:
        port = (await asyncio.wait_for(mesh.stdout.readline(), 1800)).decode().split()[1]
        target = f"127.0.0.1:{port}"
        await _hosted.register(target, url)
        async with aio.insecure_channel(target) as channel:

            async def send(calls: list[_hosted.Call], count: int) -> None:
                left = count

                async def worker(call: _hosted.Call) -> None:
                    nonlocal left
                    while left > 0:
                        left -= 1
                        await call()

                await asyncio.gather(*(worker(call) for call in calls))

            def control(flag: str) -> None:
                subprocess.run(
                    ["callgrind_control", flag, str(mesh.pid)], stdout=subprocess.DEVNULL, check=True
                )

            async def count(calls: list[_hosted.Call]) -> None:
                await send(calls, args.warmup)
                await asyncio.to_thread(control, "--zero")
                await send(calls, args.messages)
                await asyncio.to_thread(control, "--dump")

            await count(await _hosted.hosted_calls(channel, args.concurrency[0]))
            if args.connected:  # the example echo agent over Connect, as message_roundtrip's mesh mode
                agent = await start_role(
                    tree / "bench" / "message_roundtrip.py",
                    "agent",
                    3600,
                    "--target",
                    target,
                    env={**os.environ, "PYTHONPATH": str(tree)},
                    cwd=tree,
                )
                assert agent.stdout is not None
                while b"READY" not in await asyncio.wait_for(agent.stdout.readline(), 600):
                    pass
                await count(await _mesh_calls(channel, args.concurrency[0], args.concurrency[0]))
    finally:
        if agent is not None and agent.stdin is not None:
            agent.stdin.close()
            await agent.wait()
        mesh.stdin.close()
        try:
            await asyncio.wait_for(mesh.wait(), 300)
        except TimeoutError:
            mesh.kill()
            await mesh.wait()

    def per_message(dump: Path) -> float:
        total = re.search(r"^summary: (\d+)", dump.read_text(), re.MULTILINE)
        assert total is not None, f"no summary in {dump}"
        return int(total[1]) / args.messages

    hosted = per_message(out / f"{name}.{mesh.pid}.1")  # the first --dump
    connected = per_message(out / f"{name}.{mesh.pid}.2") if args.connected else None
    return hosted, connected


async def instructions(args: argparse.Namespace) -> None:
    trees = {"before": args.before, "after": ROOT}
    agent, url = await _start(ROOT, "hosted-agent", 7200)
    counts: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            out = args.keep or Path(scratch)
            out.mkdir(parents=True, exist_ok=True)
            for name, tree in trees.items():
                counts[name], connected = await _instructions(args, tree, url, out, name)
                said = f"{name} ({tree}): {counts[name]:,.0f} instructions per hosted message"
                if connected is not None:
                    said += (
                        f", {connected:,.0f} per connected message in the same server "
                        f"(hosted/connected {counts[name] / connected:.2f}x)"
                    )
                print(said, flush=True)
    finally:
        if agent.stdin is not None:
            agent.stdin.close()
        await agent.wait()
    print(
        f"mesh server instructions per hosted message (callgrind, all threads; {args.messages} messages "
        f"after {args.warmup}, {args.concurrency[0]} in flight): after/before "
        f"{counts['after'] / counts['before']:.3f}x ({counts['after'] - counts['before']:+,.0f})"
    )


async def main(args: argparse.Namespace) -> None:
    from grpc import aio

    trees = {"before": args.before, "after": ROOT}
    life = 120 + args.cycles * args.seconds * 2 * len(args.concurrency) * 2
    processes: list[asyncio.subprocess.Process] = []
    channels = {}
    try:
        agent, url = await _start(ROOT, "hosted-agent", life)
        processes.append(agent)
        pids = {}
        for name, tree in trees.items():
            mesh, port = await _start(tree, "mesh-server", life)
            processes.append(mesh)
            pids[name] = mesh.pid
            await _hosted.register(f"127.0.0.1:{port}", url)
            channels[name] = aio.insecure_channel(f"127.0.0.1:{port}")
        print(f"before: {trees['before']} | after: {trees['after']} | nproc {os.cpu_count()}")
        for concurrency in args.concurrency:
            calls = {
                name: await _hosted.hosted_calls(channel, concurrency) for name, channel in channels.items()
            }
            for name in trees:  # warm-up: connections, agent card, first sessions
                await asyncio.gather(*(call() for call in calls[name] for _ in range(3)))
            # Per block: CPU ms per message, msgs/s, p50 latency in ms.
            blocks: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
            loads = []
            for cycle in range(args.cycles):
                for name in list(trees) if cycle % 2 == 0 else list(reversed(trees)):
                    latencies: list[float] = []
                    stop = time.perf_counter() + args.seconds
                    cpu, wall = _cpu_s(pids[name]), time.perf_counter()
                    await asyncio.gather(*(_worker(call, stop, latencies) for call in calls[name]))
                    cpu, wall = _cpu_s(pids[name]) - cpu, time.perf_counter() - wall
                    done = len(latencies)
                    p50 = statistics.median(latencies) * 1000
                    blocks[name].append((cpu * 1000 / done, done / wall, p50))
                loads.append(os.getloadavg()[0])
            for name in trees:
                ms = [b[0] for b in blocks[name]]
                rate = [b[1] for b in blocks[name]]
                p50s = [b[2] for b in blocks[name]]
                print(
                    f"c={concurrency} {name:6s}: mesh server cpu {statistics.median(ms):.2f} ms/msg "
                    f"(blocks {', '.join(f'{x:.2f}' for x in ms)}), {statistics.median(rate):.0f} msgs/s, "
                    f"p50 {statistics.median(p50s):.2f} ms"
                )
            pairs = list(zip(blocks["after"], blocks["before"], strict=True))
            print(
                f"c={concurrency} after/before per cycle (median): cpu per message "
                f"{statistics.median(a[0] / b[0] for a, b in pairs):.2f}x, "
                f"msgs/s {statistics.median(a[1] / b[1] for a, b in pairs):.2f}x, "
                f"p50 latency {statistics.median(a[2] - b[2] for a, b in pairs):+.2f} ms "
                f"| load average {min(loads):.1f}-{max(loads):.1f}"
            )
    finally:
        for channel in channels.values():
            await channel.close()
        for process in processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--before", required=True, type=lambda p: Path(p).resolve(), help="source tree to compare against"
    )
    parser.add_argument("--concurrency", default="1,16", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--cycles", type=int, default=6, help="before/after pairs of blocks per concurrency")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one block")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instead: each mesh server's instructions per message (callgrind)",
    )
    parser.add_argument("--messages", type=int, default=400, help="with --instructions: messages counted")
    parser.add_argument(
        "--warmup", type=int, default=100, help="with --instructions: messages before counting"
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="with --instructions: keep callgrind's files there"
    )
    parser.add_argument(
        "--connected",
        action="store_true",
        help="with --instructions: also count messages to a connected echo agent in the same server",
    )
    parsed = parser.parse_args()
    asyncio.run(instructions(parsed) if parsed.instructions else main(parsed))
