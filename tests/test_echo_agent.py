"""The example echo agent run as a user runs it, and what the server logs about it.

A process that says when it is connected, answers, and stops cleanly on Ctrl-C (SIGINT:
exit 0, no traceback); the server logs one INFO line when it connects and one when it leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from svantic_grpc.pb import auth_service_pb2, message_service_pb2, message_types_pb2, session_service_pb2
from tests._support import running_server

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "echo_agent.py"
TIMEOUT_S = 15.0


class _Log(logging.Handler):
    """The messages one logger emits, with a way to wait for one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO:
            self.messages.append(record.getMessage())
            self._changed.set()

    def count(self, text: str) -> int:
        return sum(text in message for message in self.messages)

    async def wait_for(self, text: str) -> None:
        async with asyncio.timeout(TIMEOUT_S):
            while not self.count(text):
                self._changed.clear()
                await self._changed.wait()


@contextlib.contextmanager
def _server_log() -> Iterator[_Log]:
    logger = logging.getLogger("svantic_grpc")
    handler, level = _Log(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def _line_with(stream: asyncio.StreamReader, text: str, seen: list[str]) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"the echo agent ended before saying {text!r}:\n{''.join(seen)}"
            seen.append(line)
            if text in line:
                return


async def test_echo_agent_says_connected_answers_and_stops_cleanly_on_ctrl_c() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with _server_log() as log:
        async with running_server(env={}, tenants=[]) as client:  # the development credential
            agent = await asyncio.create_subprocess_exec(
                sys.executable,
                str(EXAMPLE),
                client.server.target,
                "echo-t1",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
            try:
                assert agent.stdout is not None
                printed: list[str] = []
                await _line_with(agent.stdout, "connected to the mesh", printed)
                await log.wait_for("agent connected: echo/echo-t1 (tenant dev)")

                token = await client.auth.GetToken(
                    auth_service_pb2.GetTokenRequest(
                        client_id="svantic", client_secret="your-secret", agent_type="a2ui-terminal"
                    )
                )
                md = (("authorization", f"Bearer {token.token}"),)
                created = await client.sessions.InitSession(
                    session_service_pb2.InitSessionRequest(), metadata=md
                )
                sent = await client.messages.SendMessage(
                    message_service_pb2.SendMessageRequest(
                        session_id=created.session.session_id,
                        message=message_service_pb2.OutgoingMessage(
                            parts=[message_types_pb2.Part(text="please echo this")]
                        ),
                    ),
                    metadata=md,
                )
                assert sent.message.state == message_types_pb2.MESSAGE_STATE_COMPLETED
                assert sent.message.artifacts[0].parts[0].text == "echo: please echo this"

                agent.send_signal(signal.SIGINT)
                async with asyncio.timeout(TIMEOUT_S):
                    rest, stderr = await agent.communicate()
                await log.wait_for("agent left: echo/echo-t1 (tenant dev)")
            finally:
                if agent.returncode is None:
                    agent.kill()
                    await agent.wait()
    out = "".join(printed) + rest.decode()
    assert agent.returncode == 0, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert "KeyboardInterrupt" not in stderr.decode()
    assert "echo agent stopped" in out
    assert log.count("agent connected: echo/echo-t1") == 1
    assert log.count("agent left: echo/echo-t1") == 1
