"""The seam between replicas for connected agents: what one replica sends another about a dispatch
(and a message's cancel, for the replica that runs it).

With several replicas on one store, an agent's ``Connect`` stream is held by one replica (the
*holder*) while the session's dispatch is decided on its owner. The owner sends the holder the
job, then the human's answers and a cancel; the holder sends the owner the agent's updates and,
if it fails, how. ``ConnectedAgents`` does both sides; a ``Relay`` only carries the items (the
PostgreSQL one as rows claimed with ``SKIP LOCKED`` and a ``NOTIFY``: ``stores._pg_relay``).
``CancelMessage`` on a replica that does not own the session travels the same way to the owner,
whose running work is what a cancel must stop (``Messages.cancel``).
A single process (the memory and SQLite stores) has no relay.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from svantic_grpc.core.dispatch._seam import DispatchJob, DispatchUpdate
from svantic_grpc.core.inputs.model import InputRequest

__all__ = ["Relay", "RelayKind", "Relayed"]


class RelayKind(enum.Enum):
    # owner -> holder
    JOB = "job"
    ANSWER = "answer"
    CANCEL = "cancel"
    # holder -> owner
    UPDATE = "update"
    NOT_DELIVERED = "not-delivered"
    FAILED = "failed"
    LOST = "lost"
    """The stream dropped while the owner waits for a human (not reading the dispatch)."""
    # any replica -> a session's owner
    CANCEL_MESSAGE = "cancel-message"
    """``CancelMessage`` reached a replica that does not own the session: the owner cancels the
    message's running work (``tenant_id``, ``session_id``, ``message_id``; ``reason``)."""
    END_FOR_CLOSE = "end-for-close"
    """As ``CANCEL_MESSAGE``, for a ``CloseSession`` on another replica (the close that follows is
    that replica's write)."""


@dataclass(frozen=True)
class Relayed:
    """One item about one dispatch, from one replica to another."""

    kind: RelayKind
    dispatch_id: str
    sender: str
    """The replica that sent it (the holder answers its owner there)."""
    job: DispatchJob | None = None
    token: str = ""
    """With ``JOB``: the dispatch token the owner signed (the holder has no signing key to use)."""
    update: DispatchUpdate | None = None
    answer: InputRequest | None = None
    reason: str = ""
    tenant_id: str = ""
    """With ``CANCEL_MESSAGE``: the message's tenant, session and id (``dispatch_id`` is empty)."""
    session_id: str = ""
    message_id: str = ""


class Relay(ABC):
    """Carries ``Relayed`` items between the replicas sharing a store."""

    replica_id: str

    @abstractmethod
    async def start(self, receive: Callable[[Relayed], None]) -> None:
        """Begin taking the items sent to this replica; ``receive`` is called with each, in order."""

    @abstractmethod
    async def send(self, to_replica: str, item: Relayed) -> None:
        """Send ``item`` to ``to_replica`` (durably: it waits for that replica to take it)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop taking items; safe to call twice."""
