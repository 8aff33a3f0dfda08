"""A task whose first step runs at once, in its creator's turn of the event loop (Python 3.12's
eager tasks, on 3.11).

A message's run takes its first step (route, join, dispatch to the agent's stream) straight
after ``SendMessage`` accepted it. As a plain task that step waits for the event loop's next
turn, and the agent's stream writer for the turn after it: one turn of the loop more on every
message than the work needs. Started here, the step runs in the sender's turn and the stream
writer is woken for the next one.

The step runs as the task itself would run it: in the task's context, with the task as
``asyncio.current_task()`` (a timeout entered in it cancels the task, not its creator). What
it raises, or returns if it ends in one step, is the task's result, seen at the task's first
turn, as if the step had run there.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
from asyncio.tasks import _enter_task, _leave_task  # type: ignore[attr-defined]
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["start_eagerly"]

T = TypeVar("T")


class _Started(collections.abc.Coroutine[Any, Any, T]):
    """``coro`` for its task, its first step already taken: the task's first step only hands
    over what that step awaited (or its end), the following ones are ``coro``'s own."""

    __slots__ = ("_coro", "_first", "_taken")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._first: Any = None
        """What the first step yielded (the future it waits on), or the exception that ended it
        (a ``StopIteration`` when it returned)."""
        self._taken = False
        """The task has taken its first step (``_first`` is handed over)."""

    def step(self, context: contextvars.Context) -> None:
        try:
            self._first = context.run(self._coro.send, None)
        except BaseException as ended:  # the task raises it (or returns, StopIteration) at its first step
            self._first = ended

    def send(self, value: Any) -> Any:
        if self._taken:
            return self._coro.send(value)
        self._taken = True
        first, self._first = self._first, None
        if isinstance(first, BaseException):
            raise first
        return first

    def throw(self, *args: Any) -> Any:
        if not self._taken:  # cancelled before its first turn: as a task cancelled while it waits
            self._taken = True
            first, self._first = self._first, None
            if isinstance(first, BaseException):
                raise first  # it had ended already
            if isinstance(first, asyncio.Future):
                first.cancel()
        return self._coro.throw(*args)

    def close(self) -> None:
        self._first = None
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        raise TypeError("run by its task only")


def start_eagerly(
    coro: Coroutine[Any, Any, T],
    *,
    name: str,
    context: contextvars.Context,
    made: Callable[[asyncio.Task[T]], None],
) -> asyncio.Task[T]:
    """A task running ``coro`` in ``context``, its first step taken before this returns;
    ``made(task)`` is called before that step (the step may look for its own task)."""
    loop = asyncio.get_running_loop()
    started = _Started(coro)
    task: asyncio.Task[T] = loop.create_task(started, name=name, context=context)
    made(task)
    caller = asyncio.current_task(loop)
    if caller is not None:
        _leave_task(loop, caller)
    _enter_task(loop, task)
    try:
        started.step(context)
    finally:
        _leave_task(loop, task)
        if caller is not None:
            _enter_task(loop, caller)
    return task
