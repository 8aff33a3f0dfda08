"""Events serialized once for every stream that sends them (``WatchSession``, ``Converse``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from svantic_grpc.core.events import Event

__all__ = ["SerializedEvents"]


class SerializedEvents:
    """The serialized response of recent events, made once for all the streams that send them.

    Every watcher of a session reads the same ``Event`` objects from the bus, so a thousand
    watchers cost one conversion and one serialization per event, not a thousand (the
    interceptor sends bytes as they are), and a stream whose reader is slow holds references
    to the shared bytes, not copies of its own.
    """

    SIZE = 256

    def __init__(self, make: Callable[[Event], bytes]) -> None:
        self._make = make
        self._recent: OrderedDict[int, tuple[Event, bytes]] = OrderedDict()

    def response(self, event: Event) -> bytes:
        # Keyed by identity: the entry holds the event, so its id cannot be reused meanwhile.
        found = self._recent.get(id(event))
        if found is not None and found[0] is event:
            return found[1]
        response = self._make(event)
        self._recent[id(event)] = (event, response)
        if len(self._recent) > self.SIZE:
            self._recent.popitem(last=False)
        return response
