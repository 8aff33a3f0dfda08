"""Request bodies that do not decode: a plain INVALID_ARGUMENT, and at most a short log line.

grpc.aio runs a method's request deserializer before any handler code, so a body
that protobuf cannot parse would otherwise end as UNKNOWN (INTERNAL on streams)
naming protobuf's exception class, with a traceback logged, before the caller is
even authenticated. The interceptor installs ``tolerant`` in place of each
method's deserializer: a bad body becomes an ``Undecodable`` marker that the
wrapped handler turns into ``InvalidArgument`` (``refuse``), logged through one
rate-limited line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from svantic_grpc.core.errors import InvalidArgument

__all__ = ["Undecodable", "UndecodableLog", "checked", "refuse", "tolerant"]

_log = logging.getLogger(__name__)

_LOG_INTERVAL_S = 60.0
"""At most one line per this many seconds, however many bad bodies arrive."""


class Undecodable:
    """Stands in for a request body that did not decode."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer``, returning ``Undecodable`` instead of raising on a body it cannot parse."""
    if deserializer is None:
        return None
    message_type = getattr(deserializer, "__self__", None)  # Message.FromString is a bound classmethod
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    type_name = str(getattr(descriptor, "full_name", "") or "request message")

    def deserialize(body: bytes) -> Any:
        try:
            return deserializer(body)
        except Exception:  # protobuf's DecodeError, or anything a parser may raise on hostile bytes
            return Undecodable(type_name)

    return deserialize


def refuse(request: Undecodable, method: str, log: UndecodableLog) -> InvalidArgument:
    """The error for an undecodable body (noted in ``log``)."""
    log.note(method, request.type_name)
    return InvalidArgument(
        "request", f"the request body is not a valid {request.type_name}", reason="UNDECODABLE_REQUEST"
    )


async def checked(requests: AsyncIterator[Any], method: str, log: UndecodableLog) -> AsyncIterator[Any]:
    """A request stream that raises ``InvalidArgument`` at the first body that did not decode."""
    async for request in requests:
        if isinstance(request, Undecodable):
            raise refuse(request, method, log)
        yield request


class UndecodableLog:
    """One short warning per interval, however many bad bodies arrive; the next says how many were not logged.

    Bad bodies come before authentication, so anyone can send them: the log must not grow with them.
    """

    def __init__(self, interval_s: float = _LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._last = float("-inf")
        self._skipped = 0

    def note(self, method: str, type_name: str) -> None:
        now = time.monotonic()
        if now - self._last < self._interval_s:
            self._skipped += 1
            return
        skipped, self._skipped, self._last = self._skipped, 0, now
        more = f" ({skipped} more since the last line)" if skipped else ""
        _log.warning("refused a request body that does not decode as %s on %s%s", type_name, method, more)
