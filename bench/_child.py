"""What the benchmarks' child processes share: a line protocol to the parent and sure stops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading

__all__ = ["say", "until_stdin_closes", "watchdog"]


def say(line: str) -> None:
    """One protocol line to the parent."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def watchdog(max_seconds: float) -> None:
    """Hard stop for a child, whatever the parent does."""
    timer = threading.Timer(max_seconds, lambda: os._exit(3))
    timer.daemon = True
    timer.start()


async def until_stdin_closes() -> None:
    """Return when the parent closes our stdin (or dies)."""
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    def read() -> None:
        with contextlib.suppress(Exception):
            sys.stdin.read()
        loop.call_soon_threadsafe(closed.set)

    threading.Thread(target=read, daemon=True).start()
    await closed.wait()
