"""What the rules say when work needs a human: tool policies, plan policies, and the wait itself.

A tool call an agent asks approval for is decided by the tool policies first (block, allow,
an earlier grant, ``yolo_mode``, the session's tool-call budget); only what still needs
approval reaches a human. A plan is signed off when a plan policy says so. While a human
thinks, the dispatch timeout stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import replace

from svantic_grpc.core.dispatch._outcome import Outcome, input_outcome
from svantic_grpc.core.dispatch._seam import AgentGone, DispatchJob, DispatchUpdate
from svantic_grpc.core.inputs.asks import question_form
from svantic_grpc.core.inputs.model import Decision, InputAsk, InputKind, InputRequest, PlanItem
from svantic_grpc.core.inputs.policies import Enforcement, approved_always
from svantic_grpc.core.inputs.service import Inputs
from svantic_grpc.core.messages.model import MessageState
from svantic_grpc.core.messages.writer import MessageWriter

__all__ = ["answered", "ask_human", "plan_refusal", "sign_off_plan", "wait_for_human"]


async def ask_human(
    inputs: Inputs,
    writer: MessageWriter,
    job: DispatchJob,
    update: DispatchUpdate,
    deadline: asyncio.Timeout,
    *,
    yolo: bool,
) -> InputRequest | Outcome:
    """Settle what the agent asks: by policy when one decides, else by a human (the clock stops).

    ``yolo`` is the message's ``yolo_mode`` as it was sent: it approves what needs approval,
    never what a policy or a budget blocks.
    """
    message = writer.message
    tenant_id, session_id, message_id = message.tenant_id, message.session_id, message.message_id
    ask = update.ask or InputAsk(
        InputKind.FORM,
        form=question_form(" ".join(p.text for p in update.parts if p.text) or update.reason),
    )
    call = ask.tool_call
    if call is not None:
        call = replace(call, agent_type=job.agent.agent_type, instance_id=job.agent.instance_id)
    policy, responders = "", ask.allowed_responders
    if ask.kind is InputKind.TOOL_APPROVAL and call is not None:
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
        if await inputs.approved_always_elsewhere(tenant_id, policy):
            return await inputs.decided_by_policy(
                tenant_id=tenant_id,
                session_id=session_id,
                message_id=message_id,
                tool_call=call,
                decision=Decision.APPROVE,
                policy=policy,
                reason=approved_always(policy),
            )
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
        waiting=writer.waiting_on,
    )
    # The message stays input-required until the agent shows it has the answer (its next update):
    # a crash in between resumes it with the answer instead of failing it as interrupted.
    return await wait_for_human(writer, inputs, request, deadline, lost=job.lost, resume_now=False)


async def sign_off_plan(
    inputs: Inputs, writer: MessageWriter, plan: tuple[PlanItem, ...], *, yolo: bool
) -> Outcome | None:
    """Ask a human to sign the plan off when a plan policy says so; ``None`` means go ahead.

    A blocking plan policy rejects the plan; ``yolo_mode`` skips a sign-off, never a block.
    """
    policy = inputs.policies.plan_policy(item.agent_type for item in plan)
    if policy is None:
        return None
    if policy.enforcement is Enforcement.BLOCK:
        return Outcome(MessageState.REJECTED, f"plan blocked by policy {policy.name!r}")
    if yolo:
        return None
    message = writer.message
    request = await inputs.ask(
        tenant_id=message.tenant_id,
        session_id=message.session_id,
        message_id=message.message_id,
        kind=InputKind.PLAN_APPROVAL,
        plan=plan,
        policy=policy.name,
        allowed_responders=policy.approvers,
        waiting=writer.waiting_on,
    )
    ended = await wait_for_human(writer, inputs, request)
    if isinstance(ended, Outcome):
        return ended
    return plan_refusal(ended)


def plan_refusal(request: InputRequest) -> Outcome | None:
    """The plan's rejection when a human denied it; ``None`` when it was approved."""
    resolution = request.resolution
    if resolution is not None and not resolution.approved:
        return Outcome(MessageState.REJECTED, f"plan denied by {resolution.resolved_by}: {resolution.reason}")
    return None


async def wait_for_human(
    writer: MessageWriter,
    inputs: Inputs,
    request: InputRequest,
    deadline: asyncio.Timeout | None = None,
    *,
    lost: asyncio.Event | None = None,
    resume_now: bool = True,
) -> InputRequest | Outcome:
    """Park the message on ``request`` (raised with the message waiting on it: ``Inputs.ask``'s
    ``waiting``) until it ends; a resolution resumes it (``working``), at once or, with
    ``resume_now`` false, when the caller says so (``answered``).

    The dispatch timeout does not run while a human thinks. If the agent goes away meanwhile
    (``lost``: its stream dropped, or the replica holding it stopped), the request stays
    pending: the answer, when it comes, raises ``AgentGone`` for the caller to dispatch the
    message again with it, as after a restart (the agent gets the answer with the message).
    """
    writer.stopped()
    loop = asyncio.get_running_loop()
    when = deadline.when() if deadline is not None else None
    remaining = None if when is None else max(when - loop.time(), 0.0)
    if deadline is not None:
        deadline.reschedule(None)
    try:
        ended = await _first_of(inputs.wait(request.tenant_id, request.request_id), lost)
        gone = ended is None
        if ended is None:  # the agent went away: its answer waits for it all the same
            ended = await inputs.wait(request.tenant_id, request.request_id)
    finally:
        if deadline is not None and remaining is not None:
            deadline.reschedule(loop.time() + remaining)
    outcome = input_outcome(ended)
    if not outcome.goes_on:
        return Outcome(outcome.state, outcome.reason)
    if gone:
        raise AgentGone(ended)
    if resume_now:
        await writer.state(MessageState.WORKING, outcome.reason)
    return ended


async def answered(writer: MessageWriter, request: InputRequest, *, after_restart: bool = False) -> None:
    """The agent has the answer to ``request`` (it reported since): the message works again."""
    if writer.message.state is MessageState.INPUT_REQUIRED:
        reason = input_outcome(request).reason
        await writer.state(MessageState.WORKING, f"{reason} (after a restart)" if after_restart else reason)


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
