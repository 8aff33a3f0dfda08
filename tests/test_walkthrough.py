"""The README's walkthrough (examples/walkthrough.py) works against a fresh server on its defaults."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from tests._support import running_server

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.py"


def _walkthrough() -> ModuleType:
    spec = importlib.util.spec_from_file_location("walkthrough", EXAMPLE)
    assert spec is not None and spec.loader is not None
    walkthrough = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(walkthrough)
    return walkthrough


async def test_walkthrough_runs_on_the_development_default(capsys: pytest.CaptureFixture[str]) -> None:
    walkthrough = _walkthrough()
    async with running_server(env={}, tenants=[]) as client:
        await walkthrough.main(client.server.target)
    out = capsys.readouterr().out
    assert re.search(r"^session ses_\w+ with 7 agents$", out, re.M), out
    assert "invited tl-pod-1" in out
    assert re.search(r"^  transcript-link +tl-pod-1 +invited$", out, re.M), out
    assert "closed: closed by svantic" in out


async def test_walkthrough_runs_twice_on_one_server(capsys: pytest.CaptureFixture[str]) -> None:
    walkthrough = _walkthrough()
    async with running_server(env={}, tenants=[]) as client:
        await walkthrough.main(client.server.target)
        await walkthrough.main(client.server.target)
    out = capsys.readouterr().out
    sessions = re.findall(r"^session (\S+) with 7 agents$", out, re.M)
    assert len(sessions) == 2 and sessions[0] != sessions[1], out
    assert out.count("invited tl-pod-1") == 2
    assert out.count("closed: closed by svantic") == 2
