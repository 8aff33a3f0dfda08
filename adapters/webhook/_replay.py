"""Replay protection for signed calls: each ``webhook-id`` is processed once inside the timestamp window.

An id is remembered before its answer is awaited (so a concurrent replay is a
duplicate) and forgotten again when the answer is refused (it changed nothing, so
its resend is no duplicate). Ids older than the window are let go: a replay of
one is refused as stale by the signature check anyway.
"""

from __future__ import annotations

__all__ = ["SeenIds"]


class SeenIds:
    """Processed ``webhook-id`` values of the last ``tolerance_s`` seconds, oldest first."""

    def __init__(self, tolerance_s: int) -> None:
        self._tolerance_s = tolerance_s
        self._seen: dict[str, int] = {}  # webhook-id -> its timestamp, in arrival order

    def __contains__(self, webhook_id: str) -> bool:
        return webhook_id in self._seen

    def remember(self, webhook_id: str, timestamp: int, *, now: float) -> None:
        horizon = now - self._tolerance_s
        while self._seen:
            oldest = next(iter(self._seen))
            if self._seen[oldest] >= horizon:
                break
            del self._seen[oldest]
        self._seen[webhook_id] = timestamp

    def forget(self, webhook_id: str) -> None:
        self._seen.pop(webhook_id, None)
