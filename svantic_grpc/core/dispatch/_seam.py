"""The seam between the mesh and remote agents: the ``Transport`` protocol and what crosses it.

A transport delivers a ``DispatchJob`` to one remote instance and yields what
the agent reports until it ends. When the agent needs a human (an update in
state ``input-required``, with an ``ask``), the dispatch run sends the ended
``InputRequest`` back into the generator (``asend``) and the transport hands the
answer to the agent and goes on following it. Hosted agents are reached over A2A
(``svantic_grpc.dispatch.a2a``), connected agents over their ``Connect`` stream
(``ConnectedAgents`` in this package); ``Dispatcher`` picks by deployment mode.
``check_update`` holds what any transport reports to the rules for what clients send.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from svantic_grpc.core._validate import check_json_depth, check_reason
from svantic_grpc.core.inputs.model import InputAsk, InputRequest
from svantic_grpc.core.messages.model import Artifact, Message, MessageState, Part, check_parts
from svantic_grpc.core.models import AgentRegistration, DeploymentMode

__all__ = [
    "CANCEL_REASONS",
    "AgentGone",
    "DispatchFailed",
    "DispatchJob",
    "DispatchUpdate",
    "Dispatcher",
    "NotDelivered",
    "Transport",
    "cancel_reason",
    "check_update",
    "fold",
]


CANCEL_REASONS: ContextVar[Mapping[str, str]] = ContextVar(
    "svantic_cancel_reasons", default=MappingProxyType({})
)
"""Why a message's work was cancelled, by message id, as its session's runtime was told (set in the
context of each message's task): a transport tells its agent, as the message's state reason says."""


def cancel_reason(message_id: str) -> str:
    """Why the work of ``message_id`` is cancelled, for its agent."""
    return CANCEL_REASONS.get().get(message_id) or "canceled by the mesh"


@dataclass(frozen=True)
class DispatchJob:
    """One message handed to one remote instance."""

    dispatch_id: str
    tenant_id: str
    session_id: str
    agent: AgentRegistration
    message: Message
    sign: Callable[[], str] = field(compare=False, repr=False)
    """A signed, short-lived token for this dispatch that the agent may verify (see
    ``DispatchTokens``). Signing costs a signature, so only transports that send one call it."""
    deadline: float
    """Epoch seconds after which the mesh gives up."""
    resume_task_id: str = ""
    """Continue this agent-side task (A2A) instead of starting one: send ``answer`` on it."""
    answer: InputRequest | None = None
    """A human's answer the agent asked for before the mesh restarted."""
    lost: asyncio.Event | None = field(default=None, compare=False)
    """Set by the transport when the agent is gone (e.g. its stream dropped) while the mesh is
    not reading the dispatch, such as while a human decides."""
    trace_context: Mapping[str, str] = field(default_factory=dict, compare=False)
    """W3C trace context headers of the work that made this dispatch; empty when not traced."""


@dataclass(frozen=True)
class DispatchUpdate:
    """What an agent reported: a state, words, outputs, or all of them."""

    state: MessageState | None = None
    """``None`` for progress that does not change the state."""
    parts: tuple[Part, ...] = ()
    """A turn to append to the message's history."""
    artifacts: tuple[Artifact, ...] = ()
    reason: str = ""
    ask: InputAsk | None = None
    """With state ``input-required``: what the agent needs; ``None`` means a free-text question."""
    task_ref: str = ""
    """The agent's own id for the work (A2A task id), when it has one."""


_PROGRESS = (None, MessageState.SUBMITTED, MessageState.WORKING)


def fold(previous: DispatchUpdate, update: DispatchUpdate) -> DispatchUpdate | None:
    """Two updates that arrived together as one, when ``previous`` only says "working" and
    carries nothing, or only carries outputs before a bare change of state (no turn, no
    outputs, no question); ``None`` when they do not fold.

    The run then writes what they carry in one store write instead of two: the same records
    and the same events, in the same order (an agent's ack, its artifact and its completion
    become one update).
    """
    if (
        previous.state in _PROGRESS
        and previous.ask is None
        and not previous.parts
        and (not previous.artifacts or not (update.parts or update.artifacts or update.ask))
    ):
        return DispatchUpdate(
            update.state,
            update.parts,
            previous.artifacts + update.artifacts,
            update.reason,
            update.ask,
            update.task_ref or previous.task_ref,
        )
    return None


def check_update(update: DispatchUpdate) -> None:
    """Hold what an agent reports to the rules for what clients send (part shape, JSON nesting),
    whatever its transport.

    Raises:
        InvalidArgument: naming the offending field as in the Connect stream's ``update``.
    """
    check_parts(update.parts, "update.turn.parts")
    for index, artifact in enumerate(update.artifacts):
        check_parts(artifact.parts, f"update.artifacts[{index}].parts")
    if update.reason:
        check_reason("update.reason", update.reason)
    ask = update.ask
    if ask is None:
        return
    if ask.tool_call is not None:
        check_json_depth("update.input_request.tool_call.arguments", ask.tool_call.arguments)
    if ask.form is not None:
        for index, form_field in enumerate(ask.form.fields):
            check_json_depth(f"update.input_request.form.fields[{index}].default_value", form_field.default)


class NotDelivered(Exception):
    """The agent never received the dispatch (unreachable, not connected): failing over is safe."""


class DispatchFailed(Exception):
    """The dispatch reached the agent and then failed; the message fails with this reason."""


class Transport(Protocol):
    """Delivers dispatches to remote agents of one deployment mode."""

    def dispatch(self, job: DispatchJob) -> AsyncGenerator[DispatchUpdate, InputRequest | None]:
        """Yield the agent's updates until a terminal state.

        After an ``input-required`` update the caller either sends the ended
        ``InputRequest`` (``asend``) so the agent gets its answer and the
        dispatch goes on, or closes the generator (the transport then cancels).

        Raises:
            NotDelivered: nothing reached the agent.
            DispatchFailed: the agent or the connection failed after delivery.
        """
        ...

    def protocol_for(self, agent: AgentRegistration) -> str:
        """The wire protocol this transport uses, or will use, to reach ``agent`` (GetAgent shows it).

        ``connect-stream``, ``a2a-jsonrpc``, ``a2a-grpc`` or ``a2a-rest``; empty when it cannot tell yet.
        """
        ...

    def begin_stop(self) -> None:
        """The server is stopping: from now on a stream that ends, or a dispatch the mesh stops
        following, is the server going away, not the agent or the mesh giving up. Leave the
        agent's work as a crash would (send no cancel, mark nothing lost), so a dispatch that
        waits for a human carries on after the restart."""
        ...

    async def close(self) -> None:
        """Release connections; safe to call twice."""
        ...


class Dispatcher:
    """Routes a dispatch to the transport for the agent's deployment mode."""

    def __init__(self, transports: Mapping[DeploymentMode, Transport]) -> None:
        self._transports = dict(transports)

    def dispatch(self, job: DispatchJob) -> AsyncGenerator[DispatchUpdate, InputRequest | None]:
        transport = self._transports.get(job.agent.deployment_mode)
        if transport is None:
            raise NotDelivered(f"this server cannot reach {job.agent.deployment_mode.value} agents")
        return transport.dispatch(job)

    def protocol_for(self, agent: AgentRegistration) -> str:
        """What the transport for the agent's deployment mode uses to reach it ('' if unknown)."""
        transport = self._transports.get(agent.deployment_mode)
        return transport.protocol_for(agent) if transport is not None else ""

    def begin_stop(self) -> None:
        for transport in self._transports.values():
            transport.begin_stop()

    async def close(self) -> None:
        for transport in self._transports.values():
            await transport.close()


class AgentGone(Exception):
    """The agent went away while a human thought, and the human answered: the message is to be
    dispatched again with ``answer`` (to the instance once it is back, or another of its type)."""

    def __init__(self, answer: InputRequest) -> None:
        super().__init__(f"the agent went away before the answer to {answer.request_id}")
        self.answer = answer
