"""Running one dispatch: the session's budget, fail-over, the signed job, following it to its end.

This is the only way work reaches a remote agent, and no setting replaces it. The session's
executor (``core.agents.Executor``) hooks in where a choice is its to make: it ranks the
instances and shapes the parts the agent receives. Every rule (the dispatch budget, the tool
policies and the tool-call budget, approvals, timeouts, fail-over only when nothing reached the
agent) holds whatever it returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

from svantic_grpc.core._reads import MessageReads, forget_reads
from svantic_grpc.core._tasks import after_stop, close_after_stop
from svantic_grpc.core.clock import Clock, IdGenerator
from svantic_grpc.core.dispatch._humans import answered, ask_human
from svantic_grpc.core.dispatch._outcome import Outcome
from svantic_grpc.core.dispatch._seam import (
    AgentGone,
    Dispatcher,
    DispatchFailed,
    DispatchJob,
    NotDelivered,
    check_update,
)
from svantic_grpc.core.dispatch._tokens import DispatchTokens
from svantic_grpc.core.errors import InvalidArgument, ResourceExhausted, Unavailable
from svantic_grpc.core.evolve import evolve
from svantic_grpc.core.inputs.asks import resolution_json
from svantic_grpc.core.inputs.model import InputRequest
from svantic_grpc.core.inputs.service import Inputs
from svantic_grpc.core.log_context import SESSION_ID
from svantic_grpc.core.messages.model import Artifact, MessageState, Part
from svantic_grpc.core.messages.writer import MessageWriter
from svantic_grpc.core.metrics import NO_METRICS, Metrics
from svantic_grpc.core.models import AgentRegistration, DeploymentMode, JoinReason
from svantic_grpc.core.registry import Registry
from svantic_grpc.core.sessions import Sessions
from svantic_grpc.core.store import Store
from svantic_grpc.core.tracing import NO_TRACING, Tracing

__all__ = ["DispatchHooks", "Dispatches", "SessionDispatches"]

_log = logging.getLogger(__name__)

_PROGRESS = (MessageState.SUBMITTED, MessageState.WORKING, None)
_PRESIGNED_S = 1.0
"""How long a dispatch token signed ahead (``SessionDispatches._sign_ahead``) may wait for its
dispatch; a tenth of the tokens' life if that is shorter."""
_GOING_ON = (*_PROGRESS, MessageState.INPUT_REQUIRED)


class DispatchHooks(Protocol):
    """The choices a session's executor makes for each dispatch (see ``core.agents.Executor``)."""

    def rank(self, skill_id: str) -> Callable[[AgentRegistration], float]:
        """A sort key over the routable instances (lower goes first)."""
        ...

    def shape(self, parts: tuple[Part, ...]) -> tuple[Part, ...]:
        """The parts the agent receives, made from those the message (or plan step) carries."""
        ...


class Dispatches:
    """Dispatches of every session in this process.

    Args:
        timeout_s: How long one dispatch may take (a human's thinking time does not count).
        max_per_session: The guardrail budget of dispatches per session; 0 is unlimited.
        failover_attempts: Other instances tried when a dispatch could not be delivered.
        serving: Set once the mesh serves; work resumed at start-up waits for it.
    """

    def __init__(
        self,
        *,
        store: Store,
        registry: Registry,
        sessions: Sessions,
        dispatcher: Dispatcher,
        tokens: DispatchTokens,
        inputs: Inputs,
        clock: Clock,
        ids: IdGenerator,
        serving: asyncio.Event,
        timeout_s: float,
        max_per_session: int,
        failover_attempts: int,
        metrics: Metrics = NO_METRICS,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._metrics = metrics
        self._tracing = tracing
        self._store = store
        self._reads = MessageReads(store)
        """The store's reads, the agent read once per step of a message's run (``core._reads``)."""
        self._registry = registry
        self._sessions = sessions
        self._dispatcher = dispatcher
        self._tokens = tokens
        self._inputs = inputs
        self._clock = clock
        self._ids = ids
        self._serving = serving
        self._timeout_s = timeout_s
        self._max_per_session = max_per_session
        self._failover_attempts = failover_attempts

    def session(self, tenant_id: str, session_id: str, hooks: DispatchHooks) -> SessionDispatches:
        """The dispatches of one session, with its budget; the session's runtime holds it."""
        return SessionDispatches(self, tenant_id, session_id, hooks)


class SessionDispatches:
    """Runs the dispatches of one session and counts them against its budget."""

    def __init__(self, service: Dispatches, tenant_id: str, session_id: str, hooks: DispatchHooks) -> None:
        self._service = service
        self.tenant_id = tenant_id
        self.session_id = session_id
        self._hooks = hooks
        self._signed: dict[tuple[str, str], tuple[str, str, float]] = {}
        """Per hosted instance (type, id): the next dispatch's id and token, signed ahead, and when."""
        self._ended: dict[tuple[str, str], float] = {}
        """Per hosted instance (type, id): when its last dispatch in this session ended."""
        self.used = 0
        """Dispatches made in this session: the guardrail budget counts these."""

    async def run(
        self,
        writer: MessageWriter,
        *,
        agent_type: str,
        instance_id: str = "",
        skill_id: str = "",
        yolo: bool = False,
        parts: tuple[Part, ...] = (),
        resume: InputRequest | None = None,
    ) -> Outcome:
        """Send the message (or ``parts`` instead of its own) to an instance of ``agent_type`` and
        follow it to its end.

        Args:
            instance_id: This instance and no other (no fail-over to another).
            skill_id: The skill routed to, for ranking the instances.
            yolo: The message's ``yolo_mode`` as sent: approves what needs approval, never a block.
            resume: After a restart: hand the agent the human answer it asked for.

        Raises:
            ResourceExhausted: the session used its dispatch budget.
            Unavailable: no instance of ``agent_type`` can take the work.
        """
        service = self._service
        budget = service._max_per_session
        if budget and self.used >= budget:
            raise ResourceExhausted(
                f"guardrail: this session used its budget of {budget} dispatches",
                reason="DISPATCH_BUDGET_EXHAUSTED",
            )
        self.used += 1
        bound = SESSION_ID.set(self.session_id)
        try:
            return await self._run(writer, agent_type, instance_id, skill_id, yolo, parts, resume)
        finally:
            SESSION_ID.reset(bound)

    async def _run(
        self,
        writer: MessageWriter,
        agent_type: str,
        instance_id: str,
        skill_id: str,
        yolo: bool,
        parts: tuple[Part, ...],
        resume: InputRequest | None,
    ) -> Outcome:
        service = self._service
        excluded: set[str] = set()
        last_error = ""
        for _attempt in range(service._failover_attempts + 1):
            try:
                member = await service._sessions.add_remote_agent(
                    self.tenant_id,
                    self.session_id,
                    agent_type=agent_type,
                    instance_id=instance_id,
                    reason=JoinReason.ROUTED,
                    exclude=excluded,
                    rank=self._hooks.rank(skill_id),
                )
            except Unavailable as exc:
                if not excluded:
                    raise
                return Outcome(
                    MessageState.FAILED,
                    f"no reachable instance of {agent_type!r}: {last_error}; then {exc.message}",
                    agent_type,
                )
            try:
                while True:
                    try:
                        return await self._once(
                            writer, member.agent_type, member.instance_id, parts, yolo, resume
                        )
                    except AgentGone as gone:
                        # The agent went away while a human thought; the answer came: it goes to
                        # the agent with the message once it is back, as after a restart.
                        _log.info(
                            "agent %s/%s went away before the answer to %s: dispatching it again",
                            member.agent_type,
                            member.instance_id,
                            gone.answer.request_id,
                        )
                        resume = gone.answer
            except NotDelivered as exc:
                last_error = f"{member.instance_id}: {exc}"
                excluded.add(member.instance_id)
                await service._sessions.remove_agent(
                    self.tenant_id, self.session_id, member.instance_id, reason=f"unreachable: {exc}"
                )
                if instance_id:
                    break  # the caller asked for this instance: no other will do
        return Outcome(
            MessageState.FAILED, f"could not reach an instance of {agent_type!r} ({last_error})", agent_type
        )

    async def _once(
        self,
        writer: MessageWriter,
        agent_type: str,
        instance_id: str,
        parts: tuple[Part, ...],
        yolo: bool,
        resume: InputRequest | None,
    ) -> Outcome:
        with self._service._tracing.dispatch(agent_type=agent_type, instance_id=instance_id) as trace:
            return await self._deliver(writer, agent_type, instance_id, parts, yolo, resume, trace)

    async def _deliver(
        self,
        writer: MessageWriter,
        agent_type: str,
        instance_id: str,
        parts: tuple[Part, ...],
        yolo: bool,
        resume: InputRequest | None,
        trace_context: Mapping[str, str],
    ) -> Outcome:
        service = self._service
        tenant_id, session_id = self.tenant_id, self.session_id
        agent = await service._reads.get_agent(tenant_id=tenant_id, instance_id=instance_id)
        if agent is None:
            raise NotDelivered("deregistered")
        if agent.agent_type != agent_type:
            # In the session under another type (a self-join naming a registered instance): the
            # work, the policies that judged it and the records must all name what runs it.
            raise NotDelivered(f"instance {instance_id!r} is registered as {agent.agent_type!r}")
        await writer.assign(agent_type, instance_id)
        key = (agent_type, instance_id)
        signed = self._signed.pop(key, None) if self._signed else None
        if signed is not None and service._clock.now() - signed[2] <= self._presign_window():
            dispatch_id, ahead = signed[0], signed[1]  # its token was signed after the last answer
        else:
            dispatch_id, ahead = service._ids.new_id("dsp_"), ""

        def sign() -> str:
            nonlocal ahead
            if ahead:  # the first call's, signed ahead; any later call signs afresh
                token, ahead = ahead, ""
                return token
            token, _ = service._tokens.sign(
                tenant_id=tenant_id,
                agent_type=agent_type,
                instance_id=instance_id,
                session_id=session_id,
                dispatch_id=dispatch_id,
            )
            return token

        if resume is not None:
            # Resumed at start-up: no agent can be back before the mesh serves, and the dispatch
            # timeout (within which a connected agent may reconnect) counts from then.
            await service._serving.wait()
        timeout = service._timeout_s
        sent = self._hooks.shape(parts or writer.message.parts)
        message = writer.message if sent is writer.message.parts else replace(writer.message, parts=sent)
        if resume is not None:
            # The agent may have lost its state with the restart: the answer travels with the message.
            answer = Part(data={"input_resolution": resolution_json(resume)})
            message = replace(message, parts=(*message.parts, answer))
        job = DispatchJob(
            dispatch_id,
            tenant_id,
            session_id,
            agent,
            message,
            sign,
            service._clock.now() + timeout,
            resume_task_id=writer.message.remote_task_id if resume is not None else "",
            answer=resume,
            lost=asyncio.Event(),
            trace_context=trace_context,
        )
        started = service._clock.now()
        loop = asyncio.get_running_loop()
        loop_started = loop.time()
        try:
            async with asyncio.timeout(timeout) as deadline:
                outcome = await self._follow(writer, job, deadline, yolo)
        except NotDelivered as exc:
            _log.warning(
                "dispatch not delivered: %s/%s: %s",
                agent_type,
                instance_id,
                exc,
                extra={"agent_type": agent_type, "instance_id": instance_id, "dispatch_id": dispatch_id},
            )
            service._metrics.dispatch_done(
                agent_type=agent_type,
                transport=service._dispatcher.protocol_for(agent),
                outcome="not-delivered",
                latency_s=loop.time() - loop_started,
            )
            service._registry.record_dispatch(tenant_id, instance_id, ok=False, error=f"not delivered: {exc}")
            raise
        except TimeoutError:
            reason = f"{agent_type} instance {instance_id!r} did not finish within {timeout:g}s"
            outcome = Outcome(MessageState.FAILED, reason)
        except DispatchFailed as exc:
            outcome = Outcome(MessageState.FAILED, f"{agent_type} instance {instance_id!r} failed: {exc}")
        loop_latency = loop.time() - loop_started
        latency = max(loop_latency, service._clock.now() - started, 0.0)
        outcome = evolve(outcome, agent_type=agent_type, instance_id=instance_id, latency_s=latency)
        ok = outcome.state is MessageState.COMPLETED
        if outcome.state is MessageState.FAILED:
            _log.warning(
                "dispatch failed: %s/%s: %s",
                agent_type,
                instance_id,
                outcome.reason,
                extra={"agent_type": agent_type, "instance_id": instance_id, "dispatch_id": dispatch_id},
            )

        def count() -> None:
            service._metrics.dispatch_done(
                agent_type=agent_type,
                transport=service._dispatcher.protocol_for(agent),
                outcome=outcome.state.value,
                latency_s=latency,
            )
            service._registry.record_dispatch(
                tenant_id, instance_id, ok=ok, error="" if ok else outcome.reason
            )
            if agent.deployment_mode is DeploymentMode.HOSTED:
                self._sign_ahead(key)

        if not after_stop(count):  # counted once the message's end is written and answered
            count()
        return outcome

    def _presign_window(self) -> float:
        return min(_PRESIGNED_S, self._service._tokens.ttl_s / 10)

    def _sign_ahead(self, key: tuple[str, str]) -> None:
        """After a hosted dispatch ended (its message answered): when the one before it to that
        instance in this session ended within ``_PRESIGNED_S`` (a conversation going on), sign the
        token of the next one now, so that the next message's call does not wait for a signature
        (~35 us). It names a dispatch id of its own, as any token; unused in time, it is dropped."""
        service = self._service
        now = service._clock.now()
        last = self._ended.get(key)
        self._ended[key] = now
        if last is None or now - last > self._presign_window():
            self._signed.pop(key, None)
            return
        agent_type, instance_id = key
        dispatch_id = service._ids.new_id("dsp_")
        token, _ = service._tokens.sign(
            tenant_id=self.tenant_id,
            agent_type=agent_type,
            instance_id=instance_id,
            session_id=self.session_id,
            dispatch_id=dispatch_id,
        )
        self._signed[key] = (dispatch_id, token, now)

    async def _follow(
        self, writer: MessageWriter, job: DispatchJob, deadline: asyncio.Timeout, yolo: bool
    ) -> Outcome:
        said: list[Part] = []
        made: list[Artifact] = []
        updates = self._service._dispatcher.dispatch(job)
        # The transport's stream is closed here, not at GC. A hosted agent's, read to its final
        # update, is closed once the message's end is written and answered: what it still does
        # (its HTTP stream left to end, its connection to go back to the pool) need not delay the
        # answer. A connected agent's has little to do: closed at once (a task would cost more).
        closed_later = False
        hosted = job.agent.deployment_mode is DeploymentMode.HOSTED
        try:
            answer: InputRequest | None = None
            given = job.answer  # an answer the agent has yet to show it has
            while True:
                try:
                    update = await updates.asend(answer)
                except StopAsyncIteration:
                    raise DispatchFailed("the agent ended the dispatch without a final state") from None
                answer = None
                try:
                    check_update(update)
                except InvalidArgument as exc:
                    raise DispatchFailed(f"the agent sent an invalid update: {exc.message}") from None
                if given is not None:
                    # The agent reported since it was given the answer: it has it, the message runs again.
                    await answered(writer, given, after_restart=given is job.answer)
                    given = None
                writer.remote_task(update.task_ref)
                # What comes with the final state is written with it (the caller writes the
                # message's end next, whatever it is): one store write instead of two or three.
                final = update.state not in _GOING_ON
                if update.parts:
                    said.extend(update.parts)
                    await writer.turn(update.parts, instance_id=job.agent.instance_id, hold=final)
                if update.artifacts:
                    made.extend(update.artifacts)
                    await writer.artifacts(update.artifacts, hold=final)
                if update.state is MessageState.INPUT_REQUIRED:
                    forget_reads()  # what was read before a human's answer is read again after it
                    ended = await ask_human(self._service._inputs, writer, job, update, deadline, yolo=yolo)
                    if isinstance(ended, Outcome):
                        return replace(ended, parts=tuple(said), artifacts=tuple(made))
                    answer = given = ended
                    continue
                if update.state not in _PROGRESS:
                    assert update.state is not None
                    closed_later = hosted and close_after_stop(updates)
                    return Outcome(update.state, update.reason, parts=tuple(said), artifacts=tuple(made))
        finally:
            if not closed_later:
                await updates.aclose()
