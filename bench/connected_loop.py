"""The mesh server's own work per connected message, in one process: no network, no gRPC transport.

Run from the repository root::

    .venv/bin/python bench/connected_loop.py                          # CPU per message, ~20 s
    .venv/bin/python bench/connected_loop.py --base /work/wt/base     # the same, two checkouts alternating
    .venv/bin/python bench/connected_loop.py --instructions [--base PATH]   # callgrind counts instead
    .venv/bin/python bench/connected_loop.py --profile                # cProfile of one run
    .venv/bin/python bench/connected_loop.py --side agent [--instructions] [--base PATH]  # the helper's work

What runs is what ``bench/message_roundtrip.py``'s mesh server does for a message, minus grpc's
transport and the interceptor: the ``MeshServer``'s mesh (memory store, metrics on, as that bench
starts it), ``MessageServicer.SendMessage`` called with each request parsed from its bytes and the
response serialized, and ``RegistryServicer.Connect`` fed by a stand-in echo agent in the same
loop: each frame the servicer yields is serialized (and parsed by the agent), and the agent
answers every dispatch as ``examples/echo_agent.py`` does through ``ConnectedAgent`` (working,
an artifact, completed: one ``update_batch`` frame, parsed by the server from its bytes).
``--concurrency`` clients, each with its own session, send ``--messages`` in all.

``--side agent`` measures the other end instead: the connected agent's own work per message, the
helper (``ConnectedAgent``, its real ``_serve_stream`` reader, ``_start``/``Reply`` and ``_requests``
framing) running ``examples/echo_agent.py``'s handler, against a stand-in mesh in the same loop that
sends each dispatch as the mesh frames it (one frame, or a batch of those queued together; parsed by
the helper from its bytes) and reads the helper's frames from their bytes. No gRPC transport: what
``bench/message_roundtrip.py`` shows as the agent's CPU per message, minus grpc's part.

The count (``--instructions``, valgrind's callgrind, from after a warm-up to the end) does not
move with other work on the machine: the figure to compare two commits by. CPU time
(``time.process_time``, median of ``--rounds`` alternating rounds) is printed otherwise.
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
import time
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("SVANTIC_LOOP_ROOT") or Path(__file__).resolve().parents[1])
"""The checkout whose code is measured (``--base`` runs this script against another)."""
sys.path.insert(0, str(ROOT))


async def _loop(messages: int, concurrency: int, warmup: int, mark: Any) -> float:
    """Send ``warmup`` then ``messages`` messages; ``mark(name)`` is called at "start" and "end".
    Returns the CPU seconds of the measured part."""
    from svantic_grpc.api._context import set_caller
    from svantic_grpc.api.message_service import MessageServicer
    from svantic_grpc.api.registry_service import RegistryServicer
    from svantic_grpc.config import parse_settings
    from svantic_grpc.connected_agent import ConnectedAgent
    from svantic_grpc.pb import agent_types_pb2, message_service_pb2, message_types_pb2
    from svantic_grpc.pb import registry_service_pb2 as reg_pb
    from svantic_grpc.server import GC_YOUNG_THRESHOLD, MeshServer

    settings = parse_settings(
        {
            "grpc_address": "127.0.0.1:0",
            "http_address": "127.0.0.1:0",
            "session_ttl_ms": 0,
            "shutdown_grace_s": 0,
            "store": "memory",
            "log_level": "WARNING",
            "dispatch": {"max_dispatches_per_session": 0},
        }
    )
    server = MeshServer(settings, env={})
    mesh = server.mesh
    await mesh.start()
    mesh.now_serving()
    tokens = mesh.tokens

    async def caller_of(agent_type: str) -> Any:
        issued = await tokens.issue(client_id="svantic", client_secret="your-secret", agent_type=agent_type)
        return tokens.verify(issued.token)

    messages_servicer = MessageServicer(mesh)
    registry_servicer = RegistryServicer(mesh)
    agent_caller = await caller_of("echo")
    client_caller = await caller_of("bench-client")

    # The agent registers, then opens its stream.
    set_caller(agent_caller)
    await registry_servicer.RegisterAgent(
        reg_pb.RegisterAgentRequest(
            agent_type="echo",
            instance_id="echo-bench-1",
            deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_CONNECTED,
            skills=[agent_types_pb2.AgentSkill(id="echo", name="Echo", tags=["echo"])],
        ),
        None,  # type: ignore[arg-type]
    )
    inbound: asyncio.Queue[bytes | None] = asyncio.Queue()
    hello = reg_pb.ConnectRequest(
        hello=reg_pb.ConnectHello(instance_id="echo-bench-1", dispatch_batches=True)
    ).SerializeToString()
    inbound.put_nowait(hello)

    async def requests() -> Any:
        while (raw := await inbound.get()) is not None:
            yield reg_pb.ConnectRequest.FromString(raw)  # the server parses what the agent sent

    working = message_types_pb2.MESSAGE_STATE_WORKING
    completed = message_types_pb2.MESSAGE_STATE_COMPLETED
    connected = asyncio.Event()

    # The helper's own framing (``ConnectedAgent._requests``): what it sends for the updates queued
    # together, as the connected echo agent sends them.
    helper = ConnectedAgent(
        "127.0.0.1:9",
        client_id="-",
        client_secret="-",
        agent_type="echo",
        instance_id="echo-bench-1",
        handler=None,  # type: ignore[arg-type]
    )
    helper._batch_updates = True
    if os.environ.get("SVANTIC_LOOP_NO_FOLD"):  # each update in its own place (as before the helper folded)
        import svantic_grpc.connected_agent as helper_module

        helper_module._folded = lambda previous, update, own: None  # type: ignore[attr-defined]

    def answer(dispatch: Any) -> None:
        """The echo agent's three updates for ``dispatch``: its acknowledgement, artifact and completion."""
        text = "\n".join(p.text for p in dispatch.message.parts if p.WhichOneof("content") == "text")
        dispatch_id = dispatch.dispatch_id
        put = helper._outbox.put_nowait
        put(reg_pb.DispatchUpdate(dispatch_id=dispatch_id, state=working))
        artifact = message_types_pb2.Artifact(
            name="echo", parts=[message_types_pb2.Part(text=f"echo: {text}")]
        )
        put(reg_pb.DispatchUpdate(dispatch_id=dispatch_id, artifacts=[artifact]))
        put(reg_pb.DispatchUpdate(dispatch_id=dispatch_id, state=completed))

    async def pump() -> None:
        async for frame in helper._requests():
            inbound.put_nowait(frame.SerializeToString())

    async def agent() -> None:
        set_caller(agent_caller)
        async for response in registry_servicer.Connect(requests(), None):  # type: ignore[arg-type]
            raw = response if isinstance(response, bytes) else response.SerializeToString()
            frame = reg_pb.ConnectResponse.FromString(raw)
            kind = frame.WhichOneof("payload")
            if kind == "welcome":
                connected.set()
            elif kind == "dispatch":
                answer(frame.dispatch)
            elif kind == "dispatch_batch":
                for dispatch in frame.dispatch_batch.dispatches:
                    answer(dispatch)

    agent_task = asyncio.create_task(agent())
    pump_task = asyncio.create_task(pump())
    await asyncio.wait_for(connected.wait(), 10)
    # As ``MeshServer.start`` leaves the collector once it serves.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    if os.environ.get("SVANTIC_LOOP_NO_GC"):  # what the collector costs (an experiment, not the figure)
        gc.disable()

    set_caller(client_caller)
    sessions = [(await mesh.sessions.init(client_caller)).session_id for _ in range(concurrency)]
    completed_state = message_types_pb2.MESSAGE_STATE_COMPLETED

    def request_bytes(index: int) -> bytes:
        target = message_types_pb2.Part()
        target.data.update({"target_agent": "echo"})
        return message_service_pb2.SendMessageRequest(
            session_id=sessions[index],
            message=message_service_pb2.OutgoingMessage(
                parts=[message_types_pb2.Part(text=f"hello from client {index}"), target]
            ),
        ).SerializeToString()

    async def client(index: int, count: int) -> None:
        set_caller(client_caller)
        raw = request_bytes(index)
        for _ in range(count):
            request = message_service_pb2.SendMessageRequest.FromString(raw)
            response = await messages_servicer.SendMessage(request, None)  # type: ignore[arg-type]
            out = response if isinstance(response, bytes) else response.SerializeToString()
            if message_service_pb2.SendMessageResponse.FromString(out).message.state != completed_state:
                raise RuntimeError("a message did not complete")

    async def run(total: int) -> None:
        share, extra = divmod(total, concurrency)
        await asyncio.gather(*(client(i, share + (i < extra)) for i in range(concurrency)))

    await run(warmup)
    mark("start")
    began = time.process_time()
    await run(messages)
    cpu = time.process_time() - began
    mark("end")
    pump_task.cancel()
    inbound.put_nowait(None)
    await asyncio.wait_for(agent_task, 10)
    await mesh.stop()
    return cpu


async def _agent_loop(messages: int, concurrency: int, warmup: int, mark: Any) -> float:
    """The connected agent's side: ``warmup`` then ``messages`` dispatches through the helper;
    ``mark(name)`` is called at "start" and "end". Returns the CPU seconds of the measured part."""
    sys.path.insert(0, str(ROOT / "examples"))
    from echo_agent import echo  # the example agent's handler, as message_roundtrip's agent runs it

    from svantic_grpc.connected_agent import ConnectedAgent
    from svantic_grpc.pb import message_types_pb2
    from svantic_grpc.pb import registry_service_pb2 as reg_pb

    # A dispatch as the mesh sends message_roundtrip's message (built here, the same bytes for
    # every checkout measured): its parts, the first turn of its history, who sent it, the times.
    target = message_types_pb2.Part(data_json='{"target_agent":"echo"}')
    target.data.update({"target_agent": "echo"})
    parts = [message_types_pb2.Part(text="hello from client 1"), target]
    template = reg_pb.Dispatch(
        session_id="ses_0123456789abcdef0123456789abcdef",
        message=message_types_pb2.Message(
            message_id="msg_0123456789abcdef0123456789abcdef",
            session_id="ses_0123456789abcdef0123456789abcdef",
            role=message_types_pb2.ROLE_USER,
            parts=parts,
            state=message_types_pb2.MESSAGE_STATE_WORKING,
            state_reason="routed to echo/echo-bench-1 (target_agent)",
            history=[message_types_pb2.Turn(role=message_types_pb2.ROLE_USER, parts=parts)],
            agent_type="echo",
            instance_id="echo-bench-1",
            sender="bench-client",
        ),
    )
    for stamp in (template.message.created_at, template.message.updated_at, template.message.history[0].time):
        stamp.seconds, stamp.nanos = 1_800_000_000, 123_456_789
    template.deadline.seconds = 1_800_000_300
    finals = {
        message_types_pb2.MESSAGE_STATE_COMPLETED,
        message_types_pb2.MESSAGE_STATE_FAILED,
        message_types_pb2.MESSAGE_STATE_REJECTED,
        message_types_pb2.MESSAGE_STATE_CANCELED,
    }
    loop = asyncio.get_running_loop()
    queued: list[reg_pb.Dispatch] = []
    wake = asyncio.Event()
    waiting: dict[str, asyncio.Future[None]] = {}
    welcome = reg_pb.ConnectResponse(
        welcome=reg_pb.ConnectWelcome(heartbeat_interval_ms=3_600_000, update_batches=True)
    ).SerializeToString()

    class Call:
        """The stand-in mesh's end of ``Connect``: dispatches out as the mesh frames them, the
        helper's frames read back from their bytes."""

        def __init__(self, requests: Any) -> None:
            self._reader = asyncio.create_task(self._read(requests))
            self._sent_welcome = False

        async def _read(self, requests: Any) -> None:
            async for request in requests:
                frame = reg_pb.ConnectRequest.FromString(request.SerializeToString())
                kind = frame.WhichOneof("payload")
                updates = [frame.update] if kind == "update" else frame.update_batch.updates if kind else []
                for update in updates:
                    if update.state in finals:
                        future = waiting.pop(update.dispatch_id, None)
                        if future is not None:
                            future.set_result(None)

        def cancel(self) -> None:
            self._reader.cancel()

        def __aiter__(self) -> Call:
            return self

        async def __anext__(self) -> reg_pb.ConnectResponse:
            if not self._sent_welcome:
                self._sent_welcome = True
                return reg_pb.ConnectResponse.FromString(welcome)
            while not queued:
                wake.clear()
                await wake.wait()
            taken = queued[:64]
            del queued[:64]
            frame = reg_pb.ConnectResponse()
            if len(taken) == 1:
                frame.dispatch.CopyFrom(taken[0])
            else:
                frame.dispatch_batch.dispatches.extend(taken)
            return reg_pb.ConnectResponse.FromString(frame.SerializeToString())

    class Registry:
        def Connect(self, requests: Any, metadata: Any = None) -> Call:
            return Call(requests)

    agent = ConnectedAgent(
        "127.0.0.1:9",
        client_id="-",
        client_secret="-",
        agent_type="echo",
        instance_id="echo-bench-1",
        handler=echo,
    )
    serving = asyncio.create_task(agent._serve_stream(Registry(), ()))  # type: ignore[arg-type]
    await asyncio.wait_for(agent.connected.wait(), 10)
    numbers = iter(range(10**9))

    async def client(index: int, count: int) -> None:
        for _ in range(count):
            dispatch = reg_pb.Dispatch()
            dispatch.CopyFrom(template)
            dispatch.dispatch_id = dispatch_id = f"dsp_{index}_{next(numbers)}"
            future = waiting[dispatch_id] = loop.create_future()
            queued.append(dispatch)
            wake.set()
            await future

    async def run(total: int) -> None:
        share, extra = divmod(total, concurrency)
        await asyncio.gather(*(client(i, share + (i < extra)) for i in range(concurrency)))

    await run(warmup)
    mark("start")
    began = time.process_time()
    await run(messages)
    cpu = time.process_time() - began
    mark("end")
    await agent.stop()
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    return cpu


def _child(args: argparse.Namespace) -> None:
    def mark(name: str) -> None:
        if args.callgrind:
            # Started with instrumentation off (the imports and set-up run at valgrind's fastest).
            flag = "--instr=on" if name == "start" else "--dump"
            subprocess.run(
                ["callgrind_control", flag, str(os.getpid())], stdout=subprocess.DEVNULL, check=True
            )
        elif args.profile and name == "start":
            profile.enable()
        elif args.profile:
            profile.disable()

    import cProfile

    profile = cProfile.Profile()
    run = _agent_loop if args.side == "agent" else _loop
    cpu = asyncio.run(run(args.messages, args.concurrency, args.warmup, mark))
    if args.profile:
        import pstats

        stats = pstats.Stats(profile, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
    print(json.dumps({"cpu_ms": cpu * 1000 / args.messages}))


def _checkouts(args: argparse.Namespace) -> dict[str, Path]:
    trees = {"this": ROOT}
    if args.base:
        trees = {"base": args.base.resolve(), "this": ROOT}
    return trees


def _argv(args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--role",
        "child",
        "--messages",
        str(args.messages),
        "--concurrency",
        str(args.concurrency),
        "--warmup",
        str(args.warmup),
        "--side",
        args.side,
        *extra,
    ]


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "SVANTIC_LOOP_ROOT": str(tree), "PYTHONPATH": str(tree)}


def instructions(args: argparse.Namespace) -> None:
    counts: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tree in _checkouts(args).items():
            out = Path(tmp) / name
            subprocess.run(
                [
                    "valgrind",
                    "--tool=callgrind",
                    "--instr-atstart=no",
                    f"--callgrind-out-file={out}.%p",
                    *_argv(args, "--callgrind"),
                ],
                env=_env(tree),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=True,
            )
            [dump] = Path(tmp).glob(f"{name}.*.1")  # the one made by --dump
            total = re.search(r"^summary: (\d+)", dump.read_text(), re.MULTILINE)
            assert total is not None, f"no summary in {dump}"
            counts[name] = int(total[1]) / args.messages
            print(f"{name:<6}{counts[name]:>14,.0f} instructions per message   {tree}", flush=True)
    if "base" in counts:
        print(f"this/base {counts['this'] / counts['base']:.3f}")


def cpu(args: argparse.Namespace) -> None:
    results: dict[str, list[float]] = {name: [] for name in _checkouts(args)}
    loads = [os.getloadavg()[0]]
    for round_no in range(args.rounds):
        order = list(_checkouts(args).items())
        if round_no % 2:
            order.reverse()
        for name, tree in order:
            done = subprocess.run(
                _argv(args), env=_env(tree), capture_output=True, text=True, timeout=600, check=False
            )
            if done.returncode != 0:
                raise SystemExit(f"child in {tree} failed:\n{done.stderr[-3000:]}")
            got = json.loads(done.stdout.strip().splitlines()[-1])["cpu_ms"]
            results[name].append(got)
            print(f"  round {round_no + 1} {name}: {got:.3f} ms/msg", flush=True)
            loads.append(os.getloadavg()[0])
    load = f"load average {min(loads):.1f}-{max(loads):.1f}"
    print(f"{args.messages} messages, {args.concurrency} clients; {load}")
    for name, values in results.items():
        print(f"{name:<6} CPU {statistics.median(values):.3f} ms/msg (median of {len(values)})")
    if "base" in results:
        ratios = [t / b for t, b in zip(results["this"], results["base"], strict=True)]
        each = ", ".join(f"{r:.3f}" for r in ratios)
        print(f"this/base per round: {each}; median {statistics.median(ratios):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--side", choices=("mesh", "agent"), default="mesh", help="the mesh server's work, or the helper's"
    )
    parser.add_argument("--base", type=Path, default=None, help="another checkout, measured alternately")
    parser.add_argument("--instructions", action="store_true", help="callgrind instruction counts instead")
    parser.add_argument("--profile", action="store_true", help="cProfile one run of this checkout")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    parser.add_argument("--callgrind", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "child":
        _child(args)
    elif args.profile:
        subprocess.run([*_argv(args, "--profile", "--top", str(args.top))], env=_env(ROOT), check=True)
    elif args.instructions:
        instructions(args)
    else:
        cpu(args)


if __name__ == "__main__":
    main()
