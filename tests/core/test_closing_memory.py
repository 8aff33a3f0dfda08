"""A closed session is remembered as closing for ``_CLOSING_S`` (a message sent meanwhile ends
canceled), then let go as later closes come, however many closes there were in between."""

from __future__ import annotations

import asyncio

import pytest

from svantic_grpc.core.auth import Caller, Scope, TokenSettings
from svantic_grpc.core.mesh import Mesh, MeshOptions
from svantic_grpc.core.messages import service
from svantic_grpc.stores.memory import MemoryStore

CALLER = Caller("acme", "acme-full", "bench", (Scope.FULL,), "tok_1")


@pytest.fixture
async def loop_time(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The event loop's clock as the closing memory reads it, moved by the test (no sleeping)."""
    now = [asyncio.get_running_loop().time()]
    monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: now[0])
    return now


def _mesh() -> Mesh:
    return Mesh(
        store=MemoryStore(), tokens=TokenSettings(signing_key="k" * 32), credentials=(), options=MeshOptions()
    )


async def test_closes_are_remembered_for_their_time_then_let_go(loop_time: list[float]) -> None:
    mesh = _mesh()
    messages = mesh.messages

    async def closed() -> str:
        session = await mesh.sessions.init(CALLER)
        await mesh.sessions.close(CALLER, session.session_id, reason="done")
        return session.session_id

    early = [await closed() for _ in range(50)]
    assert all(messages._closing_reason("acme", s) == "done" for s in early)
    loop_time[0] += service._CLOSING_S
    late = [await closed() for _ in range(50)]  # each close lets go of what is past its time
    assert not any(("acme", s) in messages._closing for s in early)
    assert all(messages._closing_reason("acme", s) == "done" for s in late)
    assert len(messages._closing) == 50


async def test_a_close_begun_again_is_remembered_from_its_new_start(loop_time: list[float]) -> None:
    messages = _mesh().messages
    await messages._session_closing("acme", "s1", "first try")
    messages._close_failed("acme", "s1")  # the close was not written
    loop_time[0] += service._CLOSING_S / 2
    await messages._session_closing("acme", "s1", "second try")
    loop_time[0] += service._CLOSING_S / 2  # the first try's time is up, not the second's
    await messages._session_closing("acme", "s2", "another")  # lets go of what is past its time
    assert messages._closing_reason("acme", "s1") == "second try"
