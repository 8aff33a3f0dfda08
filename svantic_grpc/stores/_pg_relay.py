"""Dispatches to connected agents whose stream another replica holds, relayed through PostgreSQL.

Each item (``core.dispatch._relay.Relayed``) is a row of ``relay`` naming the replica it is for,
written with a ``NOTIFY`` on that replica's channel, naming it, in the same statement (delivered
only if it commits; the other replicas do not hear it). The replica takes its rows with ``DELETE
... FOR UPDATE SKIP LOCKED`` in id order, on the bell and every ``poll_s`` in case a bell was
missed, so each item is handled once. At start a replica deletes the rows left for its former
life: the dispatches they belong to died with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg

from svantic_grpc.core.dispatch._relay import Relay, Relayed, RelayKind
from svantic_grpc.core.dispatch._seam import DispatchJob, DispatchUpdate
from svantic_grpc.core.messages.model import MessageState
from svantic_grpc.stores import _codec
from svantic_grpc.stores._pg_listen import replica_channel, stop_listening

if TYPE_CHECKING:
    from svantic_grpc.stores.postgres import PostgresStore

__all__ = ["PgRelay", "decode_item", "encode_item"]

_log = logging.getLogger(__name__)

_BATCH = 500

_SEND = """
    WITH sent AS (INSERT INTO relay (replica, item) VALUES ($1, $2))
    SELECT pg_notify($3, $1)
"""

_TAKE = """
    DELETE FROM relay WHERE id IN (
        SELECT id FROM relay WHERE replica = $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
    ) RETURNING id, item
"""


class PgRelay(Relay):
    """The relay of one replica on a ``PostgresStore``."""

    def __init__(self, store: PostgresStore, *, replica_id: str, poll_s: float) -> None:
        self._store = store
        self.replica_id = replica_id
        self._poll_s = poll_s
        self._prefix = store.relay_channel
        self._receive: Callable[[Relayed], None] | None = None
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, receive: Callable[[Relayed], None]) -> None:
        self._receive = receive
        await self._store.pool.execute("DELETE FROM relay WHERE replica = $1", self.replica_id)
        await self._listen()
        self._task = asyncio.create_task(self._take(), name="svantic-relay")

    async def send(self, to_replica: str, item: Relayed) -> None:
        channel = replica_channel(self._prefix, to_replica)
        await self._store.pool.execute(_SEND, to_replica, _codec.dumps(encode_item(item)), channel)

    async def stop(self) -> None:
        task, self._task = self._task, None
        listener, self._listener = self._listener, None
        await stop_listening([task] if task else [], listener)

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._store.dsn, timeout=10)
        await conn.add_listener(replica_channel(self._prefix, self.replica_id), self._rung)
        conn.add_termination_listener(self._dropped)
        self._listener = conn

    def _dropped(self, conn: object) -> None:
        """The listening connection closed: listen again at once (``_take``), then take what was missed."""
        self._wake.set()

    def _rung(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if payload == self.replica_id:
            self._wake.set()

    async def _take(self) -> None:
        """Take this replica's rows: on the bell, and every ``poll_s``."""
        assert self._receive is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):  # (not wait_for: it can drop a cancel on 3.11)
                    await self._wake.wait()
            self._wake.clear()
            try:
                if self._listener is None or self._listener.is_closed():
                    await self._listen()
                rows = await self._store.pool.fetch(_TAKE, self.replica_id, _BATCH)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                _log.warning("relay: cannot reach PostgreSQL (%s); trying again", exc)
                continue
            except Exception:  # never let the loop end silently
                _log.exception("relay: reading the queue failed; trying again")
                continue
            for row in sorted(rows, key=lambda r: int(r[0])):
                try:
                    self._receive(decode_item(_codec.loads(row[1])))
                except Exception:
                    _log.exception("relay: could not handle item %s", row[0])
            if len(rows) == _BATCH:
                self._wake.set()


# Encoding


def encode_item(item: Relayed) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": item.kind.value, "dispatch_id": item.dispatch_id, "sender": item.sender}
    if item.job is not None:
        out["job"] = _encode_job(item.job)
        out["token"] = item.token
    if item.update is not None:
        out["update"] = _encode_update(item.update)
    if item.answer is not None:
        out["answer"] = _codec.encode_input(item.answer)
    if item.reason:
        out["reason"] = item.reason
    if item.message_id:
        out["message"] = [item.tenant_id, item.session_id, item.message_id]
    return out


def decode_item(d: dict[str, Any]) -> Relayed:
    token = d.get("token", "")
    answer = d.get("answer")
    tenant_id, session_id, message_id = d.get("message", ("", "", ""))
    return Relayed(
        RelayKind(d["kind"]),
        d["dispatch_id"],
        d["sender"],
        job=_decode_job(d["job"]) if "job" in d else None,
        token=token,
        update=_decode_update(d["update"]) if "update" in d else None,
        answer=_codec.decode_input(answer) if answer is not None else None,
        reason=d.get("reason", ""),
        tenant_id=tenant_id,
        session_id=session_id,
        message_id=message_id,
    )


def _encode_job(job: DispatchJob) -> dict[str, Any]:
    return {
        "dispatch_id": job.dispatch_id,
        "tenant_id": job.tenant_id,
        "session_id": job.session_id,
        "agent": _codec.encode_agent(job.agent),
        "message": _codec.encode_message(job.message),
        "deadline": job.deadline,
        "resume_task_id": job.resume_task_id,
        "answer": _codec.encode_input(job.answer) if job.answer is not None else None,
        "trace_context": dict(job.trace_context),
    }


def _unsigned() -> str:
    return ""


def _decode_job(d: dict[str, Any]) -> DispatchJob:
    answer = d["answer"]
    return DispatchJob(
        d["dispatch_id"],
        d["tenant_id"],
        d["session_id"],
        _codec.decode_agent(d["agent"]),
        _codec.decode_message(d["message"]),
        _unsigned,  # the holder signs nothing: it sends the owner's token (``Relayed.token``)
        d["deadline"],
        resume_task_id=d["resume_task_id"],
        answer=_codec.decode_input(answer) if answer is not None else None,
        trace_context=d["trace_context"],
    )


def _encode_update(u: DispatchUpdate) -> dict[str, Any]:
    ask = u.ask
    return {
        "state": u.state.value if u.state is not None else None,
        "parts": [_codec.encode_part(p) for p in u.parts],
        "artifacts": [_codec.encode_artifact(a) for a in u.artifacts],
        "reason": u.reason,
        "ask": None if ask is None else _codec.encode_ask(ask),
        "task_ref": u.task_ref,
    }


def _decode_update(d: dict[str, Any]) -> DispatchUpdate:
    state, ask = d["state"], d["ask"]
    return DispatchUpdate(
        MessageState(state) if state is not None else None,
        tuple(_codec.decode_part(p) for p in d["parts"]),
        tuple(_codec.decode_artifact(a) for a in d["artifacts"]),
        d["reason"],
        None if ask is None else _codec.decode_ask(ask),
        d["task_ref"],
    )
