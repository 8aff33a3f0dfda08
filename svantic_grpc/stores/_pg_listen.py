"""Ending what a PostgreSQL listener runs: its background tasks and its LISTEN connection.

The event bell, the hand-offs and the relay each keep a connection of their own for
``LISTEN`` and a task that reads what the bell rang for; all three end the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Collection

import asyncpg

__all__ = ["cancel_tasks", "replica_channel", "stop_listening"]


def replica_channel(prefix: str, replica_id: str) -> str:
    """The channel that rings one replica (hand-offs, relay): ``prefix`` and a hash of its id, so a
    bell wakes only the replica it is for, not every replica listening (a hash that two replicas
    share only costs the other a wake-up: the payload still names the replica)."""
    return f"{prefix}_{zlib.crc32(replica_id.encode()):08x}"


async def cancel_tasks(tasks: Collection[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until each has ended."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def stop_listening(tasks: Collection[asyncio.Task[None]], conn: asyncpg.Connection | None) -> None:
    """End ``tasks``, then close the listening connection ``conn`` if it is still open (an error
    closing it is of no interest: its server side ends with it)."""
    await cancel_tasks(tasks)
    if conn is not None and not conn.is_closed():
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await conn.close()
