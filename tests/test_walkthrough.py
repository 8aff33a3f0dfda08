"""The README's walkthrough (examples/walkthrough.py) works against a fresh server on its defaults."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests._support import running_server

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.py"


async def test_walkthrough_runs_on_the_development_default(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("walkthrough", EXAMPLE)
    assert spec is not None and spec.loader is not None
    walkthrough = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(walkthrough)
    async with running_server(env={}, tenants=[]) as client:
        await walkthrough.main(client.server.target)
    out = capsys.readouterr().out
    assert "session my-session-001 with 7 agents" in out
    assert "invited tl-pod-1" in out
    assert "transcript-link        tl-pod-1" in out and "invited" in out
    assert "closed: closed by svantic" in out
