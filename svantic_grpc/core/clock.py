"""Injectable time and ids, so TTLs, expiry and tokens are testable without sleeping."""

from __future__ import annotations

import os
import time
from typing import Protocol

__all__ = ["Clock", "IdGenerator", "ManualClock", "SystemClock", "UuidGenerator"]


class Clock(Protocol):
    """Wall-clock time in seconds since the epoch."""

    def now(self) -> float: ...


class SystemClock:
    """The real clock."""

    now = staticmethod(time.time)
    """``time.time`` itself: a session's open and close read the clock six times, each through a
    Python method that only called it."""


class ManualClock:
    """A clock that moves only when told to; for tests and simulations."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._now += seconds


class IdGenerator(Protocol):
    """Makes unique ids; ``prefix`` hints what the id is for."""

    def new_id(self, prefix: str = "") -> str: ...


class UuidGenerator:
    """Random 128-bit ids, hex-encoded, optionally prefixed."""

    def new_id(self, prefix: str = "") -> str:
        # 128 random bits, as uuid4 gives (bar its six fixed bits), at a quarter of its cost.
        return f"{prefix}{os.urandom(16).hex()}"
