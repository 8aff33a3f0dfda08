"""Opaque page cursors shared by the stores."""

from __future__ import annotations

import base64
import binascii
import json

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
        return float(created_at), str(key)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidArgument(field, "is not a page token this server issued") from exc
