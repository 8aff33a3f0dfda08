"""A session's six internal agents are derived, not stored, yet every store lists them as before:
with ``joined_at`` when the session was created and ``left_at`` when it closed, after a restart
too, and without doubles for records written when they were still stored."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from svantic_grpc.core.models import INTERNAL_ROLES, JoinReason, Session, SessionAgent, SessionStatus
from svantic_grpc.pb import agent_types_pb2, session_service_pb2
from svantic_grpc.pb.session_types_pb2 import Session as PbSession
from svantic_grpc.pb.session_types_pb2 import SessionAgent as PbAgent
from svantic_grpc.stores.sqlite import SqliteStore
from tests import _postgres
from tests._support import Client, running_server

INTERNAL = [f"savant:{role}" for role in INTERNAL_ROLES]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    if request.param == "memory":
        yield {"store": "memory"}
    elif request.param == "sqlite":
        yield {"store": f"sqlite:///{tmp_path / 'mesh.db'}"}
    else:
        async with _postgres.store_settings() as settings:
            yield settings


@asynccontextmanager
async def serving(settings: dict[str, Any]) -> AsyncIterator[Client]:
    async with running_server(**settings) as client:
        yield client


async def listed(client: Client, session_id: str, *, include_departed: bool = False) -> list[PbAgent]:
    response = await client.sessions.ListSessionAgents(
        session_service_pb2.ListSessionAgentsRequest(
            session_id=session_id, include_departed=include_departed
        ),
        metadata=await client.md(),
    )
    return list(response.agents)


async def got(client: Client, session_id: str) -> PbSession:
    response = await client.sessions.GetSession(
        session_service_pb2.GetSessionRequest(session_id=session_id, include_agents=True),
        metadata=await client.md(),
    )
    return response.session


def assert_internal_agents(session: PbSession, agents: list[PbAgent], *, closed: bool) -> None:
    internal = agents[:6]
    assert [a.agent_type for a in internal] == INTERNAL
    assert [a.instance_id for a in internal] == [f"{role}-{session.session_id}" for role in INTERNAL_ROLES]
    assert all(a.internal and a.join_reason == agent_types_pb2.JOIN_REASON_AUTO for a in internal)
    assert all(a.joined_at == session.created_at for a in internal)
    if closed:
        assert all(a.left_at == session.closed_at for a in internal)
    else:
        assert not any(a.HasField("left_at") for a in internal)


async def test_internal_agents_are_listed_with_joined_at_on_every_store(
    store_settings: dict[str, Any],
) -> None:
    async with serving(store_settings) as client:
        md = await client.md()
        created = await client.sessions.InitSession(
            session_service_pb2.InitSessionRequest(
                self_agent_type="a2ui-terminal", self_instance_id="term-1"
            ),
            metadata=md,
        )
        session = created.session
        assert_internal_agents(session, list(session.agents), closed=False)
        assert [(a.agent_type, a.join_reason) for a in session.agents[6:]] == [
            ("a2ui-terminal", agent_types_pb2.JOIN_REASON_SELF)
        ]
        assert_internal_agents(session, await listed(client, session.session_id), closed=False)
        assert_internal_agents(session, list((await got(client, session.session_id)).agents), closed=False)

        closing = await client.sessions.InitSession(session_service_pb2.InitSessionRequest(), metadata=md)
        await client.sessions.CloseSession(
            session_service_pb2.CloseSessionRequest(session_id=closing.session.session_id), metadata=md
        )
        closed = await got(client, closing.session.session_id)
        assert closed.closed_at.seconds > 0
        assert_internal_agents(closed, list(closed.agents), closed=True)
        assert await listed(client, closed.session_id) == []  # all gone once it closed
        departed = await listed(client, closed.session_id, include_departed=True)
        assert_internal_agents(closed, departed, closed=True)
        assert len(departed) == 6

    if store_settings["store"] == "memory":
        return
    async with serving(store_settings) as client:  # a restart on the same file or schema
        assert_internal_agents(session, await listed(client, session.session_id), closed=False)
        assert len(await listed(client, session.session_id)) == 7
        again = await got(client, closed.session_id)
        assert again.closed_at == closed.closed_at
        assert_internal_agents(again, list(again.agents), closed=True)


async def test_a_record_that_still_stores_its_internal_agents_lists_each_once(tmp_path: Path) -> None:
    # As the code before derived internal agents wrote them: all six in the record's agents.
    path = tmp_path / "mesh.db"
    t0 = time.time()  # recent: the idle TTL must not close it when the server starts
    stored = tuple(
        SessionAgent(f"savant:{role}", f"{role}-s1", JoinReason.AUTO, t0, internal=True)
        for role in INTERNAL_ROLES
    )
    async with await SqliteStore.open(path) as store:
        await store.create_session(
            Session("acme", "s1", SessionStatus.ACTIVE, t0, t0, t0, created_by="acme-full", agents=stored)
        )
    async with serving({"store": f"sqlite:///{path}"}) as client:
        session = await got(client, "s1")
        agents = await listed(client, "s1")
        assert len(agents) == 6
        assert_internal_agents(session, agents, closed=False)
