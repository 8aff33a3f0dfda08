"""Reads of agent registrations and sessions, made once per step of a message's run.

Routing and carrying out one message read the same records: the orchestrator lists the agents
of the routed type (for the skill), the chat lists every agent and reads the session, the
dispatch reads the instance it sends to. Within one step of a run (``message_reads``, entered by
the message's task: a context variable, so no other task sees it) the first read serves those
after it: one store read instead of two or three, where each is a round trip to the database.

Nothing is kept beyond the step: the run starts again from the store (``forget_reads``) once a
dispatch has been made and before anything waits for a human, so a record read minutes ago is
never taken for the current one.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Protocol

from svantic_grpc.core.models import AgentRegistration, Session

__all__ = ["AgentReads", "MessageReads", "ReadMemo", "forget_reads", "message_reads", "remember_session"]


class AgentReads(Protocol):
    """The store's reads that ``MessageReads`` remembers."""

    async def get_session(self, *, tenant_id: str, session_id: str) -> Session | None: ...

    async def get_agent(self, *, tenant_id: str, instance_id: str) -> AgentRegistration | None: ...

    async def list_agents(self, *, tenant_id: str, agent_type: str = "") -> Sequence[AgentRegistration]: ...


class ReadMemo:
    """What one step of a message's run has read (``message_reads``)."""

    __slots__ = ("agents", "lists", "sessions")

    def __init__(self) -> None:
        self.lists: dict[tuple[str, str], tuple[AgentRegistration, ...]] = {}
        """(tenant, agent type; '' for all) -> the registrations listed."""
        self.agents: dict[tuple[str, str], AgentRegistration | None] = {}
        self.sessions: dict[tuple[str, str], Session | None] = {}

    def clear(self) -> None:
        self.lists.clear()
        self.agents.clear()
        self.sessions.clear()


_MEMO: ContextVar[ReadMemo | None] = ContextVar("svantic_message_reads", default=None)


class message_reads:  # a context manager named as the function it replaced
    """Remember what ``MessageReads`` reads in this task until the block ends (in ``memo``: what
    an earlier block for the same message, such as its routing when sent, remembered).

    A class, not ``@contextmanager``: this is entered twice per message, and the generator
    machinery cost more than the context variable."""

    __slots__ = ("_memo", "_token")

    _token: Token[ReadMemo | None]

    def __init__(self, memo: ReadMemo | None = None) -> None:
        self._memo = memo

    def __enter__(self) -> None:
        memo = self._memo
        self._token = _MEMO.set(memo if memo is not None else ReadMemo())

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _MEMO.reset(self._token)


def remember_session(session: Session) -> None:
    """The session as just stored (with the message that starts the run): read from here on."""
    memo = _MEMO.get()
    if memo is not None:
        memo.sessions[(session.tenant_id, session.session_id)] = session


def forget_reads() -> None:
    """Read from the store again from now on (a dispatch was made, or a human is asked)."""
    memo = _MEMO.get()
    if memo is not None:
        memo.clear()


class MessageReads:
    """The store's reads, each made once per step of a message's run (``message_reads``); outside
    one, every call reads the store."""

    def __init__(self, store: AgentReads) -> None:
        self._store = store

    async def get_session(self, *, tenant_id: str, session_id: str) -> Session | None:
        memo = _MEMO.get()
        key = (tenant_id, session_id)
        if memo is not None and key in memo.sessions:
            return memo.sessions[key]
        session = await self._store.get_session(tenant_id=tenant_id, session_id=session_id)
        if memo is not None:
            memo.sessions[key] = session
        return session

    async def list_agents(self, *, tenant_id: str, agent_type: str = "") -> Sequence[AgentRegistration]:
        memo = _MEMO.get()
        if memo is None:
            return await self._store.list_agents(tenant_id=tenant_id, agent_type=agent_type)
        listed = memo.lists.get((tenant_id, agent_type))
        if listed is None and agent_type and (every := memo.lists.get((tenant_id, ""))) is not None:
            listed = tuple(a for a in every if a.agent_type == agent_type)
        if listed is None:
            listed = tuple(await self._store.list_agents(tenant_id=tenant_id, agent_type=agent_type))
            memo.lists[(tenant_id, agent_type)] = listed
        return listed

    async def get_agent(self, *, tenant_id: str, instance_id: str) -> AgentRegistration | None:
        memo = _MEMO.get()
        if memo is None:
            return await self._store.get_agent(tenant_id=tenant_id, instance_id=instance_id)
        key = (tenant_id, instance_id)
        if key in memo.agents:
            return memo.agents[key]
        for (tenant, agent_type), listed in memo.lists.items():
            if tenant != tenant_id:
                continue
            found = next((a for a in listed if a.instance_id == instance_id), None)
            if found is not None or not agent_type:  # not among all of the tenant's: not registered
                return found
        agent = await self._store.get_agent(tenant_id=tenant_id, instance_id=instance_id)
        memo.agents[key] = agent
        return agent
