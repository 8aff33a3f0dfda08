"""Structured logs: with the JSON format every line parses, and lines about a session carry its id."""

from __future__ import annotations

import io
import json
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from svantic_grpc.config import SettingsError, parse_settings
from svantic_grpc.logs import JsonFormatter, TextFormatter
from tests._support import running_server
from tests.agents_connected import new_session, wait_for_state
from tests.agents_inputs import resolve
from tests.api.test_inputs import (
    APPROVE,
    COMPLETED,
    DELETE_RECORDS,
    DELETES,
    FAILED,
    ask_tools,
    crm_agent,
    real_time_clock,
)
from tests.test_cli import _serve, _settings_file


@contextmanager
def json_lines() -> Iterator[list[dict[str, Any]]]:
    """The ``svantic_grpc`` loggers' records at INFO and above, formatted as the JSON format writes them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("svantic_grpc")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lines: list[dict[str, Any]] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        lines.extend(json.loads(line) for line in out.getvalue().splitlines())


def one(lines: list[dict[str, Any]], starts: str) -> dict[str, Any]:
    found = [line for line in lines if line["message"].startswith(starts)]
    assert len(found) == 1, "\n".join(line["message"] for line in lines)
    return found[0]


async def test_json_lines_name_the_events_that_matter_with_their_session() -> None:
    clock = real_time_clock()
    with json_lines() as lines:
        async with (
            running_server(policies=[DELETES], clock=clock, input_request_ttl_ms=60_000) as client,
            crm_agent(client),
        ):
            session_id = await new_session(client)
            approved = await ask_tools(client, session_id, DELETE_RECORDS)
            await resolve(client, approved.input_request_ids[0], decision=APPROVE)
            await wait_for_state(client, session_id, approved.message_id, COMPLETED)
            expiring = await ask_tools(client, session_id, DELETE_RECORDS)
            clock.advance(61)
            assert await client.server.mesh.inputs.expiry.run_once() == 1
            await wait_for_state(client, session_id, expiring.message_id, FAILED)

    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys()
    assert one(lines, "svantic-grpc serving gRPC")["level"] == "INFO"
    one(lines, "svantic-grpc stopped")
    connected = one(lines, "agent connected: crm/crm-1")
    assert (connected["agent_type"], connected["instance_id"]) == ("crm", "crm-1")
    one(lines, "agent left: crm/crm-1")
    answered = one(lines, f"input request {approved.input_request_ids[0]} resolved")
    assert (answered["session_id"], answered["surface"], answered["outcome"]) == (
        session_id,
        "grpc",
        "resolved",
    )
    expired = one(lines, f"input request {expiring.input_request_ids[0]} expired")
    assert (expired["session_id"], expired["surface"]) == (session_id, "mesh")
    failed = one(lines, "dispatch failed: crm/crm-1")
    assert failed["session_id"] == session_id  # from the dispatch's context, not passed by hand
    assert failed["level"] == "WARNING"


def test_log_format_is_text_or_json() -> None:
    assert parse_settings({}).log_format == "text"
    assert parse_settings({"log_format": "json"}).log_format == "json"
    try:
        parse_settings({"log_format": "xml"})
    except SettingsError as exc:
        assert "log_format" in str(exc)
    else:
        raise AssertionError("log_format 'xml' was accepted")


def test_serve_with_log_format_json_writes_only_json_lines(tmp_path: Path) -> None:
    settings = _settings_file(tmp_path, log_format="json")
    with _serve("--settings", str(settings)) as server:
        server.wait_for("serving HTTP on")
        server.process.send_signal(signal.SIGTERM)
        code, stderr = server.finish()
    assert code == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line is one JSON object
    messages = [line["message"] for line in lines]
    assert any(m.startswith("svantic-grpc serving gRPC on") for m in messages), messages
    assert any(m.startswith("DEVELOPMENT MODE") for m in messages), messages
    assert messages[-1] == "svantic-grpc stopped"
    assert {line["level"] for line in lines} <= {"INFO", "WARNING"}


def test_a_text_line_keeps_what_an_agent_wrote_on_that_one_line() -> None:
    # found from outside: a failure reason with CR rewrote the line on a terminal (log spoofing)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("svantic_grpc.test_text_line")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("dispatch failed: %s", "oops\rid: 999999\nFORGED \x1b[2K line\u2028x")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("with a traceback: %s", "ü ok")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING dispatch failed: oops\\rid: 999999\\nFORGED \\x1b[2K line\\u2028x"
    assert lines[1] == "ERROR with a traceback: ü ok" and lines[2].startswith("Traceback")
