"""A message in protobuf form (answers, dispatches, event snapshots) is the message as it is now.

What does not change while a message runs is converted once and reused (``convert_messages``):
these tests hold that every conversion still shows the message's own ids, state, turns and
outputs, whichever message was converted before it.
"""

from __future__ import annotations

from dataclasses import replace

from svantic_grpc.api.convert_messages import message_to_pb
from svantic_grpc.core.messages.model import Artifact, Message, MessageState, Part, Role, Turn
from svantic_grpc.pb import message_types_pb2 as pb

PARTS = (Part(text="hello"), Part(data={"target_agent": "echo", "n": 1}))


def _sent(message_id: str = "msg_1", *, parts: tuple[Part, ...] = PARTS, **fields: object) -> Message:
    base = Message(
        tenant_id="t",
        session_id="ses_1",
        message_id=message_id,
        role=Role.USER,
        parts=parts,
        state=MessageState.WORKING,
        created_at=100.0,
        updated_at=100.5,
        sender="client-a",
        history=(Turn(Role.USER, parts, 100.0),),
    )
    return replace(base, **fields) if fields else base


def _expected(message: Message) -> pb.Message:
    """The message field by field, as a reader would check it."""

    def parts_pb(parts: tuple[Part, ...]) -> list[pb.Part]:
        out = []
        for part in parts:
            if part.text is not None:
                out.append(pb.Part(text=part.text))
            else:
                item = pb.Part(data_json=_json(part.data))
                item.data.update(dict(part.data or {}))
                out.append(item)
        return out

    def seconds(value: float) -> dict[str, int]:
        whole, nanos = divmod(round(value * 1e9), 1_000_000_000)
        return {"seconds": whole, "nanos": nanos}

    role = {Role.USER: pb.ROLE_USER, Role.AGENT: pb.ROLE_AGENT}
    state = {
        MessageState.WORKING: pb.MESSAGE_STATE_WORKING,
        MessageState.COMPLETED: pb.MESSAGE_STATE_COMPLETED,
    }
    expected = pb.Message(
        message_id=message.message_id,
        session_id=message.session_id,
        role=role[message.role],
        parts=parts_pb(message.parts),
        state=state[message.state],
        state_reason=message.state_reason,
        history=[
            pb.Turn(role=role[t.role], parts=parts_pb(t.parts), instance_id=t.instance_id)
            for t in message.history
        ],
        artifacts=[
            pb.Artifact(artifact_id=a.artifact_id, name=a.name, parts=parts_pb(a.parts))
            for a in message.artifacts
        ],
        agent_type=message.agent_type,
        instance_id=message.instance_id,
        sender=message.sender,
    )
    for turn_pb, turn in zip(expected.history, message.history, strict=True):
        turn_pb.time.seconds, turn_pb.time.nanos = seconds(turn.time).values()
    expected.created_at.seconds, expected.created_at.nanos = seconds(message.created_at).values()
    expected.updated_at.seconds, expected.updated_at.nanos = seconds(message.updated_at).values()
    return expected


def _json(data: object) -> str:
    from svantic_grpc._json import dumps

    return dumps(data)


def test_each_step_of_a_running_message_shows_it_as_it_is_then() -> None:
    sent = _sent(agent_type="echo", instance_id="e1", state_reason="routed to echo")
    assert message_to_pb(sent) == _expected(sent)  # as dispatched
    said = Turn(Role.AGENT, (Part(text="echo: hello"),), 101.0, "e1")
    done = replace(
        sent,
        state=MessageState.COMPLETED,
        state_reason="",
        updated_at=101.25,
        history=(*sent.history, said),
        artifacts=(Artifact("art_1", (Part(text="out"),), "echo"),),
        version=3,
    )
    assert message_to_pb(done) == _expected(done)  # as answered
    assert message_to_pb(sent) == _expected(sent)  # an older snapshot stays what it was


def test_messages_that_share_parts_keep_their_own_ids_sender_and_times() -> None:
    first = _sent("msg_a")
    assert message_to_pb(first) == _expected(first)
    # The same parts and first turn objects, in another message (a copy made with replace):
    for other in (
        replace(first, message_id="msg_b"),
        replace(first, session_id="ses_2"),
        replace(first, sender="client-b"),
        replace(first, created_at=200.0),
        replace(first, role=Role.AGENT),
        replace(first, history=()),
        replace(first, history=(Turn(Role.USER, PARTS, 100.0, "someone"),)),
        _sent("msg_a", created_at=200.0, history=(Turn(Role.USER, PARTS, 200.0),)),
    ):
        assert message_to_pb(other) == _expected(other)
        assert message_to_pb(first) == _expected(first)


def test_a_message_written_into_an_answer_field_is_the_same() -> None:
    from svantic_grpc.pb import message_service_pb2 as service_pb

    sent = _sent("msg_into")
    for _ in range(2):  # converted, then reused
        response = service_pb.SendMessageResponse()
        message_to_pb(sent, into=response.message)
        assert response.message == _expected(sent)
