"""A part's shape is checked once, in the core, for what clients send and what agents report alike."""

from __future__ import annotations

from typing import Any

import pytest

from svantic_grpc.core.dispatch import DispatchUpdate, check_update
from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.inputs.model import check_responder
from svantic_grpc.core.messages.model import Artifact, FilePart, Part, check_parts


@pytest.mark.parametrize(
    ("part", "field"),
    [
        pytest.param(Part(), "update.turn.parts[1]", id="no-content"),
        pytest.param(Part(text="a", data={"b": 1}), "update.turn.parts[1]", id="two-contents"),
        pytest.param(Part(file=FilePart("x.bin")), "update.turn.parts[1].file", id="file-without-content"),
        pytest.param(
            Part(file=FilePart("x", data=b"1", uri="u")), "update.turn.parts[1].file", id="file-both"
        ),
    ],
)
def test_an_agents_turn_is_held_to_the_part_shape(part: Part, field: str) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        check_update(DispatchUpdate(parts=(Part(text="ok"), part)))
    assert excinfo.value.field == field


def test_an_agents_artifact_is_held_to_the_part_shape() -> None:
    update = DispatchUpdate(artifacts=(Artifact("a1", (Part(text="ok"),)), Artifact("a2", (Part(),))))
    with pytest.raises(InvalidArgument) as excinfo:
        check_update(update)
    assert excinfo.value.field == "update.artifacts[1].parts[0]"


def test_well_formed_parts_pass_and_their_bytes_are_counted() -> None:
    parts = (
        Part(text="abc"),
        Part(data={"k": [1]}),
        Part(file=FilePart("f", data=b"12345")),
        Part(file=FilePart(uri="u")),
    )
    # text 3, file 5, and the data part's JSON (counted as 18 bytes: 9 as text) twice: a Struct and its text
    assert check_parts(parts, "message.parts") == 3 + 5 + 2 * 18
    check_update(DispatchUpdate(parts=parts))


@pytest.mark.parametrize(
    ("check", "field"),
    [
        pytest.param(lambda text: check_responder(text), "responder", id="responder"),
        pytest.param(lambda text: check_update(DispatchUpdate(reason=text)), "update.reason", id="reason"),
    ],
)
def test_words_a_person_or_agent_gives_are_unicode_text(check: Any, field: str) -> None:
    # Slack, the console and adapters read JSON with parsers that let a lone surrogate escape
    # through: kept, it fails every later encoding of what carries it (answers, events, streams).
    assert check("Zoë approves ✓") in ("Zoë approves ✓", None)
    with pytest.raises(InvalidArgument) as excinfo:
        check("bad \ud800")
    assert excinfo.value.field == field
