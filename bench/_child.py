"""What the benchmarks' child processes share: a line protocol to the parent and sure stops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["Child", "revision", "say", "start_role", "until_stdin_closes", "watchdog"]

ROOT = Path(__file__).resolve().parents[1]


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


@dataclass
class Child:
    """A benchmark child process seen from the parent: its protocol lines and its stop."""

    name: str
    process: asyncio.subprocess.Process

    async def line(self, wait_s: float) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), wait_s)
        if not raw:
            raise RuntimeError(f"{self.name} exited (code {await self.process.wait()}) before answering")
        return raw.decode().strip()

    async def expect(self, prefix: str, wait_s: float) -> str:
        while True:
            text = await self.line(wait_s)
            if text.startswith(prefix):
                return text[len(prefix) :].strip()

    async def stop(self) -> None:
        """Close its stdin (its signal to stop), then wait; kill it only if it hangs."""
        if self.process.returncode is not None:
            return
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()  # this child only, by its own handle
            await self.process.wait()


async def start_role(
    script: Path,
    role: str,
    max_seconds: float,
    *extra: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> asyncio.subprocess.Process:
    """Start ``script --role ROLE --max-seconds N`` (a benchmark's own child) with pipes to talk
    over, in ``cwd`` (this checkout unless given)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--role",
        role,
        "--max-seconds",
        str(max_seconds),
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=cwd or ROOT,
        env=env,
    )


def revision(*paths: str) -> str:
    """The commit measured, and whether the code under ``paths`` differs from it."""

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", *paths)
    return commit + (" + uncommitted changes" if dirty else "")


LOOP_ENV = "SVANTIC_BENCH_LOOP"
"""The event loop a benchmark's processes run on: ``uvloop`` (what ``serve`` runs on by default,
the ``event_loop`` setting) or ``asyncio``; children inherit it from their parent's environment."""


def run_on_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``LOOP_ENV`` names (default uvloop, as ``serve``)."""
    if os.environ.get(LOOP_ENV, "uvloop") == "asyncio":
        return asyncio.run(main)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def callgrind_counts(dump: Path) -> tuple[int, Counter[str]]:
    """A callgrind dump's instructions, in all and by the binary they ran in (the interpreter,
    grpc's ``cygrpc`` with its C core, protobuf's ...): each cost line counted as its own
    binary's, not the callee's line after ``calls=``."""
    text = dump.read_text(errors="replace")
    total = re.search(r"^summary: (\d+)", text, re.MULTILINE)
    assert total is not None, f"no summary in {dump}"
    names: dict[str, str] = {}
    own: Counter[str] = Counter()
    current, inclusive = "", False  # the cost line after ``calls=`` is the callee's: not own
    for line in text.splitlines():
        if line.startswith(("ob=", "cob=")):
            found = re.match(r"c?ob=\((\d+)\)(?: (.*))?", line)
            if found is not None:
                if found[2]:
                    names[found[1]] = Path(found[2]).name
                if line.startswith("ob="):
                    current = found[1]
        elif line.startswith("calls="):
            inclusive = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if inclusive:
                inclusive = False
            elif len(fields := line.split()) > 1:
                own[current] += int(fields[1])
    return int(total[1]), Counter({names.get(key, key): value for key, value in own.items()})
