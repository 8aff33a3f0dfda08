"""Console sign-in: a tenant credential for a server-side browser session.

Sign-in checks ``client_id``/``client_secret`` exactly like ``GetToken`` (it calls the
same ``TokenIssuer.issue``, so the same limit of failed attempts per client id and per
browser address holds) and keeps the verified ``Caller`` in memory under a random
id. The browser holds only that id, in an ``HttpOnly``, ``SameSite=Strict`` cookie;
every state-changing request must also carry the session's CSRF token. Sign-out
forgets the id, so the cookie is worthless from then on even if it was copied.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from svantic_grpc.core.auth import Caller, TokenIssuer
from svantic_grpc.core.clock import Clock

__all__ = ["COOKIE", "ConsoleLogin", "ConsoleLogins"]

COOKIE = "svantic_console"
_MAX_LOGINS = 10_000


@dataclass(frozen=True)
class ConsoleLogin:
    """One signed-in browser: who it is and the CSRF token its forms carry."""

    caller: Caller
    csrf: str
    expires_at: float

    def csrf_ok(self, presented: str) -> bool:
        return bool(presented) and hmac.compare_digest(presented.encode(), self.csrf.encode())


class ConsoleLogins:
    """Signed-in browsers of this process, by cookie value."""

    def __init__(self, *, tokens: TokenIssuer, clock: Clock, ttl_s: int = 12 * 3600) -> None:
        self._tokens = tokens
        self._clock = clock
        self._ttl_s = ttl_s
        self._logins: dict[str, ConsoleLogin] = {}

    async def sign_in(
        self, client_id: str, client_secret: str, *, peer: str = ""
    ) -> tuple[str, ConsoleLogin]:
        """A new login for a valid credential; raises what ``GetToken`` raises otherwise.

        ``peer`` is the browser's address, for the limit of failed attempts per address.
        """
        issued = await self._tokens.issue(
            client_id=client_id,
            client_secret=client_secret,
            agent_type="console",
            expires_in=self._ttl_s,
            peer=peer,
        )
        caller = self._tokens.verify(issued.token)
        login = ConsoleLogin(caller=caller, csrf=secrets.token_urlsafe(32), expires_at=issued.expires_at)
        if len(self._logins) >= _MAX_LOGINS:
            self._sweep()
            if len(self._logins) >= _MAX_LOGINS:
                del self._logins[next(iter(self._logins))]
        sid = secrets.token_urlsafe(32)
        self._logins[sid] = login
        return sid, login

    def get(self, sid: str) -> ConsoleLogin | None:
        login = self._logins.get(sid) if sid else None
        if login is None:
            return None
        if login.expires_at <= self._clock.now():
            self._logins.pop(sid, None)
            return None
        return login

    def sign_out(self, sid: str) -> None:
        self._logins.pop(sid, None)

    def _sweep(self) -> None:
        now = self._clock.now()
        for sid in [s for s, login in self._logins.items() if login.expires_at <= now]:
            del self._logins[sid]
