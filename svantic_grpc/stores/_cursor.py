"""Opaque page cursors shared by the stores."""

from __future__ import annotations

import base64
import binascii
import json
import math

from svantic_grpc.core.errors import InvalidArgument

__all__ = ["decode_cursor", "encode_cursor"]


def encode_cursor(created_at: float, key: str) -> str:
    """A cursor pointing just past the record (``created_at``, ``key``)."""
    raw = json.dumps([created_at, key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, *, field: str = "page_token") -> tuple[float, str]:
    """Parse a cursor made by ``encode_cursor``; a foreign one is ``InvalidArgument``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, key = json.loads(raw)
        # What ``encode_cursor`` writes: a finite number and a string of Unicode text (a lone
        # surrogate escape would fail the query's encoding), nothing else.
        if type(created_at) not in (int, float) or not math.isfinite(created_at):
            raise TypeError("not a time")
        if not isinstance(key, str):
            raise TypeError("not a key")
        key.encode()
        return float(created_at), key
    except (binascii.Error, ValueError, TypeError) as exc:  # UnicodeError is a ValueError
        raise InvalidArgument(field, "is not a page token this server issued") from exc
