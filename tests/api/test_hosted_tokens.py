"""Every A2A call to a hosted agent carries a dispatch token valid when it is sent (issue 9, item 6).

The hosted agent verifies its tokens as the README tells it to, against the mesh's
(injected) clock, so a human answering after the first token's lifetime is tested
without waiting for it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
from grpc import aio

from svantic_grpc.core.clock import ManualClock
from tests._support import running_server
from tests.agents_a2a import ISSUER, _Keys, _listening_socket, serve_a2a
from tests.agents_connected import WAIT, data, new_session, send, wait_for_state
from tests.agents_inputs import (
    HostedInputAgent,
    HostedInputAgents,
    _InputExecutor,
    artifact_texts,
    pending,
    resolve,
)
from tests.api.test_inputs import COMPLETED, INPUT_REQUIRED

TOKEN_TTL_S = 300


class _KeysOnClock(_Keys):
    """Verifies dispatch tokens as an agent does, with ``clock`` as the time of day."""

    def __init__(self, channel: aio.Channel, clock: ManualClock) -> None:
        super().__init__(channel)
        self._clock = clock
        self.verified: list[dict[str, Any]] = []

    async def verify(self, token: str, audience: str) -> dict[str, Any]:
        keys = await self.load()
        key = keys[str(jwt.get_unverified_header(token).get("kid", ""))]
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=["EdDSA"],
            audience=audience,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "aud", "iss"], "verify_exp": False, "verify_iat": False},
        )
        now = self._clock.now()
        if claims["exp"] <= now:
            raise jwt.ExpiredSignatureError(f"expired {now - claims['exp']:.0f}s ago")
        if claims["iat"] > now + 5:
            raise jwt.ImmatureSignatureError("issued in the future")
        self.verified.append(claims)
        return claims


@contextlib.asynccontextmanager
async def agent_on_clock(
    channel: aio.Channel, clock: ManualClock, spec: HostedInputAgent
) -> AsyncIterator[tuple[HostedInputAgents, _KeysOnClock]]:
    keys = _KeysOnClock(channel, clock)
    sock = _listening_socket()
    served = HostedInputAgents()
    agent = _InputExecutor(spec, keys, f"http://127.0.0.1:{sock.getsockname()[1]}/{spec.instance_id}")
    served.agents[spec.instance_id] = agent
    async with serve_a2a(sock, [(spec.instance_id, agent, agent.card)]):
        yield served, keys


async def test_an_answer_given_after_the_first_token_expired_reaches_the_agent_with_a_valid_token() -> None:
    clock = ManualClock(start=time.time())
    async with (
        running_server(clock=clock, dispatch={"token_ttl_s": TOKEN_TTL_S}) as client,
        agent_on_clock(client.channel, clock, HostedInputAgent("ask-h", agent_type="hosted-ask")) as (
            hosted,
            keys,
        ),
    ):
        await client.registry.RegisterAgent(
            hosted["ask-h"].registration(), metadata=await client.md(), timeout=WAIT
        )
        session_id = await new_session(client)
        asked = await send(client, session_id, "hello", data({"target_agent": "hosted-ask"}))
        assert asked.state == INPUT_REQUIRED, asked.state_reason
        [question] = (await pending(client, session_id)).requests

        clock.advance(TOKEN_TTL_S + 100)  # the human takes a while: the first token has expired
        await resolve(client, question.request_id, values={"answer": "Ada"})

        done = await wait_for_state(client, session_id, asked.message_id, COMPLETED)
        assert artifact_texts(done) == ["Nice to meet you, Ada"]
        assert hosted["ask-h"].token_errors == []
        first, answer = keys.verified
        assert first["dispatch_id"] == answer["dispatch_id"]  # the same dispatch, a token signed afresh
        assert answer["iat"] >= first["iat"] + TOKEN_TTL_S + 100
