"""The core wired together: one object the transports hand requests to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from svantic_grpc.core.agents import MeshServices, MessageOptions, load_agent_classes
from svantic_grpc.core.auth import Credential, TokenIssuer, TokenSettings
from svantic_grpc.core.clock import Clock, IdGenerator, SystemClock, UuidGenerator
from svantic_grpc.core.connections import ConnectedAgents
from svantic_grpc.core.dispatch import Dispatcher, Transport
from svantic_grpc.core.dispatch_tokens import DispatchTokens
from svantic_grpc.core.events import EventBus
from svantic_grpc.core.knowledge import Knowledge
from svantic_grpc.core.messages.service import Messages
from svantic_grpc.core.models import DeploymentMode
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
    messages: MessageOptions = field(default_factory=MessageOptions)
    dispatch_token_ttl_s: float = 300.0
    dispatch_signing_key_pem: str | None = None
    """Ed25519 private key for dispatch tokens; ``None`` makes one per process."""
    internal_agents: Mapping[str, str] = field(default_factory=dict)
    """Role -> ``module:Class`` overrides of the internal agents."""


class Mesh:
    """Store, event bus, registry, sessions, messages and tokens of one server process.

    Args:
        hosted: The transport to hosted (A2A) agents; the composition root
            supplies it so the core does not depend on the A2A client.
    """

    def __init__(
        self,
        *,
        store: Store,
        tokens: TokenSettings,
        credentials: Iterable[Credential],
        options: MeshOptions = MeshOptions(),
        clock: Clock | None = None,
        ids: IdGenerator | None = None,
        hosted: Transport | None = None,
    ) -> None:
        self.clock = clock or SystemClock()
        self.ids = ids or UuidGenerator()
        self.store = store
        self.tokens = TokenIssuer(settings=tokens, credentials=credentials, clock=self.clock, ids=self.ids)
        self.dispatch_tokens = DispatchTokens(
            clock=self.clock,
            issuer=tokens.issuer,
            ttl_s=options.dispatch_token_ttl_s,
            private_key_pem=options.dispatch_signing_key_pem,
        )
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
        self.connections = ConnectedAgents(registry=self.registry, clock=self.clock)
        transports: dict[DeploymentMode, Transport] = {DeploymentMode.CONNECTED: self.connections}
        if hosted is not None:
            transports[DeploymentMode.HOSTED] = hosted
        self.dispatcher = Dispatcher(transports)
        self.knowledge = Knowledge()
        self.messages = Messages(
            services=MeshServices(
                store=store,
                bus=self.bus,
                registry=self.registry,
                sessions=self.sessions,
                dispatcher=self.dispatcher,
                dispatch_tokens=self.dispatch_tokens,
                knowledge=self.knowledge,
                clock=self.clock,
                ids=self.ids,
                options=options.messages,
            ),
            agent_classes=load_agent_classes(options.internal_agents),
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
        """Stop background work, cancel running messages and close the store; safe to call twice."""
        await self.sessions.reaper.stop()
        await self.messages.close()
        await self.dispatcher.close()
        if self._started:
            self._started = False
            await self.store.close()
