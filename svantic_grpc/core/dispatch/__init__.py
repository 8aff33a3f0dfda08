"""Dispatch: everything about running one piece of work on a remote agent, in one place.

- the seam (``Transport``, ``DispatchJob``, ``DispatchUpdate``) and ``Dispatcher``, which picks
  the transport by deployment mode; hosted agents' A2A transport lives outside the core
  (``svantic_grpc.dispatch.a2a``), connected agents' is ``ConnectedAgents`` here;
- ``DispatchTokens``, the signed token each dispatch carries;
- ``Dispatches``, the run itself: the session's dispatch budget, fail-over, building and
  signing the job, following it, the tool policies and the wait for a human;
- ``input_outcome``, how an ended input request leaves its message.

The message runtime calls ``Dispatches``; no setting replaces it. Internal agents only hook in
(the executor ranks instances and shapes what the agent receives), so no plugin can switch a
rule off.
"""

from __future__ import annotations

from svantic_grpc.core.dispatch._connected import AgentConnection, ConnectedAgents, Outbound
from svantic_grpc.core.dispatch._humans import plan_refusal, sign_off_plan, wait_for_human
from svantic_grpc.core.dispatch._outcome import InputOutcome, Outcome, input_outcome
from svantic_grpc.core.dispatch._run import Dispatches, DispatchHooks, SessionDispatches
from svantic_grpc.core.dispatch._seam import (
    CANCEL_REASONS,
    Dispatcher,
    DispatchFailed,
    DispatchJob,
    DispatchUpdate,
    NotDelivered,
    Transport,
    check_update,
    fold,
)
from svantic_grpc.core.dispatch._tokens import DispatchTokens
from svantic_grpc.core.inputs.model import InputAsk

__all__ = [
    "CANCEL_REASONS",
    "AgentConnection",
    "ConnectedAgents",
    "DispatchFailed",
    "DispatchHooks",
    "DispatchJob",
    "DispatchTokens",
    "DispatchUpdate",
    "Dispatcher",
    "Dispatches",
    "InputAsk",
    "InputOutcome",
    "NotDelivered",
    "Outbound",
    "Outcome",
    "SessionDispatches",
    "Transport",
    "check_update",
    "fold",
    "input_outcome",
    "plan_refusal",
    "sign_off_plan",
    "wait_for_human",
]
