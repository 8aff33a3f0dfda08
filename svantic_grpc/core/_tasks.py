"""Work that must run to its end once begun, whoever awaits it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["to_the_end"]

T = TypeVar("T")


async def to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` in a task of its own and return what it returns.

    A caller cancelled meanwhile (a client that went away, a deadline, a stream closed) does not
    cancel it: a store write that lands is followed by what must follow it (the waiter woken, the
    adapters told), never left half done. The cancelled caller waits for it to end before the
    cancellation goes on, so the locks it holds are let go only then.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # its error, if any, is the cancelled caller's no more
        raise
