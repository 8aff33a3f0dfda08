"""An answer whose caller goes away while it is written (a deadline, a client cancelled, a chat
stream closed right after its resolve) is followed through once stored: the waiting agent gets it
and the adapters are told. Found from outside (review 6, V4): the answer was stored, but what
follows the write was skipped with the cancelled call, and the message waited for good."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest

from svantic_grpc.core._tasks import to_the_end
from svantic_grpc.core.auth import Caller, Scope, TokenSettings
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.inputs.model import (
    Decision,
    InputKind,
    InputRequest,
    InputState,
    Resolution,
    Surface,
    ToolCall,
)
from svantic_grpc.core.mesh import Mesh, MeshOptions
from svantic_grpc.core.store import Change, Changed
from svantic_grpc.stores.memory import MemoryStore

CALLER = Caller("acme", "acme-full", "terminal", (Scope.FULL,), "tok_1")


class SlowStore(MemoryStore):
    """A store whose writes of ended requests wait at a gate (a database taking its time)."""

    suspends = True

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def write(self, change: Change) -> Changed:
        if any(r.state is not InputState.PENDING for r in change.inputs):
            self.entered.set()
            await self.gate.wait()
        return await super().write(change)


class Adapter:
    def __init__(self) -> None:
        self.outcomes: list[InputRequest] = []

    async def on_request(self, request: InputRequest) -> None:
        pass

    async def on_outcome(self, request: InputRequest) -> None:
        self.outcomes.append(request)


async def asked(mesh: Mesh) -> InputRequest:
    session_id = (await mesh.sessions.init(CALLER)).session_id
    return await mesh.inputs.ask(
        tenant_id="acme",
        session_id=session_id,
        message_id="m1",
        kind=InputKind.TOOL_APPROVAL,
        tool_call=ToolCall("crm.delete_records", {"ids": [7]}),
    )


async def _cancelled_while_written(mesh: Mesh, store: SlowStore, call: Any) -> None:
    task = asyncio.create_task(call)
    await asyncio.wait_for(store.entered.wait(), 5)
    task.cancel()  # the caller goes away while the store writes
    await asyncio.sleep(0)
    store.gate.set()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_an_answer_stored_after_its_caller_left_reaches_the_waiter_and_the_adapters(
    clock: ManualClock,
) -> None:
    store = SlowStore()
    mesh = Mesh(store=store, tokens=TokenSettings(signing_key="k" * 32), credentials=(), clock=clock)
    await mesh.start()
    adapter = Adapter()
    mesh.inputs.add_listener(adapter)
    await mesh.inputs.start_telling()
    try:
        request = await asked(mesh)
        waiting = asyncio.create_task(mesh.inputs.wait("acme", request.request_id))  # the agent's side
        await _cancelled_while_written(
            mesh,
            store,
            mesh.inputs.resolve(
                tenant_id="acme",
                request_id=request.request_id,
                resolution=Resolution(decision=Decision.APPROVE),
                responder="ops",
                surface=Surface.GRPC,
            ),
        )
        answered = await asyncio.wait_for(waiting, 5)
        assert answered.state is InputState.RESOLVED
        assert answered.resolution is not None and answered.resolution.decision is Decision.APPROVE
        await asyncio.sleep(0.01)
        assert [(r.request_id, r.state) for r in adapter.outcomes] == [
            (request.request_id, InputState.RESOLVED)
        ]
    finally:
        await mesh.stop()


async def test_a_withdrawal_stored_after_its_caller_left_wakes_the_waiter(clock: ManualClock) -> None:
    store = SlowStore()
    mesh = Mesh(
        store=store,
        tokens=TokenSettings(signing_key="k" * 32),
        credentials=(),
        options=MeshOptions(session_ttl_s=0),
        clock=clock,
    )
    await mesh.start()
    try:
        request = await asked(mesh)
        waiting = asyncio.create_task(mesh.inputs.wait("acme", request.request_id))
        await _cancelled_while_written(
            mesh, store, mesh.inputs.cancel_for_message("acme", request.session_id, "m1", "not needed")
        )
        withdrawn = await asyncio.wait_for(waiting, 5)
        assert (withdrawn.state, withdrawn.outcome_reason) == (InputState.CANCELED, "not needed")
    finally:
        await mesh.stop()


async def test_work_run_to_the_end_is_waited_for_through_a_second_cancel_and_its_error_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by review: cancelled twice, the caller let go of its locks while the work still ran,
    and an error of the work whose caller had gone was dropped without a word."""
    release = asyncio.Event()
    done: list[str] = []

    async def work() -> str:
        await release.wait()
        done.append("written")
        raise RuntimeError("the store refused it")

    caller = asyncio.create_task(to_the_end(work()))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.sleep(0)
    caller.cancel()  # a second cancel (the server stopping after the client left)
    await asyncio.sleep(0.01)
    assert not caller.done()  # still waiting for the work: its locks are not let go early
    release.set()
    with (
        caplog.at_level(logging.WARNING, logger="svantic_grpc.core._tasks"),
        pytest.raises(asyncio.CancelledError),
    ):
        await caller
    assert done == ["written"]
    assert any("the store refused it" in r.getMessage() for r in caplog.records)
