"""Session ownership: which process runs a session's work (its internal agents, its messages).

With one process (the memory and SQLite stores) that process owns every session, and
``SoleOwner`` says so without any work. Replicas sharing a PostgreSQL store each hold a
lease per session they run (``svantic_grpc.stores._pg_leases``): a row with an expiry
and a fencing number that every write of the owner carries, so a replica that lost its
lease cannot write (Temporal's ``range_id``). A message sent to a replica that does not
own its session is handed to the owner through the store; a lease that expires (its
replica died) is taken over by whichever replica claims it first, which then recovers
the session as a restart does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Set
from dataclasses import dataclass

from svantic_grpc.core.errors import Unavailable

__all__ = ["HandOff", "LeaseLost", "Ownership", "SessionKey", "SoleOwner", "Takeover"]

SessionKey = tuple[str, str]
"""(tenant id, session id)."""


class LeaseLost(Unavailable):
    """This replica no longer owns the session: its write was refused (another replica took over)."""

    default_reason = "SESSION_LEASE_LOST"


@dataclass(frozen=True)
class HandOff:
    """A message accepted by another replica for a session this one owns: run it here."""

    tenant_id: str
    session_id: str
    message_id: str


Takeover = Callable[[Set[SessionKey], Set[tuple[str, str, str]]], Awaitable[None]]
"""Recovers sessions whose lease this replica just took from another (or from its own former
life): given their keys and the hand-offs found waiting in them, (tenant, session, message id)."""


class Ownership(ABC):
    """Which sessions this process runs."""

    sole: bool = False
    """True when this process owns every session (no other process shares the store)."""

    replica_id: str = ""

    @abstractmethod
    async def start(
        self,
        *,
        takeover: Takeover,
        run: Callable[[HandOff], Awaitable[None]],
        abandon: Callable[[str, str], Awaitable[None]],
        closed: Callable[[str, str], Awaitable[None]],
    ) -> None:
        """Begin renewing leases, taking over expired ones (``takeover`` recovers them), running
        messages handed to this replica (``run``), dropping the work of sessions whose lease
        another replica took (``abandon``) and ending the work of sessions another replica
        closed (``closed``)."""

    @abstractmethod
    async def halt(self) -> None:
        """Stop taking new work (take-overs, hand-offs) while the running work ends; leases are
        kept until ``stop``. Safe to call twice; ``stop`` halts too."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop background work and let go of every lease at once; safe to call twice."""

    @abstractmethod
    async def claim(self, keys: Collection[SessionKey]) -> tuple[set[SessionKey], set[tuple[str, str, str]]]:
        """At start-up: take the leases of ``keys`` that are free or expired. Returns the keys
        now owned here and the hand-offs waiting in them (to run rather than fail)."""

    @abstractmethod
    async def runs_here(self, tenant_id: str, session_id: str) -> bool:
        """Whether this replica runs the session's work now: it holds the lease, or took it
        (free, or expired: the session is then recovered first). ``False``: another replica
        holds a live lease, and messages go to it (``Change.hand_off``)."""

    @abstractmethod
    def lost(self, tenant_id: str, session_id: str) -> None:
        """A write here was refused (``LeaseLost``): stop believing this replica owns the session."""

    @abstractmethod
    async def owner_of(self, tenant_id: str, session_id: str) -> str | None:
        """The replica holding a live lease of the session, if any (``None``: free or expired)."""


class SoleOwner(Ownership):
    """One process owns every session: nothing to lease, nothing to hand off."""

    sole = True

    def __init__(self, replica_id: str = "") -> None:
        self.replica_id = replica_id

    async def start(
        self,
        *,
        takeover: Takeover,
        run: Callable[[HandOff], Awaitable[None]],
        abandon: Callable[[str, str], Awaitable[None]],
        closed: Callable[[str, str], Awaitable[None]],
    ) -> None:
        return None

    async def halt(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def claim(self, keys: Collection[SessionKey]) -> tuple[set[SessionKey], set[tuple[str, str, str]]]:
        return set(keys), set()

    async def runs_here(self, tenant_id: str, session_id: str) -> bool:
        return True

    def lost(self, tenant_id: str, session_id: str) -> None:
        return None

    async def owner_of(self, tenant_id: str, session_id: str) -> str | None:
        return self.replica_id
