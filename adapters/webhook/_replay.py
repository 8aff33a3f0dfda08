"""Replay protection for signed calls: each ``webhook-id`` is processed once inside the timestamp window.

An id is remembered before its answer is awaited (so a concurrent replay is a
duplicate) and forgotten again when the answer is refused (it changed nothing, so
its resend is no duplicate). Ids older than the window are let go: a replay of
one is refused as stale by the signature check anyway.

Each id is kept with a digest of its body: the same id with the same body is the resend a
duplicate is for; the same id with another body is a sender's mistake (two messages under one
id), refused as a conflict rather than dropped as if it had been processed.
"""

from __future__ import annotations

import hashlib

__all__ = ["SeenIds", "body_digest"]


class SeenIds:
    """Processed ``webhook-id`` values of the last ``tolerance_s`` seconds, oldest first."""

    def __init__(self, tolerance_s: int) -> None:
        self._tolerance_s = tolerance_s
        # webhook-id -> its timestamp and its body's digest, in arrival order
        self._seen: dict[str, tuple[int, bytes]] = {}

    def body_of(self, webhook_id: str) -> bytes | None:
        """The digest of the body processed under ``webhook_id``; ``None`` for an id not seen."""
        seen = self._seen.get(webhook_id)
        return None if seen is None else seen[1]

    def remember(self, webhook_id: str, timestamp: int, body_digest: bytes, *, now: float) -> None:
        horizon = now - self._tolerance_s
        while self._seen:
            oldest = next(iter(self._seen))
            if self._seen[oldest][0] >= horizon:
                break
            del self._seen[oldest]
        self._seen[webhook_id] = (timestamp, body_digest)

    def forget(self, webhook_id: str) -> None:
        self._seen.pop(webhook_id, None)


def body_digest(text: str) -> bytes:
    """What ``SeenIds`` keeps of a body to tell a resend from another message under the same id."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()
