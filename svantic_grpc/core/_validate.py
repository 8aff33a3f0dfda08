"""Shared checks for ids and names that callers send."""

from __future__ import annotations

import re

from svantic_grpc.core.errors import InvalidArgument

__all__ = ["check_id"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")


def check_id(field: str, value: str, *, required: bool = True) -> str:
    """Return ``value`` if it is a usable id, else raise ``InvalidArgument`` naming ``field``.

    Ids are 1-128 characters: letters, digits and ``. _ : @ / -``, starting with
    a letter or digit.
    """
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return value
    if not _ID.match(value):
        raise InvalidArgument(
            field,
            f"{value[:40]!r} is not a valid id: use 1-128 letters, digits and . _ : @ / -, "
            "starting with a letter or digit",
        )
    return value
