"""Instructions per message of the real mesh server and of the relay's server (grpc's work included).

Run from the repository root::

    .venv/bin/python bench/server_instructions.py                          # 1 and 32 clients, ~3 min
    .venv/bin/python bench/server_instructions.py --concurrency 32 --base /work/wt/base

``bench/message_roundtrip.py`` judges the mesh against the relay by throughput and CPU time, both of
which move with whatever else runs on this 2-core machine. This runs the same two servers the same
way (the mesh server with its connected echo agent, the relay's server with its agent answering
three frames, each on loopback, the agents and the clients outside valgrind) with only the server
under valgrind's callgrind, counted from after a warm-up through ``--messages`` messages sent by
``--concurrency`` clients: a count that does not move with the machine's load (the same code counts within
about 1% run to run), of the whole server process (its Python, grpc's C core and its threads, the event loop).

The relay's count is the floor of a two-hop design in this stack; what the mesh counts above it is
its own work. A server spends its CPU on these instructions, so mesh/relay by count is roughly what
CPU time per message and throughput would show on a quiet machine (issue 12.2: throughput >= 0.70x
the relay's means the mesh's count may be at most ~1.43x the relay's). Each server's count is also
printed by the binary it ran in: the interpreter (``libpython``: Python code, the mesh's and grpc.aio's
and asyncio's), grpc's ``cygrpc`` (its C core linked in), protobuf's ``_message``, libc.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import message_roundtrip as roundtrip  # noqa: E402  (the bench's own roles and clients)
from _child import callgrind_counts  # noqa: E402
from grpc import aio  # noqa: E402

_ROLES = {
    "mesh": ("mesh-server", "agent", ()),
    "relay": ("relay-server", "relay-agent", ("--relay-updates", "3")),
}


async def _line(process: asyncio.subprocess.Process, prefix: str) -> str:
    assert process.stdout is not None
    while True:
        line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
        if not line:
            raise SystemExit(f"a child exited before saying {prefix}")
        if line.startswith(prefix):
            return line.split()[1] if len(line.split()) > 1 else ""


def _control(flag: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", flag, str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )


def _summary(tmp: Path, name: str) -> tuple[int, Counter[str]]:
    """The instructions counted in the dump ``--dump`` made (callgrind numbers it 1), in all and
    by the binary they ran in (the interpreter, grpc's ``cygrpc`` with its C core, protobuf's ...)."""
    [dump] = [p for p in tmp.glob(f"{name}.*") if p.name.endswith(".1")]
    return callgrind_counts(dump)


async def count(tree: Path, mode: str, concurrency: int, messages: int, tmp: Path) -> float:
    """Instructions per message of ``mode``'s server run from ``tree``."""
    server_role, agent_role, extra = _ROLES[mode]
    script = str(tree / "bench" / "message_roundtrip.py")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = tmp / f"{mode}-{concurrency}-{tree.name}"
    pipes = {"stdin": asyncio.subprocess.PIPE, "stdout": asyncio.subprocess.PIPE, "cwd": tree, "env": env}
    server = await asyncio.create_subprocess_exec(
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}.%p",
        sys.executable,
        script,
        "--role",
        server_role,
        "--max-seconds",
        "900",
        *extra,
        stderr=asyncio.subprocess.DEVNULL,
        **pipes,  # type: ignore[arg-type]
    )
    target = f"{roundtrip.HOST}:{await _line(server, 'PORT')}"
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        script,
        "--role",
        agent_role,
        "--max-seconds",
        "900",
        "--target",
        target,
        *extra,
        **pipes,
    )
    try:
        await _line(agent, "READY")
        async with aio.insecure_channel(target) as channel:
            if mode == "mesh":
                calls = await roundtrip._mesh_calls(channel, concurrency, concurrency)
            else:
                calls = roundtrip._bare_calls(channel, concurrency, 64, roundtrip.RELAY_CALL)

            async def send(each: int) -> None:
                async def client(call: roundtrip.Call) -> None:
                    for _ in range(each):
                        await call()

                await asyncio.gather(*(client(call) for call in calls))

            await send(max(10, 100 // concurrency))  # warm-up, not counted
            await asyncio.to_thread(_control, "--instr=on", server.pid)
            await send(messages // concurrency)
            await asyncio.to_thread(_control, "--dump", server.pid)
    finally:
        for child in (agent, server):
            if child.stdin is not None:
                child.stdin.close()
        await asyncio.wait_for(agent.wait(), 60)
        await asyncio.wait_for(server.wait(), 300)
    total, by_binary = await asyncio.to_thread(_summary, tmp, out.name)
    counted = messages // concurrency * concurrency
    top = ", ".join(f"{name} {value / counted:,.0f}" for name, value in by_binary.most_common(4))
    print(f"  c={concurrency} {mode} server ({tree}): {total / counted:,.0f} per message: {top}", flush=True)
    return total / counted


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,32", help="clients; a comma list runs each")
    parser.add_argument("--messages", type=int, default=640, help="counted messages per point")
    parser.add_argument(
        "--base", type=Path, default=None, help="another checkout: its mesh server counted too"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="svantic-instructions-") as tmp:
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            relay = await count(ROOT, "relay", concurrency, args.messages, Path(tmp))
            mesh = await count(ROOT, "mesh", concurrency, args.messages, Path(tmp))
            line = (
                f"c={concurrency}: instructions per message: relay server {relay:,.0f}"
                f" | mesh server {mesh:,.0f}"
                f" | mesh/relay {mesh / relay:.2f} (0.70x the relay's throughput: at most {relay / 0.7:,.0f})"
            )
            if args.base is not None:
                base = await count(args.base.resolve(), "mesh", concurrency, args.messages, Path(tmp))
                line += f" | mesh-base {base:,.0f}, this/base {mesh / base:.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
