"""`svantic-grpc pending` and `svantic-grpc resolve` against a real server on loopback.

Each test runs a development-mode server (no signing key, no tenants: the
`svantic` / `your-secret` credential works) and a connected agent whose handler
asks for approval of a policy-gated tool call (or for a form, or a confirmation). The CLI's
``main(argv)`` runs in a worker thread (it is a blocking program) while the server
and the agent run on the test's loop; one test runs it as a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from svantic_grpc.cli import main
from svantic_grpc.connected_agent import ConnectedAgent, Dispatch, Reply
from svantic_grpc.pb import (
    auth_service_pb2,
    message_service_pb2,
    message_types_pb2,
)
from tests._support import Client, running_server
from tests.agents_connected import WAIT, data, new_session, run_agent

REPO_ROOT = Path(__file__).resolve().parents[1]
DEV = ("svantic", "your-secret")
POLICIES = [{"name": "deletes", "match": {"tool": "crm.delete_*"}, "enforcement": "require_approval"}]
COMPLETED = message_types_pb2.MESSAGE_STATE_COMPLETED
INPUT_REQUIRED = message_types_pb2.MESSAGE_STATE_INPUT_REQUIRED
Metadata = tuple[tuple[str, str], ...]


@pytest.fixture(autouse=True)
def _no_credential_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SVANTIC_CLIENT_ID", raising=False)
    monkeypatch.delenv("SVANTIC_CLIENT_SECRET", raising=False)


@dataclass
class Crm:
    """The agent's handler: asks approval to delete (a form, a confirmation), then records the answer."""

    answers: dict[str, Any] = field(default_factory=dict)
    """dispatch text -> True/False (approval), the form values, or ("confirmed", bool)."""
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        if "form" in dispatch.text:
            region = message_types_pb2.FormField(
                name="region", type="select", label="Region", required=True, options=["eu", "us"]
            )
            answer: Any = await reply.ask_form("Pick a region", [region])
        elif "confirm" in dispatch.text:
            ask = message_types_pb2.InputRequest(
                kind=message_types_pb2.INPUT_KIND_CONFIRMATION,
                tool_call=message_types_pb2.ToolCall(tool_name="mail.send"),
            )
            ended = await reply.request_input(ask)
            answer = ("confirmed", ended.resolution.confirmed)
        else:
            answer = await reply.ask_approval("crm.delete_records", {"ids": [1]})
        async with self.arrived:
            self.answers[dispatch.text] = answer
            self.arrived.notify_all()
        await reply.complete(f"answer: {answer}")

    async def answer(self, text: str) -> Any:
        async with asyncio.timeout(WAIT), self.arrived:
            await self.arrived.wait_for(lambda: text in self.answers)
        return self.answers[text]


@dataclass
class Mesh:
    client: Client
    md: Metadata
    crm: Crm

    @property
    def target(self) -> str:
        return self.client.server.target

    async def ask(self, text: str, session_id: str = "") -> tuple[str, str, str]:
        """Send ``text`` to the crm agent; (session, message, input request) once it waits for a human."""
        session_id = session_id or await new_session(self.client, md=self.md)
        outgoing = message_service_pb2.OutgoingMessage(
            parts=[message_types_pb2.Part(text=text), data({"target_agent": "crm"})]
        )
        response = await asyncio.wait_for(
            self.client.messages.SendMessage(
                message_service_pb2.SendMessageRequest(session_id=session_id, message=outgoing),
                metadata=self.md,
            ),
            WAIT,
        )
        message = response.message
        assert message.state == INPUT_REQUIRED, message.state_reason
        pending = await self.client.messages.ListPendingInputs(
            message_service_pb2.ListPendingInputsRequest(session_id=session_id), metadata=self.md
        )
        (request,) = [r for r in pending.requests if r.message_id == message.message_id]
        return session_id, message.message_id, request.request_id

    async def completed(self, session_id: str, message_id: str) -> message_types_pb2.Message:
        """The message once COMPLETED (polled with GetMessage, bounded by ``WAIT``)."""
        async with asyncio.timeout(WAIT):
            while True:
                response: message_service_pb2.GetMessageResponse = await self.client.messages.GetMessage(
                    message_service_pb2.GetMessageRequest(session_id=session_id, message_id=message_id),
                    metadata=self.md,
                )
                if response.message.state == COMPLETED:
                    return response.message
                await asyncio.sleep(0.01)


@asynccontextmanager
async def mesh() -> AsyncIterator[Mesh]:
    """A development-mode server with the `deletes` policy and a connected `crm` agent."""
    crm = Crm()
    async with running_server(env={}, tenants=[], policies=POLICIES) as client:
        token = await client.auth.GetToken(
            auth_service_pb2.GetTokenRequest(client_id=DEV[0], client_secret=DEV[1], agent_type="test")
        )
        agent = ConnectedAgent(
            client.server.target,
            client_id=DEV[0],
            client_secret=DEV[1],
            agent_type="crm",
            instance_id="crm-1",
            handler=crm,
            reconnect_delay_s=0.05,
        )
        async with run_agent(agent):
            yield Mesh(client, (("authorization", f"Bearer {token.token}"),), crm)


@dataclass
class Run:
    code: int
    out: str
    err: str


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    """``svantic-grpc argv`` in a worker thread; its exit code and output."""
    capsys.readouterr()  # drop anything printed before

    def run() -> int:
        try:
            return main(list(argv))
        except SystemExit as exc:  # argparse usage errors; caught here, a task must not see SystemExit
            return int(exc.code or 0)

    code = await asyncio.wait_for(asyncio.to_thread(run), WAIT * 3)
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


# --------------------------------------------------------------------------- pending


async def test_pending_lists_the_request_and_resolve_approves_it(capsys: pytest.CaptureFixture[str]) -> None:
    async with mesh() as m:
        session_id, message_id, request_id = await m.ask("delete record 1")

        table = await cli(capsys, "pending", "--target", m.target)
        assert table.code == 0, table.err
        assert "using the development credential 'svantic'" in table.err
        header, row, total = table.out.strip().splitlines()
        assert header.split() == [
            "REQUEST",
            "SESSION",
            "MESSAGE",
            "KIND",
            "SUMMARY",
            "POLICY",
            "EXPIRES",
            "IN",
        ]
        for text in (request_id, session_id, message_id, "tool_approval", "crm.delete_records", "deletes"):
            assert text in row
        assert '{"ids":[1]}' in row
        assert re.fullmatch(r"1h00m|59m[45]\ds", row.split()[-1])  # input_request_ttl_ms: one hour
        assert total == "1 pending"

        listed = await cli(capsys, "pending", "--target", m.target, "--session", session_id, "--json")
        assert listed.code == 0, listed.err
        (item,) = json.loads(listed.out)
        assert item["id"] == request_id
        assert (item["session_id"], item["message_id"]) == (session_id, message_id)
        assert (item["kind"], item["tool"], item["policy"]) == (
            "tool_approval",
            "crm.delete_records",
            "deletes",
        )
        assert item["arguments"] == {"ids": [1]}
        assert item["summary"] == "approve tool call crm.delete_records"  # the mesh's own summary
        assert item["allowed_decisions"] == ["approve", "approve_for_session", "approve_always", "deny"]
        assert 3590 <= item["expires_in_s"] <= 3600

        done = await cli(capsys, "resolve", request_id, "--approve", "--target", m.target)
        assert done.code == 0, done.err
        assert done.out.startswith(f"resolved {request_id} (approve tool call crm.delete_records")
        assert ": approve by svantic via grpc at " in done.out
        assert await m.crm.answer("delete record 1") is True
        message = await m.completed(session_id, message_id)
        assert "answer: True" in message.history[-1].parts[0].text

        empty = await cli(capsys, "pending", "--target", m.target)
        assert (empty.code, empty.out.strip()) == (0, "no pending input requests")


async def test_pending_filters_by_session_and_takes_the_credential_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with mesh() as m:
        first, _, first_request = await m.ask("delete in the first session")
        second, _, second_request = await m.ask("delete in the second session")
        monkeypatch.setenv("SVANTIC_CLIENT_ID", DEV[0])
        monkeypatch.setenv("SVANTIC_CLIENT_SECRET", DEV[1])

        everything = await cli(capsys, "pending", "--target", m.target, "--json")
        assert everything.code == 0, everything.err
        assert everything.err == ""  # a credential was given: no development note
        assert [r["id"] for r in json.loads(everything.out)] == [first_request, second_request]

        one = await cli(capsys, "pending", "--target", m.target, "--session", second, "--json")
        assert [r["id"] for r in json.loads(one.out)] == [second_request]

        monkeypatch.setenv("SVANTIC_CLIENT_SECRET", "not-the-secret")
        refused = await cli(capsys, "pending", "--target", m.target)
        assert refused.code == 1
        assert "UNAUTHENTICATED" in refused.err and "BAD_CREDENTIALS" in refused.err

        # Flags win over the environment.
        flagged = await cli(
            capsys, "pending", "--target", m.target, "--client-id", DEV[0], "--client-secret", DEV[1]
        )
        assert flagged.code == 0, flagged.err
        assert first_request in flagged.out and first in flagged.out


# --------------------------------------------------------------------------- resolve


async def test_resolving_twice_fails_naming_who_won(capsys: pytest.CaptureFixture[str]) -> None:
    async with mesh() as m:
        session_id, message_id, request_id = await m.ask("delete record 1")

        denied = await cli(capsys, "resolve", request_id, "--deny", "not on a Friday", "--target", m.target)
        assert denied.code == 0, denied.err
        assert "deny (not on a Friday) by svantic via grpc" in denied.out
        assert await m.crm.answer("delete record 1") is False
        await m.completed(session_id, message_id)

        again = await cli(capsys, "resolve", request_id, "--approve", "--target", m.target)
        assert again.code == 1
        assert again.out == ""
        assert "ABORTED INPUT_ALREADY_RESOLVED" in again.err
        assert f"input request {request_id!r} was already answered by svantic via grpc" in again.err
        assert "(deny: not on a Friday)" in again.err


async def test_form_values_are_sent_and_checked_by_the_mesh(capsys: pytest.CaptureFixture[str]) -> None:
    async with mesh() as m:
        session_id, message_id, request_id = await m.ask("fill the form")
        listed = await cli(capsys, "pending", "--target", m.target, "--json")
        (item,) = json.loads(listed.out)
        assert (item["kind"], item["summary"]) == ("form", "fill in Pick a region")
        assert item["form"]["fields"] == [
            {"name": "region", "type": "select", "required": True, "sensitive": False}
        ]

        wrong = await cli(
            capsys, "resolve", request_id, "--values", '{"region": "mars"}', "--target", m.target
        )
        assert wrong.code == 1
        assert "INVALID_ARGUMENT" in wrong.err and "resolution.values.region" in wrong.err
        approval = await cli(capsys, "resolve", request_id, "--approve", "--target", m.target)
        assert approval.code == 1 and "INVALID_ARGUMENT" in approval.err  # a form takes values

        done = await cli(capsys, "resolve", request_id, "--values", '{"region": "eu"}', "--target", m.target)
        assert done.code == 0, done.err
        assert ": form submitted by svantic via grpc" in done.out
        assert await m.crm.answer("fill the form") == {"region": "eu"}
        await m.completed(session_id, message_id)


@pytest.mark.parametrize(
    ("flag", "confirmed", "outcome"), [("--confirm", True, "confirmed"), ("--reject", False, "not confirmed")]
)
async def test_confirm_and_reject_answer_a_confirmation(
    capsys: pytest.CaptureFixture[str], flag: str, confirmed: bool, outcome: str
) -> None:
    async with mesh() as m:
        session_id, message_id, request_id = await m.ask("confirm sending the mail")
        listed = await cli(capsys, "pending", "--target", m.target, "--json")
        (item,) = json.loads(listed.out)
        assert (item["kind"], item["summary"]) == ("confirmation", "confirm tool call mail.send")

        done = await cli(capsys, "resolve", request_id, flag, "--target", m.target)
        assert done.code == 0, done.err
        assert f": {outcome} by svantic via grpc" in done.out
        assert await m.crm.answer("confirm sending the mail") == ("confirmed", confirmed)
        await m.completed(session_id, message_id)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ("{region: eu}", "--values is not valid JSON (Expecting property name enclosed in double quotes"),
        ("", "--values is not valid JSON"),
        ('["eu"]', "--values must be a JSON object of field name to value, not list"),
        ('"eu"', "--values must be a JSON object of field name to value, not str"),
    ],
)
async def test_bad_json_values_are_a_usage_error(
    capsys: pytest.CaptureFixture[str], values: str, expected: str
) -> None:
    # Refused before any connection: nothing listens on the target.
    run = await cli(capsys, "resolve", "inp_1", "--values", values, "--target", f"127.0.0.1:{_free_port()}")
    assert run.code == 2
    assert run.out == ""
    assert expected in run.err
    assert "development credential" not in run.err


async def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{_free_port()}"
    no_answer = await cli(capsys, "resolve", "inp_1", "--target", target)
    assert no_answer.code == 2 and "one of the arguments --approve" in no_answer.err
    two = await cli(capsys, "resolve", "inp_1", "--approve", "--deny", "no", "--target", target)
    assert two.code == 2 and "not allowed with argument" in two.err
    blank = await cli(capsys, "resolve", "inp_1", "--deny", "  ", "--target", target)
    assert blank.code == 2 and "--deny needs a reason" in blank.err
    half = await cli(capsys, "pending", "--client-id", "ops", "--target", target)
    assert half.code == 2 and "incomplete credential: also give --client-secret" in half.err


async def test_an_unreachable_mesh_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{_free_port()}"
    run = await cli(capsys, "pending", "--target", target, "--timeout", "2")
    assert run.code == 1
    assert f"cannot reach the mesh at {target}" in run.err or "did not answer in time" in run.err


async def test_unknown_request_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    async with mesh() as m:
        run = await cli(capsys, "resolve", "inp_nope", "--approve", "--target", m.target)
        assert run.code == 1
        assert "NOT_FOUND INPUT_NOT_FOUND: input request 'inp_nope' not found" in run.err


async def test_the_installed_command_resolves_as_a_subprocess() -> None:
    async with mesh() as m:
        session_id, message_id, request_id = await m.ask("delete record 1")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "svantic_grpc",
            "resolve",
            request_id,
            "--approve-for-session",
            "--target",
            m.target,
            cwd=REPO_ROOT,
            env={"PATH": "/usr/bin:/bin", "SVANTIC_CLIENT_ID": DEV[0], "SVANTIC_CLIENT_SECRET": DEV[1]},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), WAIT * 5)
        assert process.returncode == 0, err.decode()
        assert f"resolved {request_id} " in out.decode()
        assert ": approve_for_session by svantic via grpc" in out.decode()
        assert await m.crm.answer("delete record 1") is True
        await m.completed(session_id, message_id)

        # Granted for the session: the next delete there does not ask a human.
        outgoing = message_service_pb2.OutgoingMessage(
            parts=[message_types_pb2.Part(text="delete again"), data({"target_agent": "crm"})]
        )
        response = await asyncio.wait_for(
            m.client.messages.SendMessage(
                message_service_pb2.SendMessageRequest(session_id=session_id, message=outgoing),
                metadata=m.md,
            ),
            WAIT,
        )
        assert response.message.state == COMPLETED, response.message.state_reason
        assert await m.crm.answer("delete again") is True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_a_session_that_is_not_there_is_named_not_listed_empty(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # found from outside: `pending --session <typo>` printed "no pending input requests" and exited 0
    async with mesh() as m:
        await m.ask("delete record 1")
        run = await cli(capsys, "pending", "--target", m.target, "--session", "ses_typo")
        assert run.code == 1
        assert "NOT_FOUND SESSION_NOT_FOUND: session 'ses_typo' not found" in run.err
        for call in (m.client.messages.ListPendingInputs, m.client.messages.ListMessages):
            request_type = (
                message_service_pb2.ListPendingInputsRequest
                if call is m.client.messages.ListPendingInputs
                else message_service_pb2.ListMessagesRequest
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(request_type(session_id="ses_typo"), metadata=m.md)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_pending_into_a_closed_pipe_ends_quietly() -> None:
    # found from outside: `pending --json | head -c 400` ended with a BrokenPipeError traceback
    async with mesh() as m:
        for n in range(30):
            await m.ask(f"delete record {n}")
        process = await asyncio.create_subprocess_shell(
            f"{sys.executable} -m svantic_grpc pending --json --target {m.target} | head -c 100",
            cwd=REPO_ROOT,
            env={"PATH": "/usr/bin:/bin", "SVANTIC_CLIENT_ID": DEV[0], "SVANTIC_CLIENT_SECRET": DEV[1]},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), WAIT * 5)
        assert len(out) == 100
        assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
