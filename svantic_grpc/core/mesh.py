"""The core wired together: one object the transports hand requests to."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from svantic_grpc.core.auth import Credential, TokenIssuer, TokenSettings
from svantic_grpc.core.clock import Clock, IdGenerator, SystemClock, UuidGenerator
from svantic_grpc.core.events import EventBus
from svantic_grpc.core.registry import Registry
from svantic_grpc.core.sessions import Sessions
from svantic_grpc.stores.base import Store

__all__ = ["Mesh", "MeshOptions"]


@dataclass(frozen=True)
class MeshOptions:
    """Tunables of the core, taken from settings."""

    session_ttl_s: float = 1800.0
    """Idle time after which a session closes; 0 disables."""
    heartbeat_timeout_s: float = 90.0
    """Silence after which an instance is unhealthy."""
    subscriber_buffer: int = 1024
    """Events a live subscriber may fall behind before it is cut off."""


class Mesh:
    """Store, event bus, registry, sessions and tokens of one server process."""

    def __init__(
        self,
        *,
        store: Store,
        tokens: TokenSettings,
        credentials: Iterable[Credential],
        options: MeshOptions = MeshOptions(),
        clock: Clock | None = None,
        ids: IdGenerator | None = None,
    ) -> None:
        self.clock = clock or SystemClock()
        self.ids = ids or UuidGenerator()
        self.store = store
        self.tokens = TokenIssuer(settings=tokens, credentials=credentials, clock=self.clock, ids=self.ids)
        self.bus = EventBus(store=store, clock=self.clock, subscriber_buffer=options.subscriber_buffer)
        self.registry = Registry(
            store=store, clock=self.clock, heartbeat_timeout_s=options.heartbeat_timeout_s
        )
        self.sessions = Sessions(
            store=store,
            bus=self.bus,
            registry=self.registry,
            clock=self.clock,
            ids=self.ids,
            ttl_s=options.session_ttl_s,
        )
        self._started = False

    async def start(self) -> None:
        """Recover timers from the store and start background work."""
        if self._started:
            return
        self._started = True
        await self.sessions.recover()
        self.sessions.reaper.start()

    async def stop(self) -> None:
        """Stop background work and close the store; safe to call twice."""
        await self.sessions.reaper.stop()
        if self._started:
            self._started = False
            await self.store.close()
