"""Opaque page cursors shared by the stores."""

from __future__ import annotations

import base64
import binascii
import json
import math

from svantic_grpc.core.errors import InvalidArgument

__all__ = ["decode_cursor", "encode_cursor"]

_MAX_CHARS = 4096
"""Far above any cursor ``encode_cursor`` writes (a time and a key of at most a few hundred
characters), far below what could trouble the parser."""


def encode_cursor(created_at: float, key: str) -> str:
    """A cursor pointing just past the record (``created_at``, ``key``)."""
    raw = json.dumps([created_at, key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, *, field: str = "page_token") -> tuple[float, str]:
    """Parse a cursor made by ``encode_cursor``; a foreign one is ``InvalidArgument``."""
    try:
        if len(cursor) > _MAX_CHARS:  # before parsing: JSON nested 100,000 deep exhausts the stack
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, key = json.loads(raw)
        # What ``encode_cursor`` writes: a finite number and a string of Unicode text (a lone
        # surrogate escape would fail the query's encoding; PostgreSQL's text holds no NUL),
        # nothing else. A time of 400 digits is an int too large for a float (OverflowError).
        if type(created_at) not in (int, float) or not math.isfinite(created_at):
            raise TypeError("not a time")
        if not isinstance(key, str) or "\x00" in key:
            raise TypeError("not a key")
        key.encode()
        return float(created_at), key
    except (binascii.Error, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise InvalidArgument(field, "is not a page token this server issued") from exc
