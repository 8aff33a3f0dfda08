"""Work that must run to its end once begun, whoever awaits it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["to_the_end"]

T = TypeVar("T")

_log = logging.getLogger(__name__)


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
        while not task.done():  # cancelled again meanwhile: still until it ends
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task})
        if not task.cancelled() and (error := task.exception()) is not None:
            # Nobody is left to be told: it is said here, not lost.
            _log.warning("work whose caller went away failed: %r", error, exc_info=error)
        raise
