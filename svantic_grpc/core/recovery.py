"""Recovery of sessions: at start-up, and when a replica takes over sessions whose owner died.

Both follow the same rules (the correctness issue's): messages that were running end as
failed (what they asked a human is withdrawn first), messages waiting for a human wait again,
requests nothing waits for are withdrawn, the expiries and idle TTLs are armed again, and each
session is paused exactly when something in it is pending. Only the sessions this process owns
are recovered (``core.ownership``): with one process that is all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from typing import TypeVar

from svantic_grpc.core.inputs.model import GRANTING_DECISIONS, InputRequest, InputState
from svantic_grpc.core.inputs.service import Inputs
from svantic_grpc.core.messages.model import Message, MessageState
from svantic_grpc.core.messages.service import Messages
from svantic_grpc.core.models import Session, SessionStatus
from svantic_grpc.core.ownership import Ownership, SessionKey
from svantic_grpc.core.sessions import Sessions
from svantic_grpc.core.store import Store

__all__ = ["Recovery"]

_log = logging.getLogger(__name__)


class Recovery:
    """Brings the work of sessions this process now owns back to where the rules say."""

    def __init__(
        self, *, store: Store, sessions: Sessions, messages: Messages, inputs: Inputs, ownership: Ownership
    ) -> None:
        self._store = store
        self._sessions = sessions
        self._messages = messages
        self._inputs = inputs
        self._ownership = ownership

    async def at_start_up(self) -> tuple[int, int]:
        """Recover every open session whose lease this process gets (all, with one process);
        returns how many messages were (interrupted, resumed)."""
        if self._ownership.sole:  # everything: the store's own scans, as before replicas existed
            return await self._recover(None, set())
        sessions = await self._store.open_sessions()
        mine, handed = await self._ownership.claim({(s.tenant_id, s.session_id) for s in sessions})
        return await self._recover(
            _Work(
                sessions=[s for s in sessions if (s.tenant_id, s.session_id) in mine],
                messages=_of(mine, await self._store.unfinished_messages()),
                pending=_of(mine, await self._store.pending_inputs()),
                granting=_of(mine, await self._store.granting_inputs()),
            ),
            handed,
        )

    async def take_over(self, keys: Set[SessionKey], handed: Set[tuple[str, str, str]]) -> None:
        """Sessions whose lease was just taken from a replica that died (or stopped): read session
        by session, so the cost follows what is taken over, not what the store holds."""
        work = _Work()
        for tenant_id, session_id in sorted(keys):
            session = await self._store.get_session(tenant_id=tenant_id, session_id=session_id)
            if session is None or session.status is SessionStatus.CLOSED:
                continue
            work.sessions.append(session)
            work.messages.extend(await self._messages_of(tenant_id, session_id))
            work.pending.extend(await self._inputs_of(tenant_id, session_id, InputState.PENDING))
            resolved = await self._inputs_of(tenant_id, session_id, InputState.RESOLVED)
            work.granting.extend(
                r
                for r in resolved
                if r.resolution is not None and r.resolution.decision in GRANTING_DECISIONS
            )
        interrupted, resumed = await self._recover(work, handed, announce=True)
        for tenant_id, session_id in sorted(keys):  # outcomes the dead replica may not have told
            await self._inputs.tell_untold(tenant_id, session_id)
        _log.info(
            "took over %d session(s): %d message(s) interrupted, %d waiting for a human again, %d handed on",
            len(keys),
            interrupted,
            resumed,
            len(handed),
        )

    async def _recover(
        self, work: _Work | None, handed: Set[tuple[str, str, str]], *, announce: bool = False
    ) -> tuple[int, int]:
        # Order matters: messages that were running end first (with their pending requests), then
        # requests nothing waits for are withdrawn, then each session's status follows what is pending.
        if work is None:
            await self._sessions.recover()
            counts = await self._messages.recover()
            await self._inputs.recover()
            await self._sessions.settle_statuses()
            return counts
        if not work.sessions:
            return 0, 0
        await self._sessions.recover(sessions=work.sessions)
        counts = await self._messages.recover(messages=work.messages, handed=handed)
        await self._inputs.recover(pending=work.pending, granting=work.granting, announce=announce)
        still: list[InputRequest] = []
        for session in work.sessions:  # what recovery left pending, read again
            still.extend(await self._inputs_of(session.tenant_id, session.session_id, InputState.PENDING))
        await self._sessions.settle_statuses(sessions=work.sessions, pending=still)
        return counts

    async def _messages_of(self, tenant_id: str, session_id: str) -> list[Message]:
        found: list[Message] = []
        cursor = ""
        while True:
            page = await self._store.list_messages(
                tenant_id=tenant_id, session_id=session_id, states=_UNFINISHED, page_size=500, cursor=cursor
            )
            found.extend(page.messages)
            if not (cursor := page.next_cursor):
                return found

    async def _inputs_of(self, tenant_id: str, session_id: str, state: InputState) -> list[InputRequest]:
        found: list[InputRequest] = []
        cursor = ""
        while True:
            page = await self._store.list_inputs(
                tenant_id=tenant_id, session_id=session_id, states=(state,), page_size=500, cursor=cursor
            )
            found.extend(page.requests)
            if not (cursor := page.next_cursor):
                return found


_UNFINISHED = tuple(s for s in MessageState if not s.terminal)

_T = TypeVar("_T", Message, InputRequest)


def _of(keys: Set[SessionKey], records: Sequence[_T]) -> list[_T]:
    return [r for r in records if (r.tenant_id, r.session_id) in keys]


@dataclass
class _Work:
    """What recovery acts on, for the sessions it recovers."""

    sessions: list[Session] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    """Unfinished, oldest first."""
    pending: list[InputRequest] = field(default_factory=list)
    granting: list[InputRequest] = field(default_factory=list)
    """Approvals answered for the session or for always."""
