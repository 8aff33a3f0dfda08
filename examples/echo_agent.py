"""A connected-mode echo agent.

Start the mesh (`svantic-grpc serve`), then in another terminal:

    python examples/echo_agent.py [host:port] [instance-id]

It registers as agent type `echo` with a skill tagged `echo`, dials the mesh and
answers every dispatch with an artifact `echo: <text>`. Send it a message whose
text mentions "echo" (skill routing) or with a data part {"target_agent": "echo"}.
It prints when it is connected (after a lost stream it reconnects by itself, and
logs why), and Ctrl-C (or SIGTERM) stops it cleanly: exit status 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Reply
from svantic_grpc.pb.agent_types_pb2 import AgentSkill


async def echo(dispatch: Dispatch, reply: Reply) -> None:
    await reply.artifact(f"echo: {dispatch.text}", name="echo")
    await reply.complete()


def make_agent(target: str, instance_id: str = "echo-1") -> ConnectedAgent:
    return ConnectedAgent(
        target,
        client_id="svantic",
        client_secret="your-secret",
        agent_type="echo",
        instance_id=instance_id,
        handler=echo,
        skills=[
            AgentSkill(
                id="echo", name="Echo", description="Repeats the text it gets", tags=["echo", "repeat"]
            )
        ],
    )


async def _say_when_connected(agent: ConnectedAgent) -> None:
    await agent.connected.wait()
    print(
        f"echo agent {agent.instance_id} connected to the mesh at {agent.target}; Ctrl-C stops it", flush=True
    )


async def main(target: str, instance_id: str) -> None:
    """Serve until SIGINT (Ctrl-C) or SIGTERM."""
    agent = make_agent(target, instance_id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    serving = asyncio.create_task(agent.run())
    announcer = asyncio.create_task(_say_when_connected(agent))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    announcer.cancel()
    stopping.cancel()
    await agent.stop()
    await serving
    print("echo agent stopped", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    instance = sys.argv[2] if len(sys.argv) > 2 else "echo-1"
    print(f"echo agent {instance} dialing the mesh at {target} ...", flush=True)
    asyncio.run(main(target, instance))
