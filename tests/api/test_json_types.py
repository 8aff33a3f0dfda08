"""Tool arguments, form values, payloads and data parts keep their JSON types on every surface.

A ``google.protobuf.Struct`` holds every number as a double: ``ids: [1, 2]`` used to be
listed, posted to Slack, sent to webhooks, stored and handed back to the agent as
``[1.0, 2.0]``, and an id above 2**53 lost digits. The contract now carries exact JSON
text beside each Struct (``arguments_json``, ``values_json``, ``payload_json``,
``default_value_json``, ``data_json``); a client that sends only the Struct gets its
whole numbers back as integers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc import aio

from svantic_grpc._json import MAX_DEPTH
from svantic_grpc.api.convert_messages import part_to_pb
from svantic_grpc.connected_agent import Dispatch, Reply, _answers_in, exact_json
from svantic_grpc.core.inputs.asks import resolution_json
from svantic_grpc.core.inputs.model import Form, FormField, InputKind, InputRequest, InputState, Resolution
from svantic_grpc.core.messages.model import Part
from svantic_grpc.pb import message_service_pb2, message_types_pb2
from svantic_grpc.stores import open_store
from tests._support import running_server
from tests.adapters.e2e_support import TENANT, TOOL, form_field, surfaces
from tests.agents_connected import data, eventually, new_session, running_agent, send, wait_for_state
from tests.agents_inputs import (
    HostedInputAgent,
    close_session,
    error_info,
    hosted_input_agents,
    pending,
    refused,
    replay,
    resolve,
)

pb = message_types_pb2
BIG = 2**63 - 5
"""An id a double cannot hold: it reads back as 9223372036854775808.0."""
ARGUMENTS = {"ids": [1, 2], "big": BIG, "ratio": 0.5, "flag": True}
COMPLETED = pb.MESSAGE_STATE_COMPLETED
INPUT_REQUIRED = pb.MESSAGE_STATE_INPUT_REQUIRED


def nested(levels: int, inner: str = "1") -> str:
    """JSON text: ``inner`` inside ``levels`` objects."""
    return '{"a": ' * levels + inner + "}" * levels


def typed(value: Any) -> str:
    """``value`` as JSON text: tells ``1`` from ``1.0`` and ``True`` from ``1``."""
    return json.dumps(value, sort_keys=True)


class BatchAgent:
    """Asks approval of a delete with ``ARGUMENTS``, then a form; records what it got back."""

    def __init__(self) -> None:
        self.got: list[tuple[bool, dict[str, Any] | None]] = []

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        approved = await reply.ask_approval(TOOL, ARGUMENTS)
        fields = [form_field("count", "How many", "number", default=7), form_field("ref", "Ticket", "number")]
        values = await reply.ask_form("Batch", fields)
        self.got.append((approved, values))
        await reply.complete()


async def test_integers_stay_integers_in_the_queue_slack_webhooks_the_store_and_the_agents_answer(
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path / 'mesh.db'}"
    agent = BatchAgent()
    async with surfaces(agent, store=store) as s:
        session_id, message_id, request_id = await s.ask()

        # Slack shows the arguments as the agent wrote them.
        post = await s.slack_post(request_id)
        shown = json.dumps(ARGUMENTS, indent=1, sort_keys=True)
        texts = [b["text"]["text"] for b in post["blocks"] if isinstance(b.get("text"), dict)]
        assert any(shown in t for t in texts), texts

        # The webhook receiver gets them exactly too.
        note = await s.notification(request_id)
        assert typed(note["request"]["tool_call"]["arguments"]) == typed(ARGUMENTS)

        # The approval queue: the exact text, and the Struct for clients that read it.
        [listed] = await s.pending(session_id)
        assert typed(json.loads(listed.tool_call.arguments_json)) == typed(ARGUMENTS)
        assert json_format.MessageToDict(listed.tool_call.arguments) == {**ARGUMENTS, "big": float(BIG)}

        await s.resolve_grpc(request_id)

        async def form_asked() -> bool:
            return any(r.kind == pb.INPUT_KIND_FORM for r in await s.pending(session_id))

        await eventually(form_asked)
        [form] = await s.pending(session_id)
        assert [f.default_value_json for f in form.form.fields] == ["7", ""]
        answered = await s.resolve_grpc(
            form.request_id, decision=pb.DECISION_UNSPECIFIED, values_json=f'{{"count": 3, "ref": {BIG}}}'
        )
        assert answered.resolution.values_json == f'{{"count":3,"ref":{BIG}}}'
        await s.finished(session_id, message_id)
        assert typed(agent.got) == typed([(True, {"count": 3, "ref": BIG})])

    # What the SQLite file holds, read back by a fresh store.
    reopened = open_store(store)
    await reopened.connect()
    try:
        approval = await reopened.get_input(tenant_id=TENANT, request_id=request_id)
        answer = await reopened.get_input(tenant_id=TENANT, request_id=form.request_id)
    finally:
        await reopened.close()
    assert approval is not None and approval.tool_call is not None
    assert typed(approval.tool_call.arguments) == typed(ARGUMENTS)
    assert answer is not None and answer.resolution is not None and answer.form is not None
    assert typed(answer.resolution.values) == typed({"count": 3, "ref": BIG})
    assert typed(answer.form.fields[0].default) == "7"


class StructOnlyAgent:
    """Asks to confirm a tool call, filling only the Struct (what a client in another language does)."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        request = pb.InputRequest(
            kind=pb.INPUT_KIND_CONFIRMATION, tool_call=pb.ToolCall(tool_name="crm.export")
        )
        request.tool_call.arguments.update({"ids": [1, 2], "limit": 1e300, "ratio": 0.5})
        answer = await reply.request_input(request)
        self.payloads.append(exact_json(answer.resolution.payload, answer.resolution.payload_json))
        await reply.complete()


async def test_a_struct_only_client_sending_1_gets_1_back() -> None:
    agent = StructOnlyAgent()
    async with running_server() as client, running_agent(client, agent, agent_type="crm"):
        session_id = await new_session(client)
        message = await send(client, session_id, "export", data({"target_agent": "crm", "page": 1}))
        assert message.state == INPUT_REQUIRED, message.state_reason

        # The agent's whole numbers are integers; a double beyond 2**53 stays a double.
        [listed] = (await pending(client, session_id)).requests
        arguments = json.loads(listed.tool_call.arguments_json)
        assert typed(arguments) == typed({"ids": [1, 2], "limit": 1e300, "ratio": 0.5})
        # A data part sent as a Struct alone is read the same way.
        assert typed(json.loads(message.parts[1].data_json)) == typed({"target_agent": "crm", "page": 1})

        # A gRPC client sending only the Struct: its 1 comes back, and reaches the agent, as 1.
        resolved = await resolve(client, listed.request_id, confirmed=True, payload={"batch": 1})
        assert resolved.resolution.payload_json == '{"batch":1}'
        await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert typed(agent.payloads) == typed([{"batch": 1}])


class DataAgent:
    """Records the data parts of each dispatch as the helper reads them."""

    def __init__(self) -> None:
        self.data: list[list[dict[str, Any]]] = []

    async def __call__(self, dispatch: Dispatch, reply: Reply) -> None:
        self.data.append(dispatch.data)
        await reply.complete({"echo": dispatch.data[-1]})


async def test_data_parts_carry_exact_json_both_ways() -> None:
    agent = DataAgent()
    async with running_server() as client, running_agent(client, agent, agent_type="crm"):
        session_id = await new_session(client)
        exact = pb.Part(data_json=f'{{"order": {BIG}, "qty": 2}}')
        message = await send(client, session_id, data({"target_agent": "crm"}), exact)
        done = await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert typed(agent.data) == typed([[{"target_agent": "crm"}, {"order": BIG, "qty": 2}]])
        echoed = done.history[-1].parts[-1]
        assert typed(exact_json(echoed.data, echoed.data_json)) == typed({"echo": {"order": BIG, "qty": 2}})

        # As deep as the text may nest (the session's chat agent answers it), and every
        # Python client can still read the session's log.
        deep = pb.Part(data_json=nested(MAX_DEPTH))
        message = await send(client, session_id, "keep this", deep)
        assert json.loads(message.parts[1].data_json) == json.loads(nested(MAX_DEPTH))
        await wait_for_state(client, session_id, message.message_id, COMPLETED)
        await close_session(client, session_id)
        assert any(e.HasField("turn_added") for e in await replay(client, session_id))


async def test_exact_json_that_is_not_strict_json_is_refused_naming_the_field() -> None:
    async with running_server() as client:
        session_id = await new_session(client)
        md = await client.md()

        def resolve_with(**resolution: Any) -> Any:
            request = message_service_pb2.ResolveInputRequest(
                request_id="inp_missing", resolution=pb.Resolution(**resolution)
            )
            return client.messages.ResolveInput(request, metadata=md)

        for fields, field, says in [
            ({"values_json": '{"n": NaN}'}, "resolution.values_json", "NaN"),
            ({"values_json": "[1, 2]"}, "resolution.values_json", "object"),
            ({"payload_json": '{"n": 18446744073709551616}'}, "resolution.payload_json", "64 bits"),
            ({"payload_json": '{"n": 1e999}'}, "resolution.payload_json", "range"),
            ({"values_json": '{"n": '}, "resolution.values_json", "not valid JSON"),
            ({"values_json": '{"n": "\\ud800"}'}, "resolution.values_json", "lone surrogate"),
            ({"payload_json": '{"\\udc00": 1}'}, "resolution.payload_json", "lone surrogate"),
            (
                {"values_json": nested(MAX_DEPTH + 1)},
                "resolution.values_json",
                f"more than {MAX_DEPTH} levels deep",
            ),
        ]:
            with pytest.raises(aio.AioRpcError) as excinfo:
                await resolve_with(**fields)
            code, _, _, named = error_info(excinfo.value)
            assert (code, named) == (grpc.StatusCode.INVALID_ARGUMENT, field), fields
            assert says in (excinfo.value.details() or ""), (fields, excinfo.value.details())

        bad_part = pb.Part(text="hi", data_json="{}")
        code, _, _, named = await refused(send(client, session_id, bad_part))
        assert (code, named) == (grpc.StatusCode.INVALID_ARGUMENT, "message.parts[0].data_json")

        # found from outside: a lone surrogate escape was stored, and every later read of the
        # message (its session's stream, the tenant's message list) failed with INTERNAL
        lone = pb.Part(data_json='{"a": ["ok", "\\ud800"]}')
        code, _, _, named = await refused(send(client, session_id, lone))
        assert (code, named) == (grpc.StatusCode.INVALID_ARGUMENT, "message.parts[0].data_json")
        paired = pb.Part(data_json='{"a": "\\ud83d\\ude00"}')  # a pair is one character: kept
        message = await send(client, session_id, "smile", paired)
        assert json.loads(message.parts[1].data_json) == {"a": "\U0001f600"}
        listed = await client.messages.ListMessages(message_service_pb2.ListMessagesRequest(), metadata=md)
        assert [m.message_id for m in listed.messages] == [message.message_id]


async def test_an_agents_json_with_a_lone_surrogate_fails_its_message_and_poisons_nothing() -> None:
    # found from outside: an agent's artifact (or tool call) holding a lone surrogate escape was
    # stored, and from then on the tenant's message list and approval queue answered INTERNAL
    async def handler(dispatch: Dispatch, reply: Reply) -> None:
        if dispatch.text == "artifact":
            await reply.artifact([pb.Part(data_json='{"r": "\\ud800"}')])
        else:
            call = pb.ToolCall(tool_name="crm.delete_all", arguments_json='{"x": "\\udc00"}')
            await reply.request_input(pb.InputRequest(kind=pb.INPUT_KIND_TOOL_APPROVAL, tool_call=call))
        await reply.complete("done")

    async with running_server() as client, running_agent(client, handler, agent_type="crm"):
        md = await client.md()
        for what, field in [
            ("artifact", "update.artifacts[0].parts[0].data_json"),
            ("ask", "update.input_request.tool_call.arguments_json"),
        ]:
            session_id = await new_session(client)
            message = await send(client, session_id, what, data({"target_agent": "crm"}))
            assert message.state == pb.MESSAGE_STATE_FAILED, message.state_reason
            assert field in message.state_reason and "lone surrogate" in message.state_reason
        listed = await client.messages.ListMessages(message_service_pb2.ListMessagesRequest(), metadata=md)
        assert len(listed.messages) == 2
        queue = await client.messages.ListPendingInputs(
            message_service_pb2.ListPendingInputsRequest(), metadata=md
        )
        assert list(queue.requests) == []


async def test_a_hosted_agents_whole_numbers_arrive_as_integers() -> None:
    ask = {
        "kind": "tool_approval",
        "tool_call": {"tool_name": "crm.delete_records", "arguments": {"ids": [1, 2]}},
    }
    deletes = {"name": "deletes", "match": {"tool": "crm.delete_*"}, "enforcement": "require_approval"}
    async with (
        running_server(policies=[deletes]) as client,
        hosted_input_agents(client.channel, HostedInputAgent("crm-h", ask=ask)) as hosted,
    ):
        await client.registry.RegisterAgent(hosted.agents["crm-h"].registration(), metadata=await client.md())
        session_id = await new_session(client)
        message = await send(client, session_id, "clean up", data({"target_agent": "hosted-crm"}))
        assert message.state == INPUT_REQUIRED, message.state_reason
        [listed] = (await pending(client, session_id)).requests
        assert listed.tool_call.arguments_json == '{"ids":[1,2]}'


async def test_an_answer_carried_in_a_resumed_dispatch_reaches_the_handler_with_integers() -> None:
    # After a restart the answer travels in the dispatch as an ``input_resolution`` data part
    # (core/dispatch/_run.py); the helper hands it to the handler's ``ask_form``.
    answered = InputRequest(
        tenant_id=TENANT,
        request_id="inp_1",
        session_id="s1",
        message_id="m1",
        kind=InputKind.FORM,
        created_at=0.0,
        expires_at=1.0,
        form=Form("Batch", fields=(FormField("count", "number"), FormField("ref", "number"))),
        state=InputState.RESOLVED,
        resolution=Resolution(values={"count": 3, "ref": BIG}, resolved_by="ops"),
    )
    part = part_to_pb(Part(data={"input_resolution": resolution_json(answered)}))
    resumed = pb.Message(parts=[pb.Part(text="clean up"), part])

    async def never_sent(update: Any) -> None:
        raise AssertionError("the handler asked again instead of using the carried answer")

    reply = Reply("dsp_1", never_sent, prefilled=_answers_in(resumed))
    values = await reply.ask_form("Batch", [form_field("count", "How many", "number")])
    assert typed(values) == typed({"count": 3, "ref": BIG})
