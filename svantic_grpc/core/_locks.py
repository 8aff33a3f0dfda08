"""Per-key asyncio locks that disappear when nobody holds or waits for them."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from types import TracebackType

__all__ = ["KeyedLock"]


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
        """Tasks holding the lock or waiting for it."""


class KeyedLock:
    """One ``asyncio.Lock`` per key, created on demand and dropped when idle.

    ``async with locks.hold(key): ...`` holds the key's lock for the block.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}
        self._spare: list[_Entry] = []
        """Idle entries kept for reuse: making an ``asyncio.Lock`` costs more than taking one."""

    def hold(self, key: Hashable) -> _Hold:
        # A class, not @asynccontextmanager: the lock is taken several times per message,
        # and the generator machinery cost more than the locking itself.
        return _Hold(self, key)

    def __len__(self) -> int:
        return len(self._entries)


_SPARE_ENTRIES = 64


class _Hold:
    __slots__ = ("_entry", "_key", "_locks")

    def __init__(self, locks: KeyedLock, key: Hashable) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        entries = self._locks._entries
        entry = entries.get(self._key)
        if entry is None:
            spare = self._locks._spare
            entry = entries[self._key] = spare.pop() if spare else _Entry()
        entry.users += 1
        self._entry = entry
        try:
            await entry.lock.acquire()
        except BaseException:  # cancelled while waiting: no longer a user
            self._leave()
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._entry.lock.release()
        self._leave()

    def _leave(self) -> None:
        entry = self._entry
        entry.users -= 1
        if entry.users == 0:  # nobody holds or waits: the lock is free, with no waiters
            del self._locks._entries[self._key]
            if len(self._locks._spare) < _SPARE_ENTRIES:
                self._locks._spare.append(entry)
