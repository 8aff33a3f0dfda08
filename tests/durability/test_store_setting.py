"""The store is chosen in settings.json; a file the SQLite store cannot trust stops the server."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from svantic_grpc.config import SettingsError, parse_settings
from svantic_grpc.pb import session_service_pb2, session_types_pb2
from svantic_grpc.server import MeshServer
from tests._support import SIGNING_ENV, running_server


async def test_sessions_survive_a_restart_on_the_same_sqlite_file(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mesh.db'}"
    async with running_server(store=store) as client:
        md = await client.md()
        await client.sessions.InitSession(
            session_service_pb2.InitSessionRequest(session_id="s1"), metadata=md
        )
    async with running_server(store=store) as client:
        got = await client.sessions.GetSession(
            session_service_pb2.GetSessionRequest(session_id="s1", include_agents=True),
            metadata=await client.md(),
        )
        assert got.session.session_id == "s1"
        assert len(got.session.agents) == 6


@pytest.mark.parametrize(
    ("content", "says"),
    [
        pytest.param(os.urandom(4096), "not", id="random-bytes"),
        pytest.param(b"SQLite format 3\x00" + b"\x00" * 80, "", id="truncated"),
    ],
)
async def test_a_file_that_is_not_ours_stops_the_server_with_the_reason(
    tmp_path: Path, content: bytes, says: str
) -> None:
    path = tmp_path / "mesh.db"
    path.write_bytes(content)
    settings = parse_settings({"grpc_address": "127.0.0.1:0", "store": f"sqlite:///{path}"})
    server = MeshServer(settings, env=SIGNING_ENV)
    with pytest.raises(SettingsError) as excinfo:
        await server.start()
    assert str(path) in str(excinfo.value) and says in str(excinfo.value)
    assert path.read_bytes() == content  # never overwritten


async def test_another_programs_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as db:
        db.execute("create table orders (id integer primary key)")
    settings = parse_settings({"grpc_address": "127.0.0.1:0", "store": f"sqlite:///{path}"})
    with pytest.raises(SettingsError) as excinfo:
        await MeshServer(settings, env=SIGNING_ENV).start()
    assert "store:" in str(excinfo.value) and str(path) in str(excinfo.value)


def test_an_unknown_store_is_refused_at_start_up() -> None:
    with pytest.raises(SettingsError) as excinfo:  # refused while the settings are read
        parse_settings({"grpc_address": "127.0.0.1:0", "store": "mongodb://db/mesh"})
    assert "store: " in str(excinfo.value) and "unknown store 'mongodb://db/mesh'" in str(excinfo.value)


async def test_a_second_server_on_a_served_sqlite_file_is_refused_and_the_first_keeps_its_work(
    tmp_path: Path,
) -> None:
    # found from outside: a second `serve` on the file took the first one's running work for a
    # crash's leftovers, ended it, and the first one's clients got INTERNAL
    path = tmp_path / "mesh.db"
    store = f"sqlite:///{path}"
    async with running_server(store=store) as client:
        md = await client.md()
        await client.sessions.InitSession(
            session_service_pb2.InitSessionRequest(session_id="s1"), metadata=md
        )
        second = MeshServer(parse_settings({"grpc_address": "127.0.0.1:0", "store": store}), env=SIGNING_ENV)
        with pytest.raises(SettingsError) as excinfo:
            await second.start()
        assert str(path) in str(excinfo.value) and "another svantic-grpc process" in str(excinfo.value)
        got = await client.sessions.GetSession(
            session_service_pb2.GetSessionRequest(session_id="s1"), metadata=md
        )
        assert got.session.status == session_types_pb2.SESSION_STATUS_ACTIVE  # untouched
    async with running_server(store=store) as client:  # the first one stopped: the file is free
        got = await client.sessions.GetSession(
            session_service_pb2.GetSessionRequest(session_id="s1"), metadata=await client.md()
        )
        assert got.session.session_id == "s1"
