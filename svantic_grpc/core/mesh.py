"""The core wired together: one object the transports hand requests to."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from svantic_grpc.core.agents import AgentServices, load_agent_classes
from svantic_grpc.core.auth import Credential, TokenIssuer, TokenSettings
from svantic_grpc.core.clock import Clock, IdGenerator, SystemClock, UuidGenerator
from svantic_grpc.core.dispatch import ConnectedAgents, Dispatcher, Dispatches, DispatchTokens, Transport
from svantic_grpc.core.dispatch._relay import Relayed, RelayKind
from svantic_grpc.core.events import EventBus
from svantic_grpc.core.inputs.model import InputState
from svantic_grpc.core.inputs.policies import Policy, PolicyEngine
from svantic_grpc.core.inputs.service import Inputs
from svantic_grpc.core.knowledge import Knowledge
from svantic_grpc.core.liveness import HostedLiveness, Probe
from svantic_grpc.core.messages.model import MessageState
from svantic_grpc.core.messages.service import Messages
from svantic_grpc.core.metrics import NO_METRICS, Levels, Metrics
from svantic_grpc.core.models import DeploymentMode, SessionStatus
from svantic_grpc.core.recovery import Recovery
from svantic_grpc.core.registry import Registry
from svantic_grpc.core.retention import Retention, RetentionSweeper
from svantic_grpc.core.sessions import Sessions
from svantic_grpc.core.store import Store
from svantic_grpc.core.stream_quota import StreamQuota
from svantic_grpc.core.tracing import NO_TRACING, Tracing

__all__ = ["Mesh", "MeshOptions", "MessageOptions"]

_log = logging.getLogger("svantic_grpc")


@dataclass(frozen=True)
class MessageOptions:
    """Tunables of message handling, from settings."""

    dispatch_timeout_s: float = 60.0
    """How long one dispatch may take before the message fails."""
    max_dispatches_per_session: int = 1000
    """Guardrail budget per session; 0 is unlimited."""
    failover_attempts: int = 2
    """Other instances tried when a dispatch could not be delivered."""
    critic_retries: int = 1
    """Re-dispatches when a result does not fit the skill's declared output."""


@dataclass(frozen=True)
class MeshOptions:
    """Tunables of the core, taken from settings."""

    session_ttl_s: float = 1800.0
    """Idle time after which a session closes; 0 disables."""
    heartbeat_timeout_s: float = 90.0
    """Silence after which an instance is unhealthy."""
    subscriber_buffer: int = 1024
    """Events a live subscriber may fall behind before it is cut off."""
    max_streams_per_tenant: int = 2000
    """Clients' live event streams a tenant may hold open in one process (0: no limit)."""
    messages: MessageOptions = field(default_factory=MessageOptions)
    dispatch_token_ttl_s: float = 300.0
    dispatch_signing_key_pem: str | None = None
    """Ed25519 private key for dispatch tokens; ``None`` makes one per process."""
    internal_agents: Mapping[str, str] = field(default_factory=dict)
    """Role -> ``module:Class`` overrides of the internal agents."""
    policies: Sequence[Policy] = ()
    """Tool and plan policies."""
    max_tool_calls_per_session: int = 0
    """Guardrail budget of tool calls per session; 0 is unlimited."""
    input_request_ttl_s: float = 3600.0
    """How long an input request waits before it expires."""
    retention: Retention = field(default_factory=Retention)
    """How long closed sessions and old events are kept."""
    replica_id: str = ""
    """This process's name among replicas sharing a store (in session leases)."""
    lease_s: float = 10.0
    """How long a session's lease lasts without renewal (replicas sharing a store)."""
    renew_s: float = 3.0
    """How often leases are renewed and expired ones taken over."""


class Mesh:
    """Store, event bus, registry, sessions, messages and tokens of one server process.

    Args:
        hosted: The transport to hosted (A2A) agents; the composition root
            supplies it so the core does not depend on the A2A client.
        probe: Checks that a hosted agent answers (the hosted transport's card
            probe); with it, idle hosted agents are probed to keep them routable.
        metrics: Told of dispatches, messages, input requests and store commits as they end.
        tracing: Opens a span around each dispatch (whose trace headers go to the agent).
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
        probe: Probe | None = None,
        metrics: Metrics = NO_METRICS,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        credentials = tuple(credentials)
        self.metrics = metrics
        store.metrics = metrics
        self._tenant_ids = frozenset(c.tenant_id for c in credentials)
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
        self.streams = StreamQuota(options.max_streams_per_tenant)
        """Live streams per tenant in this process: clients' event streams and agents' Connect."""
        self.bus = EventBus(
            store=store,
            clock=self.clock,
            subscriber_buffer=options.subscriber_buffer,
            quota=self.streams,
            max_events_per_session=options.retention.max_events_per_session,
            bell=store.event_bell(),
            metrics=metrics,
        )
        self.retention = RetentionSweeper(store=store, clock=self.clock, retention=options.retention)
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
        self.connections = ConnectedAgents(registry=self.registry, clock=self.clock, quota=self.streams)
        self.registry.is_live = self.connections.is_connected
        self.liveness: HostedLiveness | None = None
        """Probes idle hosted agents (they cannot heartbeat); ``None`` without a ``probe``."""
        if probe is not None:
            self.liveness = HostedLiveness(
                registry=self.registry,
                store=store,
                clock=self.clock,
                probe=probe,
                # Three probes fit in the timeout: one failure alone does not make an agent unhealthy.
                idle_s=options.heartbeat_timeout_s / 3,
            )
            self.registry.on_registered = self.liveness.track
        transports: dict[DeploymentMode, Transport] = {DeploymentMode.CONNECTED: self.connections}
        if hosted is not None:
            transports[DeploymentMode.HOSTED] = hosted
        self.dispatcher = Dispatcher(transports)
        self.registry.protocol_for = self.dispatcher.protocol_for
        self.knowledge = Knowledge()
        self.inputs = Inputs(
            store=store,
            write=self.sessions.write_inputs,
            clock=self.clock,
            ids=self.ids,
            policies=PolicyEngine(
                options.policies, max_tool_calls_per_session=options.max_tool_calls_per_session
            ),
            default_ttl_s=options.input_request_ttl_s,
            metrics=metrics,
            tracing=tracing,
        )
        self.sessions.on_close(self._session_closing)
        self.ownership = store.ownership(
            replica_id=options.replica_id, lease_s=options.lease_s, renew_s=options.renew_s
        )
        """Which sessions this process runs (all of them, unless replicas share the store)."""
        self.relay = store.agent_relay(replica_id=self.ownership.replica_id, poll_s=options.renew_s)
        """Reaches agents whose ``Connect`` stream another replica holds (``None``: one process)."""
        self._renew_s = options.renew_s
        self._orphans: asyncio.Task[None] | None = None
        """With replicas: ends dispatches held here whose owner stopped running their session."""
        if self.relay is not None:
            self.connections.relay = self.relay
            self.registry.held_elsewhere = self.connections.held_elsewhere
        if not self.ownership.sole:
            self.inputs.shared = self.bus
            self.sessions.shared = True
            # Only replicas withdraw what the owner raised while a close was on its way (one
            # process has nothing to: no hook awaited after each close).
            self.sessions.on_closed(self._session_closed)
            ownership = self.ownership
            self.sessions.on_open(lambda tenant_id, session_id: ownership.runs_here(tenant_id, session_id))
        self.serving = asyncio.Event()
        """Set when the mesh serves: work waiting for an agent to (re)connect starts its clock then."""
        self.dispatches = Dispatches(
            store=store,
            registry=self.registry,
            sessions=self.sessions,
            dispatcher=self.dispatcher,
            tokens=self.dispatch_tokens,
            inputs=self.inputs,
            clock=self.clock,
            ids=self.ids,
            serving=self.serving,
            timeout_s=options.messages.dispatch_timeout_s,
            max_per_session=options.messages.max_dispatches_per_session,
            failover_attempts=options.messages.failover_attempts,
            metrics=metrics,
            tracing=tracing,
        )
        """Runs every dispatch: the rules hold here, whatever internal agents are plugged in."""
        self.messages = Messages(
            store=store,
            bus=self.bus,
            sessions=self.sessions,
            inputs=self.inputs,
            dispatches=self.dispatches,
            clock=self.clock,
            ids=self.ids,
            agent_services=AgentServices(
                store=store, knowledge=self.knowledge, clock=self.clock, ids=self.ids
            ),
            agent_classes=load_agent_classes(options.internal_agents),
            critic_retries=options.messages.critic_retries,
            metrics=metrics,
            ownership=self.ownership,
        )
        # A cancel on a replica that does not own the session goes to its owner through the relay.
        self.messages.relay = self.relay
        self.recovery = Recovery(
            store=store,
            sessions=self.sessions,
            messages=self.messages,
            inputs=self.inputs,
            ownership=self.ownership,
        )
        self._started = False

    async def _session_closing(self, tenant_id: str, session_id: str, reason: str) -> None:
        """Pending requests of a closing session fail; its grants and budgets go."""
        self.inputs.policies.forget_session(tenant_id, session_id)
        if self.inputs.has_pending(tenant_id, session_id):
            await self._withdraw_pending(tenant_id, session_id, reason)

    async def _session_closed(self, tenant_id: str, session_id: str, reason: str) -> None:
        """With replicas, once a close is written: a request the session's owner raised while the
        close was on its way here (after its work was ended, before the close was written) is
        withdrawn now, not at the owner's next renewal. Requests raised after the close are
        refused (the close moved the session on), so none is left pending in a closed session."""
        if self.sessions.shared:
            await self._withdraw_pending(tenant_id, session_id, reason)

    async def _withdraw_pending(self, tenant_id: str, session_id: str, reason: str) -> None:
        page = await self.store.list_inputs(
            tenant_id=tenant_id, session_id=session_id, states=(InputState.PENDING,), page_size=500
        )
        for message_id in {r.message_id for r in page.requests}:
            await self.inputs.cancel_for_message(
                tenant_id, session_id, message_id, f"session closed ({reason})"
            )

    async def start(self, *, serving: bool = True) -> None:
        """Recover timers and work from the store and start background work.

        Args:
            serving: Whether agents can reach the mesh once this returns; a server that binds its
                port afterwards passes ``False`` and calls ``now_serving`` once bound.
        """
        if self._started:
            return
        self._started = True
        await self.store.connect()
        await self.bus.start()
        interrupted, resumed = await self.recovery.at_start_up()
        if interrupted or resumed:
            _log.info(
                "recovered messages: %d interrupted, %d waiting for a human again", interrupted, resumed
            )
        self.sessions.reaper.start()
        self.inputs.expiry.start()
        self.retention.start()
        await self.ownership.start(
            takeover=self.recovery.take_over,
            run=self.messages.run_handed,
            abandon=self.messages.abandon,
            closed=self.sessions.closed_elsewhere,
        )
        if self.relay is not None:
            await self.relay.start(self._relayed)
            self._orphans = asyncio.create_task(self._ending_orphans(), name="svantic-orphans")
        if self.liveness is not None:
            await self.liveness.recover(self._tenant_ids)
            self.liveness.start()
        if serving:
            self.now_serving()

    async def _ending_orphans(self) -> None:
        """Every renewal period: the dispatches this replica runs for another replica whose
        session that replica no longer owns end here (``ConnectedAgents.end_orphaned``)."""
        while True:
            await asyncio.sleep(self._renew_s)
            try:
                ended = await self.connections.end_orphaned(self.ownership.owner_of, self._message_ended)
            except Exception:  # the store unreachable: the next period tries again
                _log.exception("could not check the owners of the dispatches held here")
                continue
            if ended:
                _log.info("ended %d dispatch(es) whose owner no longer runs their session", ended)

    async def _message_ended(self, tenant_id: str, session_id: str, message_id: str) -> bool:
        message = await self.store.get_message(
            tenant_id=tenant_id, session_id=session_id, message_id=message_id
        )
        return message is None or message.state.terminal

    def _relayed(self, item: Relayed) -> None:
        """An item another replica sent this one: a message's cancel, or about a dispatch."""
        if item.kind is RelayKind.CANCEL_MESSAGE or item.kind is RelayKind.END_FOR_CLOSE:
            self.messages.cancel_asked(item)
        else:
            self.connections.relayed(item)

    async def levels(self) -> Levels:
        """How many sessions, messages, connections, pending requests and subscribers there are now.

        Reads the store's open sessions and unfinished messages (what start-up recovery reads too):
        meant for a scrape every few seconds, not for the hot path.
        """
        sessions = {s.value: 0 for s in SessionStatus if s is not SessionStatus.CLOSED}
        for session in await self.store.open_sessions():
            sessions[session.status.value] = sessions.get(session.status.value, 0) + 1
        messages = {s.value: 0 for s in MessageState if not s.terminal}
        for message in await self.store.unfinished_messages():
            messages[message.state.value] = messages.get(message.state.value, 0) + 1
        return Levels(
            sessions=sessions,
            messages=messages,
            connected_agents=self.connections.count,
            inputs_pending=len(await self.store.pending_inputs()),
            subscribers=self.bus.total_subscribers,
            subscriber_lag=self.bus.subscriber_lag,
        )

    def now_serving(self) -> None:
        """Agents can reach the mesh from now on (its port is bound)."""
        self.serving.set()

    def begin_stop(self) -> None:
        """The server starts to stop (before its streams end): what waits for a human is left for
        the next start, as a crash leaves it; an agent's stream ending from now on is no sign the
        agent left."""
        self.dispatcher.begin_stop()
        self.messages.begin_stop()

    async def stop(self) -> None:
        """Stop background work, cancel running messages and close the store; safe to call twice."""
        await self.sessions.reaper.stop()
        await self.retention.stop()
        if self.liveness is not None:
            await self.liveness.stop()
        await self.ownership.halt()  # no take-over or hand-off starts new work while it ends
        self.begin_stop()  # (again: a mesh stopped without its server)
        await self.messages.close()
        await self.inputs.close()
        await self.ownership.stop()  # after the running work ended: its last writes still carry the fence
        if self._orphans is not None:
            self._orphans.cancel()
            await asyncio.gather(self._orphans, return_exceptions=True)
            self._orphans = None
        if self.relay is not None:
            await self.relay.stop()
        await self.dispatcher.close()
        await self.bus.stop()
        if self._started:
            self._started = False
            await self.store.close()
