"""Work that must run to its end once begun, whoever awaits it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Coroutine
from contextvars import ContextVar, Token
from typing import Any, TypeVar

__all__ = ["after_stop", "close_after_stop", "deferring", "run_deferred", "to_the_end"]

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


_AFTER_STOP: ContextVar[list[Callable[[], object]] | None] = ContextVar("svantic_after_stop", default=None)
"""What the running message's run left for after it stops (``after_stop``); ``None`` outside one."""
_CLOSING: set[asyncio.Task[None]] = set()
"""Closes started by ``close_after_stop``, kept until they end."""


def after_stop(callback: Callable[[], object]) -> bool:
    """Call ``callback`` once the running message has stopped and whoever waits for it was told:
    bookkeeping the answer need not wait for (at one client a message's answer is pure latency).
    It runs in the event loop's next turn after the message's last write, behind the waiter that
    write woke: a ``SendMessage`` has sent its answer by then. ``False`` outside a message's run
    (nothing was kept): the caller does it at once."""
    pending = _AFTER_STOP.get()
    if pending is None:
        return False
    pending.append(callback)
    return True


def close_after_stop(stream: AsyncGenerator[Any, Any]) -> bool:
    """``after_stop`` for closing ``stream`` (a transport's dispatch, read to its final update);
    ``False`` when the caller must close it itself."""

    def close() -> None:
        task = asyncio.ensure_future(_closed(stream))
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)

    return after_stop(close)


async def _closed(stream: AsyncGenerator[Any, Any]) -> None:
    try:
        await stream.aclose()
    except Exception:  # the work it followed has ended: said here, not lost
        _log.warning("closing a finished dispatch's stream failed", exc_info=True)


def deferring() -> tuple[list[Callable[[], object]], Token[list[Callable[[], object]] | None]]:
    """At the start of a message's run (its last write included): where ``after_stop`` keeps what
    it is given, and the token ``run_deferred`` takes back at the run's end."""
    pending: list[Callable[[], object]] = []
    return pending, _AFTER_STOP.set(pending)


def run_deferred(
    pending: list[Callable[[], object]], token: Token[list[Callable[[], object]] | None]
) -> None:
    """At the end of the run ``deferring`` began, however it ends: what ``after_stop`` was given
    runs in the event loop's next turn."""
    _AFTER_STOP.reset(token)
    if pending:
        asyncio.get_running_loop().call_soon(_run_all, pending)


def _run_all(callbacks: list[Callable[[], object]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # one failing must not keep the others from running
            _log.exception("work left for after a message stopped failed")
