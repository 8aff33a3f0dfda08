"""The hosted transport alone: CPU per dispatch of the mesh's A2A call beside a bare aiohttp POST.

    .venv/bin/python bench/hosted_transport.py --concurrency 1,16 --cycles 6

One a2a-sdk JSON-RPC echo agent in its own process (``bench/_hosted.py``). This process runs,
in alternating blocks of ``--calls`` dispatches:

* **mesh**: ``A2ATransport.dispatch`` as the mesh calls it (the request built as ProtoJSON, the
  mesh's streaming JSON-RPC call on the transport a2a-sdk's ``ClientFactory`` made, a dispatch
  token signed per call, the events read as they come and turned into updates), read to the
  final update;
* **floor**: one aiohttp POST of the same JSON-RPC request with a token signed the same
  way, the response read whole at once: what the HTTP exchange itself costs here.

Per block it reads this process's CPU time; it prints the medians per mode, and the median of
the per-cycle mesh/floor ratios (steadier than either figure on a shared machine). What the
mesh server spends per hosted message beyond this is its own work, the same as on the
connected path (``message_roundtrip.py --hosted`` prints both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

from _child import ROOT, start_role

Dispatch = Callable[[int], Awaitable[None]]


async def main(args: argparse.Namespace) -> None:
    import aiohttp

    from svantic_grpc.core.clock import SystemClock
    from svantic_grpc.core.dispatch import DispatchJob
    from svantic_grpc.core.dispatch._tokens import DispatchTokens
    from svantic_grpc.core.messages.model import Message, MessageState, Part, Role
    from svantic_grpc.core.models import AgentRegistration, DeploymentMode
    from svantic_grpc.dispatch.a2a import A2ATransport

    life = 60 + args.cycles * len(args.concurrency) * 60
    agent = await start_role(ROOT / "bench" / "message_roundtrip.py", "hosted-agent", life)
    assert agent.stdout is not None
    url = (await asyncio.wait_for(agent.stdout.readline(), 60)).decode().split()[1]
    registration = AgentRegistration("bench", "echo", "echo-1", DeploymentMode.HOSTED, 0.0, 0.0, url=url)
    tokens = DispatchTokens(clock=SystemClock(), issuer="svantic-grpc", ttl_s=300)
    transport = A2ATransport()
    session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())

    def sign(dispatch_id: str) -> str:
        token, _ = tokens.sign(
            tenant_id="bench",
            agent_type="echo",
            instance_id="echo-1",
            session_id="s1",
            dispatch_id=dispatch_id,
        )
        return token

    async def mesh(n: int) -> None:
        dispatch_id = f"dsp_{n}"
        message = Message(
            "bench", "s1", f"m{n}", Role.USER, (Part(text="hello"),), MessageState.WORKING, 0.0, 0.0
        )
        job = DispatchJob(dispatch_id, "bench", "s1", registration, message, lambda: sign(dispatch_id), 0.0)
        updates = [update async for update in transport.dispatch(job)]
        assert updates[-1].state is MessageState.COMPLETED, updates[-1]

    async def floor(n: int) -> None:
        request = {
            "jsonrpc": "2.0",
            "id": str(uuid.uuid4()),
            "method": "SendStreamingMessage",
            "params": {
                "message": {
                    "messageId": f"dsp_{n}",
                    "contextId": "s1",
                    "role": "ROLE_USER",
                    "parts": [{"text": "hello"}],
                },
                "configuration": {"historyLength": 0},
            },
        }
        headers = {
            "Accept": "text/event-stream",
            "Content-Type": "application/json",
            "A2A-Version": "1.0",
            "Authorization": f"Bearer {sign(f'dsp_{n}')}",
        }
        async with session.post(url, data=json.dumps(request).encode(), headers=headers) as response:
            body = await response.read()
        assert b"TASK_STATE_COMPLETED" in body

    modes: dict[str, Dispatch] = {"mesh": mesh, "floor": floor}
    counter = [0]

    async def block(dispatch: Dispatch, concurrency: int) -> None:
        async def worker() -> None:
            for _ in range(args.calls // concurrency):
                counter[0] += 1
                await dispatch(counter[0])

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    try:
        print(f"agent {url} | nproc {os.cpu_count()} | {args.calls} dispatches per block")
        for concurrency in args.concurrency:
            for dispatch in modes.values():  # warm-up: connections, the agent card, first tasks
                await block(dispatch, concurrency)
            cpu: dict[str, list[float]] = {name: [] for name in modes}
            loads = []
            for cycle in range(args.cycles):
                for name in list(modes) if cycle % 2 == 0 else list(reversed(modes)):
                    started = time.process_time()
                    await block(modes[name], concurrency)
                    cpu[name].append((time.process_time() - started) * 1000 / args.calls)
                loads.append(os.getloadavg()[0])
            ratio = statistics.median(m / f for m, f in zip(cpu["mesh"], cpu["floor"], strict=True))
            print(
                f"c={concurrency}: CPU per dispatch: mesh {statistics.median(cpu['mesh']):.3f} ms, "
                f"floor {statistics.median(cpu['floor']):.3f} ms | mesh/floor {ratio:.2f}x "
                f"| load average {min(loads):.1f}-{max(loads):.1f}"
            )
    finally:
        await transport.close()
        await session.close()
        if agent.stdin is not None:
            agent.stdin.close()
        await agent.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", default="1,16", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--cycles", type=int, default=6, help="mesh/floor pairs of blocks per concurrency")
    parser.add_argument("--calls", type=int, default=320, help="dispatches per block")
    asyncio.run(main(parser.parse_args()))
