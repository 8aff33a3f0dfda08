"""What the SQLite and PostgreSQL committers share: telling each write of a batch its outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

__all__ = ["settle"]


def settle(
    batch: Sequence[tuple[Any, asyncio.Future[Any]]], outcomes: Sequence[tuple[Any, BaseException | None]]
) -> None:
    """Give each write's caller its value or its error, in order; a caller that was cancelled
    meanwhile is skipped (its write is committed all the same)."""
    for (_, future), (value, error) in zip(batch, outcomes, strict=True):
        if future.done():
            continue
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
