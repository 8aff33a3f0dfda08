"""A stop never outlives its bound, nor a second signal (found from outside: with the store not
answering, a write under way ran to its end for ever and the server ignored every SIGTERM after the
first; only kill -9 ended it).

A real server on PostgreSQL; another connection locks the sessions table, so an InitSession's write
waits; the server gets SIGTERM. It exits within the grace plus ``shutdown_timeout_s`` (or at once
on a second SIGTERM), saying so, and the next start on the same database has every session the
first one acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from grpc import aio

from svantic_grpc.pb import session_service_pb2
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub
from tests import _postgres
from tests.durability.test_restart import _client, _free_port, _server, _until_serving


def _settings(tmp_path: Path, store: dict[str, Any]) -> tuple[Path, str]:
    target = f"127.0.0.1:{_free_port()}"
    path = tmp_path / "settings.json"
    path.write_text(
        json.dumps(
            {
                "grpc_address": target,
                "http_address": f"127.0.0.1:{_free_port()}",
                "shutdown_grace_s": 0.5,
                "shutdown_timeout_s": 2,
                **store,
            }
        )
    )
    return path, target


async def _exit_code(process: Any, within: float) -> int | None:
    try:
        return int(await asyncio.wait_for(asyncio.to_thread(process.wait), within))
    except TimeoutError:
        return None


@pytest.mark.parametrize("second_signal", [False, True], ids=["bound", "second-signal"])
@pytest.mark.timeout(90)
async def test_a_stop_held_by_a_silent_store_ends_within_its_bound(
    tmp_path: Path, second_signal: bool
) -> None:
    async with _postgres.store_settings() as store:
        settings, target = _settings(tmp_path, store)
        log = tmp_path / "server.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        schema = store["postgres"]["schema_name"]
        with _server(settings, env, log) as first:
            await _until_serving(target, first, log)
            async with _client(target) as (channel, md):
                sessions = SessionServiceStub(channel)
                kept = await sessions.InitSession(session_service_pb2.InitSessionRequest(), metadata=md)
                holder = await asyncpg.connect(_postgres.POSTGRES_DSN)
                locked = holder.transaction()
                await locked.start()
                try:
                    await holder.execute(f'LOCK TABLE "{schema}".sessions IN ACCESS EXCLUSIVE MODE')
                    request = session_service_pb2.InitSessionRequest()
                    waiting = asyncio.ensure_future(sessions.InitSession(request, metadata=md, timeout=60))
                    await asyncio.sleep(0.5)  # its write is waiting on the lock
                    assert not waiting.done()
                    first.send_signal(signal.SIGTERM)
                    if second_signal:
                        await asyncio.sleep(0.8)  # past the grace: the stop waits on the write
                        assert first.poll() is None
                        first.send_signal(signal.SIGTERM)
                        code = await _exit_code(first, within=1.0)
                    else:
                        # grace 0.5 s twice + shutdown_timeout_s 2 s; before the fix it never ended
                        code = await _exit_code(first, within=6.0)
                    with pytest.raises(aio.AioRpcError):
                        await waiting  # never acknowledged: the client knows it may not have happened
                finally:
                    await locked.rollback()
                    await holder.close()
            assert code == 1, log.read_text()
            said = log.read_text()
            assert "the stop did not finish" in said
            assert ("a second signal" if second_signal else "still stopping after 3s") in said
        with _server(settings, env, tmp_path / "second.log") as second:
            await _until_serving(target, second, tmp_path / "second.log")
            async with _client(target) as (channel, md):
                again = await SessionServiceStub(channel).GetSession(
                    session_service_pb2.GetSessionRequest(session_id=kept.session.session_id), metadata=md
                )
                assert again.session.session_id == kept.session.session_id
            second.send_signal(signal.SIGTERM)
            assert await _exit_code(second, within=10.0) == 0


@pytest.mark.timeout(60)
async def test_a_signal_during_a_start_that_waits_on_the_store_is_heard(tmp_path: Path) -> None:
    """Found from outside (review 7): a start that waited on a service (Slack's socket, a database
    that accepts and never answers) ignored SIGTERM until that gave up, if it ever did."""
    accepted: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # held open, never a byte back

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    settings, _ = _settings(tmp_path, {"store": f"postgresql://postgres@127.0.0.1:{port}/test"})
    log = tmp_path / "server.log"
    try:
        with _server(settings, {**os.environ, "PYTHONUNBUFFERED": "1"}, log) as server:
            for _ in range(300):  # up to 15 s for the interpreter to start and dial the store
                if accepted:
                    break
                await asyncio.sleep(0.05)
            assert accepted, log.read_text()
            server.send_signal(signal.SIGTERM)
            # Before: it waited for the store's connect timeout (10 s), then failed with status 2.
            assert await _exit_code(server, within=3.0) == 0, log.read_text()
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()
