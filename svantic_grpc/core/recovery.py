"""Recovery of sessions: at start-up, and when a replica takes over sessions whose owner died.

Both follow the same rules (the correctness issue's): messages that were running end as
failed (what they asked a human is withdrawn first), messages waiting for a human wait again,
requests nothing waits for are withdrawn, the expiries and idle TTLs are armed again, and each
session is paused exactly when something in it is pending. Only the sessions this process owns
are recovered (``core.ownership``): with one process that is all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Set

from svantic_grpc.core.inputs.service import Inputs
from svantic_grpc.core.messages.service import Messages
from svantic_grpc.core.ownership import Ownership, SessionKey
from svantic_grpc.core.sessions import Sessions
from svantic_grpc.core.store import Store

__all__ = ["Recovery"]

_log = logging.getLogger(__name__)

Only = Callable[[str, str], bool] | None


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
        if self._ownership.sole:
            return await self._recover(None, set())
        keys = {(s.tenant_id, s.session_id) for s in await self._store.open_sessions()}
        mine, handed = await self._ownership.claim(keys)
        return await self._recover(mine, handed)

    async def take_over(self, keys: Set[SessionKey], handed: Set[tuple[str, str, str]]) -> None:
        """Sessions whose lease was just taken from a replica that died (or stopped)."""
        interrupted, resumed = await self._recover(keys, handed)
        _log.info(
            "took over %d session(s): %d message(s) interrupted, %d waiting for a human again, %d handed on",
            len(keys),
            interrupted,
            resumed,
            len(handed),
        )

    async def _recover(
        self, keys: Set[SessionKey] | None, handed: Set[tuple[str, str, str]]
    ) -> tuple[int, int]:
        only: Only = None if keys is None else (lambda tenant, session: (tenant, session) in keys)
        if keys is not None and not keys:
            return 0, 0
        # Order matters: messages that were running end first (with their pending requests), then
        # requests nothing waits for are withdrawn, then each session's status follows what is pending.
        await self._sessions.recover(only=only)
        counts = await self._messages.recover(only=only, handed=handed)
        await self._inputs.recover(only=only)
        await self._sessions.settle_statuses(only=only)
        return counts
