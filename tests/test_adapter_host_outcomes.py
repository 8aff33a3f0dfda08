"""The adapter host and outcomes told at least once: an adapter that fails to start is not told
what the others are, so those outcomes stay untold for the next start (found by review: they were
marked told, and the adapter that was down never got them)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from starlette.routing import Route

from svantic_grpc import adapter_host
from svantic_grpc.adapter import Adapter
from svantic_grpc.adapter_host import AdapterHost
from svantic_grpc.core.auth import Caller, Scope, TokenSettings
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.inputs.model import InputRequest
from svantic_grpc.core.mesh import Mesh
from svantic_grpc.http_server import HttpServer
from svantic_grpc.stores.sqlite import SqliteStore
from tests.core.test_outcomes_after_restart import ask_to_delete

CALLER = Caller("acme", "acme-full", "terminal", (Scope.FULL,), "tok_1")
told: list[str] = []


class Good(Adapter):
    async def on_outcome(self, request: InputRequest) -> None:
        told.append(request.request_id)


class Broken(Adapter):
    async def start(self) -> None:
        raise ConnectionError("its service is down at start-up")


@dataclass
class _EntryPoint:
    name: str
    adapter: type[Adapter]

    def load(self) -> type[Adapter]:
        return self.adapter


@contextlib.asynccontextmanager
async def hosting(
    tmp_path: Path,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    adapters: dict[str, type[Adapter]],
    *,
    http: HttpServer | None = None,
    start: bool = True,
) -> AsyncIterator[tuple[Mesh, AdapterHost]]:
    """A mesh on a SQLite file and an adapter host of ``adapters`` (their entry points), started
    (the host too, unless ``start`` is False); stopped on exit."""
    entries = [_EntryPoint(name, adapter) for name, adapter in adapters.items()]
    monkeypatch.setattr(adapter_host, "entry_points", lambda group: entries)
    mesh = Mesh(
        store=SqliteStore(tmp_path / "mesh.db"),
        tokens=TokenSettings(signing_key="k" * 32),
        credentials=(),
        clock=clock,
    )
    host = AdapterHost(
        configs={name: {} for name in adapters},
        http=http or HttpServer("127.0.0.1:0", ready=lambda: True),
        inputs=mesh.inputs,
        store=mesh.store,
        clock=clock,
        ids=mesh.ids,
        env={},
    )
    host.load()
    await mesh.start()
    try:
        if start:
            await host.start()
        yield mesh, host
    finally:
        await host.stop()
        await mesh.stop()


async def test_an_adapter_that_failed_to_start_leaves_the_outcomes_untold(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with hosting(tmp_path, clock, monkeypatch, {"good": Good, "broken": Broken}) as (mesh, host):
        assert list(host.adapters) == ["good"]
        session_id = (await mesh.sessions.init(CALLER)).session_id
        request = await ask_to_delete(mesh, session_id, "m1")
        await mesh.inputs.cancel_for_message("acme", session_id, "m1", "not needed")
        await _until(lambda: bool(told))
        assert told == [request.request_id]  # the adapter that is up is told
        await asyncio.sleep(0.05)
        # ... and the outcome stays untold, for the broken one at the next start.
        assert [r.request_id for r in await mesh.store.untold_outcomes()] == [request.request_id]


stopped: list[str] = []


class Hanging(Adapter):
    """Its service never answers at start-up (Slack's socket retried for ever)."""

    async def start(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        stopped.append(self.name)


async def test_an_adapter_whose_start_never_ends_is_disabled_and_the_mesh_goes_on(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found from outside (review 7): Slack's Socket Mode start waited for ever on a Slack that
    refused the socket, and the server never served."""
    monkeypatch.setattr(adapter_host, "START_TIMEOUT_S", 0.2)
    adapters = {"hanging": Hanging, "good": Good}
    async with hosting(tmp_path, clock, monkeypatch, adapters, start=False) as (_, host):
        await asyncio.wait_for(host.start(), 5)
        assert list(host.adapters) == ["good"]  # the next one started too
        assert stopped == ["hanging"]  # what it had opened is let go


class Counting(Adapter):
    told: ClassVar[list[str]] = []

    async def on_outcome(self, request: InputRequest) -> None:
        Counting.told.append(request.request_id)


class DownAtFirst(Adapter):
    """Its service fails the first outcome (Slack's chat.update answering 503), then recovers."""

    told: ClassVar[list[str]] = []
    failures = 1

    async def on_outcome(self, request: InputRequest) -> None:
        if DownAtFirst.failures:
            DownAtFirst.failures -= 1
            raise ConnectionError("503 from the service")
        DownAtFirst.told.append(request.request_id)


async def _until(check: Any) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_an_outcome_told_again_reaches_only_the_adapters_not_told_yet(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found from outside (review 7, W7): while one adapter could not deliver an outcome, every
    replica told it again every ten minutes to every adapter, and the webhook receiver that had it
    the first time got it again each time."""
    adapters = {"hook": Counting, "slack": DownAtFirst}
    async with hosting(tmp_path, clock, monkeypatch, adapters) as (mesh, _):
        session_id = (await mesh.sessions.init(CALLER)).session_id
        request = await ask_to_delete(mesh, session_id, "m1")
        await mesh.inputs.cancel_for_message("acme", session_id, "m1", "not needed")
        await _until(lambda: Counting.told == [request.request_id] and not DownAtFirst.failures)
        await asyncio.sleep(0.05)
        assert [r.request_id for r in await mesh.store.untold_outcomes()] == [request.request_id]
        for _ in range(2):  # told again, twice (a later look, another replica taking over)
            await mesh.inputs.tell_untold("acme", session_id)
            await _until(lambda: DownAtFirst.told == [request.request_id])
            await asyncio.sleep(0.05)
        assert Counting.told == [request.request_id]  # once, not at every telling again
        assert DownAtFirst.told == [request.request_id]
        assert await mesh.store.untold_outcomes() == []  # every adapter told: marked told


async def test_an_outcome_every_adapter_was_told_keeps_nothing_per_adapter(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code review (K1): keeping which adapters were told cost every outcome a read and a write per
    adapter, and a row each for the session's life; it is needed only when one was not told."""
    async with hosting(tmp_path, clock, monkeypatch, {"good": Good}) as (mesh, _):
        session_id = (await mesh.sessions.init(CALLER)).session_id
        request = await ask_to_delete(mesh, session_id, "m1")
        await mesh.inputs.cancel_for_message("acme", session_id, "m1", "not needed")
        await _until(lambda: request.request_id in told)
        for _ in range(100):
            if not await mesh.store.untold_outcomes():
                break
            await asyncio.sleep(0.01)
        assert await mesh.store.untold_outcomes() == []  # marked told
        key = f"{adapter_host.RESERVED_PREFIX}outcome-told/acme/{request.request_id}"
        assert await mesh.store.get_adapter_value("good", key) is None


class BrokenWithRoutes(Broken):
    async def _receive(self, request: Any) -> Any:
        raise AssertionError("a stopped adapter was reached")

    def routes(self) -> list[Any]:
        return [Route("/webhooks/receive/broken", self._receive, methods=["POST"])]


async def test_the_routes_of_an_adapter_that_did_not_start_answer_503(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code review (K7): an adapter disabled at start was stopped, but its routes (mounted before)
    still reached it: a click or a signed answer then met closed clients (500)."""
    http = HttpServer("127.0.0.1:0", ready=lambda: True)
    adapters = {"broken": BrokenWithRoutes}
    async with hosting(tmp_path, clock, monkeypatch, adapters, http=http, start=False) as (_, host):
        http.mount(host.routes())
        await http.start()
        try:
            await host.start()
            assert host.adapters == {}
            async with httpx.AsyncClient(base_url=http.url) as client:
                answer = await client.post("/webhooks/receive/broken", json={})
            assert answer.status_code == 503
            assert answer.json()["error"]["reason"] == "ADAPTER_DISABLED"
        finally:
            await http.stop(0)
