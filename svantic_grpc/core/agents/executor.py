"""The executor: dispatches to remote agents with timeouts, fail-over and a budget."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from dataclasses import dataclass, replace

from svantic_grpc.core.agents.base import InternalAgent, SessionScope
from svantic_grpc.core.agents.orchestrator import Route
from svantic_grpc.core.dispatch import (
    DispatchFailed,
    DispatchJob,
    DispatchUpdate,
    InputAsk,
    NotDelivered,
    check_update,
)
from svantic_grpc.core.errors import InvalidArgument, ResourceExhausted, Unavailable
from svantic_grpc.core.inputs.asks import question_form, resolution_json
from svantic_grpc.core.inputs.model import Decision, InputKind, InputRequest, InputState
from svantic_grpc.core.inputs.service import Inputs
from svantic_grpc.core.messages.model import Artifact, MessageState, Part, parse_metadata
from svantic_grpc.core.messages.writer import MessageWriter
from svantic_grpc.core.models import JoinReason

__all__ = ["BudgetedExecutor", "Executor", "Outcome", "wait_for_human"]

_PROGRESS = (MessageState.SUBMITTED, MessageState.WORKING, None)


@dataclass(frozen=True)
class Outcome:
    """How one dispatch ended (the message's state is written by the caller)."""

    state: MessageState
    reason: str = ""
    agent_type: str = ""
    instance_id: str = ""
    parts: tuple[Part, ...] = ()
    """Everything the agent said during the dispatch."""
    artifacts: tuple[Artifact, ...] = ()
    latency_s: float = 0.0


class Executor(InternalAgent):
    """Carries out routes. Subclass and override ``dispatch`` to change how."""

    role = "executor"

    async def dispatch(
        self,
        writer: MessageWriter,
        route: Route,
        *,
        parts: tuple[Part, ...] = (),
        resume: InputRequest | None = None,
    ) -> Outcome:
        """Send the message (or ``parts`` instead of its own) to ``route`` and follow it to its end.

        With ``resume`` (after a restart), hand the agent that human answer it asked for.
        """
        raise NotImplementedError


class BudgetedExecutor(Executor):
    """Dispatches with a per-session budget, a timeout per dispatch, and fail-over.

    Fail-over happens only when nothing reached the agent, so no work is ever
    done twice; a timeout or an agent error ends the message with the cause.
    """

    def __init__(self, scope: SessionScope) -> None:
        super().__init__(scope)
        self.dispatches = 0
        """Dispatches made in this session: the guardrail budget counts these."""

    async def dispatch(
        self,
        writer: MessageWriter,
        route: Route,
        *,
        parts: tuple[Part, ...] = (),
        resume: InputRequest | None = None,
    ) -> Outcome:
        services = self.scope.services
        options = services.options
        if options.max_dispatches_per_session and self.dispatches >= options.max_dispatches_per_session:
            raise ResourceExhausted(
                f"guardrail: this session used its budget of {options.max_dispatches_per_session} dispatches",
                reason="DISPATCH_BUDGET_EXHAUSTED",
            )
        self.dispatches += 1
        skill_id = route.skill.id if route.skill else ""
        excluded: set[str] = set()
        last_error = ""
        for _attempt in range(options.failover_attempts + 1):
            try:
                member = await services.sessions.add_remote_agent(
                    self.scope.tenant_id,
                    self.scope.session_id,
                    agent_type=route.agent_type,
                    instance_id=route.instance_id,
                    reason=JoinReason.ROUTED,
                    exclude=excluded,
                    rank=services.knowledge.ranker(self.scope.tenant_id, skill_id),
                )
            except Unavailable as exc:
                if not excluded:
                    raise
                return Outcome(
                    MessageState.FAILED,
                    f"no reachable instance of {route.agent_type!r}: {last_error}; then {exc.message}",
                    route.agent_type,
                )
            try:
                return await self._dispatch_once(
                    writer, member.agent_type, member.instance_id, parts, skill_id, resume
                )
            except NotDelivered as exc:
                last_error = f"{member.instance_id}: {exc}"
                excluded.add(member.instance_id)
                await services.sessions.remove_agent(
                    self.scope.tenant_id,
                    self.scope.session_id,
                    member.instance_id,
                    reason=f"unreachable: {exc}",
                )
                if route.instance_id:
                    break  # the caller asked for this instance: no other will do
        return Outcome(
            MessageState.FAILED,
            f"could not reach an instance of {route.agent_type!r} ({last_error})",
            route.agent_type,
        )

    async def _dispatch_once(
        self,
        writer: MessageWriter,
        agent_type: str,
        instance_id: str,
        parts: tuple[Part, ...],
        skill_id: str,
        resume: InputRequest | None = None,
    ) -> Outcome:
        services = self.scope.services
        tenant_id, session_id = self.scope.tenant_id, self.scope.session_id
        agent = await services.store.get_agent(tenant_id=tenant_id, instance_id=instance_id)
        if agent is None:
            raise NotDelivered("deregistered")
        await writer.assign(agent_type, instance_id)
        dispatch_id = services.ids.new_id("dsp_")

        def sign() -> str:
            token, _ = services.dispatch_tokens.sign(
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
            await services.serving.wait()
        timeout = services.options.dispatch_timeout_s
        message = writer.message if not parts else replace(writer.message, parts=parts)
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
            services.clock.now() + timeout,
            resume_task_id=writer.message.remote_task_id if resume is not None else "",
            answer=resume,
            lost=asyncio.Event(),
        )
        started = services.clock.now()
        loop_started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(timeout) as deadline:
                outcome = await self._follow(writer, job, deadline)
        except NotDelivered as exc:
            await services.registry.record_dispatch(
                tenant_id, instance_id, ok=False, error=f"not delivered: {exc}"
            )
            raise
        except TimeoutError:
            reason = f"{agent_type} instance {instance_id!r} did not finish within {timeout:g}s"
            outcome = Outcome(MessageState.FAILED, reason)
        except DispatchFailed as exc:
            outcome = Outcome(MessageState.FAILED, f"{agent_type} instance {instance_id!r} failed: {exc}")
        latency = max(asyncio.get_running_loop().time() - loop_started, services.clock.now() - started, 0.0)
        outcome = replace(outcome, agent_type=agent_type, instance_id=instance_id, latency_s=latency)
        ok = outcome.state is MessageState.COMPLETED
        await services.registry.record_dispatch(
            tenant_id, instance_id, ok=ok, error="" if ok else outcome.reason
        )
        return outcome

    async def _follow(self, writer: MessageWriter, job: DispatchJob, deadline: asyncio.Timeout) -> Outcome:
        said: list[Part] = []
        made: list[Artifact] = []
        updates = self.scope.services.dispatcher.dispatch(job)
        async with contextlib.aclosing(updates):  # close the transport's stream at once, not at GC
            answer: InputRequest | None = None
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
                if job.answer is not None and writer.message.state is MessageState.INPUT_REQUIRED:
                    # The agent has the answer given before a restart: the message runs again.
                    await writer.state(MessageState.WORKING, _answered_after_restart(job.answer))
                writer.remote_task(update.task_ref)
                if update.parts:
                    said.extend(update.parts)
                    await writer.turn(update.parts, instance_id=job.agent.instance_id)
                if update.artifacts:
                    made.extend(update.artifacts)
                    await writer.artifacts(update.artifacts)
                if update.state is MessageState.INPUT_REQUIRED:
                    ended = await self._ask_human(writer, job, update, deadline)
                    if isinstance(ended, Outcome):
                        return replace(ended, parts=tuple(said), artifacts=tuple(made))
                    answer = ended
                    continue
                if update.state not in _PROGRESS:
                    assert update.state is not None
                    return Outcome(update.state, update.reason, parts=tuple(said), artifacts=tuple(made))

    async def _ask_human(
        self, writer: MessageWriter, job: DispatchJob, update: DispatchUpdate, deadline: asyncio.Timeout
    ) -> InputRequest | Outcome:
        """Settle what the agent asks: by policy when one decides, else by a human (the clock stops)."""
        services = self.scope.services
        inputs = services.inputs
        tenant_id, session_id, message_id = (
            self.scope.tenant_id,
            self.scope.session_id,
            writer.message.message_id,
        )
        ask = update.ask or InputAsk(
            InputKind.FORM,
            form=question_form(" ".join(p.text for p in update.parts if p.text) or update.reason),
        )
        call = ask.tool_call
        if call is not None:
            call = replace(call, agent_type=job.agent.agent_type, instance_id=job.agent.instance_id)
        policy, responders = "", ask.allowed_responders
        if ask.kind is InputKind.TOOL_APPROVAL and call is not None:
            yolo = parse_metadata(writer.message.parts).yolo_mode
            verdict = inputs.policies.decide_tool(tenant_id, session_id, call, yolo=yolo)
            policy = verdict.policy.name if verdict.policy else ""
            if not verdict.needs_human:
                return await inputs.decided_by_policy(
                    tenant_id=tenant_id,
                    session_id=session_id,
                    message_id=message_id,
                    tool_call=call,
                    decision=Decision.DENY if verdict.blocked else Decision.APPROVE,
                    policy=policy,
                    reason=verdict.reason or verdict.enforcement.value,
                )
            assert verdict.policy is not None
            responders = verdict.policy.approvers or responders
        request = await inputs.ask(
            tenant_id=tenant_id,
            session_id=session_id,
            message_id=message_id,
            kind=ask.kind,
            tool_call=call,
            form=ask.form,
            plan=ask.plan,
            policy=policy,
            allowed_responders=responders,
        )
        return await wait_for_human(writer, inputs, request, deadline, lost=job.lost)


async def wait_for_human(
    writer: MessageWriter,
    inputs: Inputs,
    request: InputRequest,
    deadline: asyncio.Timeout | None = None,
    *,
    lost: asyncio.Event | None = None,
) -> InputRequest | Outcome:
    """Park the message on ``request`` until it ends; a resolution resumes it (``working``).

    The dispatch timeout does not run while a human thinks. If the agent goes away
    meanwhile (``lost``), the request is withdrawn and the message fails.
    """
    await writer.input_required(request)
    loop = asyncio.get_running_loop()
    when = deadline.when() if deadline is not None else None
    remaining = None if when is None else max(when - loop.time(), 0.0)
    if deadline is not None:
        deadline.reschedule(None)
    try:
        ended = await _first_of(inputs.wait(request.tenant_id, request.request_id), lost)
        if ended is None:
            reason = "the agent disconnected while waiting for a human"
            await inputs.withdraw(request.tenant_id, request.request_id, reason)
            return Outcome(MessageState.FAILED, reason)
    finally:
        if deadline is not None and remaining is not None:
            deadline.reschedule(loop.time() + remaining)
    if ended.state is InputState.RESOLVED and ended.resolution is not None:
        verdict = "approved" if ended.resolution.approved else "denied"
        await writer.state(
            MessageState.WORKING, f"{ended.summary}: {verdict} by {ended.resolution.resolved_by}"
        )
        return ended
    if ended.state is InputState.EXPIRED:
        return Outcome(MessageState.FAILED, f"expired: nobody answered '{ended.summary}' in time")
    return Outcome(MessageState.CANCELED, ended.outcome_reason or "input request canceled")


def _answered_after_restart(request: InputRequest) -> str:
    resolution = request.resolution
    who = "answered" if resolution is None else "approved" if resolution.approved else "denied"
    by = f" by {resolution.resolved_by}" if resolution is not None else ""
    return f"{request.summary}: {who}{by} (after a restart)"


async def _first_of(answer: Awaitable[InputRequest], lost: asyncio.Event | None) -> InputRequest | None:
    """The ended request, or ``None`` if ``lost`` is set first."""
    if lost is None:
        return await answer
    waiting = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not waiting.done():
            waiting.cancel()
    return waiting.result() if waiting.done() and not waiting.cancelled() else None
