"""Every A2A call to a hosted agent carries a dispatch token valid when it is sent (issue 9, item 6).

The hosted agent verifies its tokens as the README tells it to, against the mesh's
(injected) clock, so a human answering after the first token's lifetime is tested
without waiting for it.
"""

from __future__ import annotations

import time

from svantic_grpc.core.clock import ManualClock
from tests._support import running_server
from tests.agents_connected import WAIT, data, new_session, send, wait_for_state
from tests.agents_inputs import HostedInputAgent, artifact_texts, pending, resolve
from tests.agents_on_clock import hosted_on_clock
from tests.api.test_inputs import COMPLETED, INPUT_REQUIRED

TOKEN_TTL_S = 300


async def test_an_answer_given_after_the_first_token_expired_reaches_the_agent_with_a_valid_token() -> None:
    clock = ManualClock(start=time.time())
    async with (
        running_server(clock=clock, dispatch={"token_ttl_s": TOKEN_TTL_S}) as client,
        hosted_on_clock(client.channel, clock, HostedInputAgent("ask-h", agent_type="hosted-ask")) as hosted,
    ):
        agent = hosted.asking("ask-h")
        await client.registry.RegisterAgent(agent.registration(), metadata=await client.md(), timeout=WAIT)
        session_id = await new_session(client)
        asked = await send(client, session_id, "hello", data({"target_agent": "hosted-ask"}))
        assert asked.state == INPUT_REQUIRED, asked.state_reason
        [question] = (await pending(client, session_id)).requests

        clock.advance(TOKEN_TTL_S + 100)  # the human takes a while: the first token has expired
        await resolve(client, question.request_id, values={"answer": "Ada"})

        done = await wait_for_state(client, session_id, asked.message_id, COMPLETED)
        assert artifact_texts(done) == ["Nice to meet you, Ada"]
        assert agent.token_errors == []
        first, answer = hosted.keys.verified
        assert first["dispatch_id"] == answer["dispatch_id"]  # the same dispatch, a token signed afresh
        assert answer["iat"] >= first["iat"] + TOKEN_TTL_S + 100
