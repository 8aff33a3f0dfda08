"""Hosted a2a-sdk agents that verify dispatch tokens against the mesh's injected clock.

The agents of ``tests.agents_a2a`` and ``tests.agents_inputs`` verify tokens against
the real time of day, so a test that moves a ``ManualClock`` (hours of waiting for a
human, minutes of an agent serving traffic) would see them refuse tokens signed "in
the future". These verify exactly as an agent does (key, audience, issuer, expiry,
issue time with a little leeway), with the test's clock as the time of day.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import jwt
from grpc import aio

from svantic_grpc.core.clock import ManualClock
from tests.agents_a2a import ISSUER, AgentServer, HostedAgent, _Keys, _listening_socket, serve_a2a
from tests.agents_inputs import HostedInputAgent, _InputExecutor

__all__ = ["KeysOnClock", "OnClock", "hosted_on_clock"]

LEEWAY_S = 5


class KeysOnClock(_Keys):
    """Verifies dispatch tokens as an agent does, with ``clock`` as the time of day."""

    def __init__(self, channel: aio.Channel, clock: ManualClock) -> None:
        super().__init__(channel)
        self._clock = clock
        self.verified: list[dict[str, Any]] = []
        """Claims of every token that verified, in order."""

    async def verify(self, token: str, audience: str) -> dict[str, Any]:
        keys = await self.load()
        key = keys.get(str(jwt.get_unverified_header(token).get("kid", "")))
        if key is None:
            raise jwt.InvalidKeyError("no dispatch key with that kid")
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=["EdDSA"],
            audience=audience,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "aud", "iss"], "verify_exp": False, "verify_iat": False},
        )
        now = self._clock.now()
        if claims["exp"] <= now - LEEWAY_S:
            raise jwt.ExpiredSignatureError(f"the token expired {now - claims['exp']:.0f}s ago")
        if claims["iat"] > now + LEEWAY_S:
            raise jwt.ImmatureSignatureError("the token was issued in the future")
        self.verified.append(claims)
        return claims


class OnClock:
    """The served agents by instance id, and the keys they verify with."""

    def __init__(self, keys: KeysOnClock) -> None:
        self.keys = keys
        self.agents: dict[str, AgentServer | _InputExecutor] = {}

    def echo(self, instance_id: str) -> AgentServer:
        agent = self.agents[instance_id]
        assert isinstance(agent, AgentServer)
        return agent

    def asking(self, instance_id: str) -> _InputExecutor:
        agent = self.agents[instance_id]
        assert isinstance(agent, _InputExecutor)
        return agent


@contextlib.asynccontextmanager
async def hosted_on_clock(
    channel: aio.Channel, clock: ManualClock, *specs: HostedAgent | HostedInputAgent, port: int = 0
) -> AsyncIterator[OnClock]:
    """Serve ``specs`` (JSON-RPC) on one loopback port (``port``, or a free one) until the block ends."""
    served = OnClock(KeysOnClock(channel, clock))
    sock = _listening_socket()
    if port:  # the same agents again where they were (e.g. across a restart of the mesh)
        sock.close()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for spec in specs:
        url = f"{base}/{spec.instance_id}"
        if isinstance(spec, HostedAgent):
            served.agents[spec.instance_id] = AgentServer(spec, served.keys, url)
        else:
            served.agents[spec.instance_id] = _InputExecutor(spec, served.keys, url)
    async with serve_a2a(sock, [(i, agent, agent.card) for i, agent in served.agents.items()]):
        yield served
