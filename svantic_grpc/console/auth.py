"""Console sign-in: a tenant credential for a browser, good on every replica.

Sign-in checks ``client_id``/``client_secret`` exactly like ``GetToken`` (it calls the
same ``TokenIssuer.issue``, so the same limit of failed attempts per client id and per
browser address holds). The browser then holds a signed login (a JWT under a key derived
from the mesh's token signing key, for the console's audience only) in an ``HttpOnly``,
``SameSite=Strict`` cookie: any replica configured with the same signing key knows it,
and it is no bearer token for the gRPC API. Every state-changing request must also carry
the login's CSRF token, derived from the login under the same key.

Signing out is kept in the store (a small record naming the login, with the login's expiry),
so a copied cookie is worthless from then on, on every replica. Each sign-out also deletes the
records of logins that have expired since (their cookies are refused for their age): the store
holds a record only for a signed-out login that would otherwise still be good.
"""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass
from typing import Any

import jwt

from svantic_grpc.core.auth import Caller, Scope, TokenIssuer, parse_scopes
from svantic_grpc.core.clock import Clock
from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.store import Store

__all__ = ["COOKIE", "ConsoleLogin", "ConsoleLogins"]

COOKIE = "svantic_console"
_AUDIENCE = "svantic-console"
_ALGORITHM = "HS256"
_ADAPTER = "console"
"""Where signed-out logins are kept among the store's adapter values."""
_DECODED_CACHE = 1_000


@dataclass(frozen=True)
class ConsoleLogin:
    """One signed-in browser: who it is and the CSRF token its forms carry."""

    caller: Caller
    csrf: str
    expires_at: float

    @property
    def can_answer(self) -> bool:
        """Whether the credential may answer requests (the ``full`` scope), not only read them."""
        return Scope.FULL.satisfied_by(self.caller.scopes)

    def csrf_ok(self, presented: str) -> bool:
        return bool(presented) and hmac.compare_digest(presented.encode(), self.csrf.encode())


class ConsoleLogins:
    """Signed-in browsers, by cookie value; the same on every replica sharing the signing key and store."""

    def __init__(self, *, tokens: TokenIssuer, store: Store, clock: Clock, ttl_s: int = 12 * 3600) -> None:
        self._tokens = tokens
        self._store = store
        self._clock = clock
        self._ttl_s = ttl_s
        self._key = tokens.derived_key("console login")
        self._decoded: dict[str, ConsoleLogin] = {}

    async def sign_in(
        self, client_id: str, client_secret: str, *, peer: str = ""
    ) -> tuple[str, ConsoleLogin]:
        """A new login (its cookie value and what it holds) for a valid credential; raises what
        ``GetToken`` raises otherwise.

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
        claims: dict[str, Any] = {
            "aud": _AUDIENCE,
            "sub": caller.subject,
            "tenant_id": caller.tenant_id,
            "scopes": [s.value for s in caller.scopes],
            "jti": caller.token_id,
            "exp": int(issued.expires_at),
        }
        cookie = jwt.encode(claims, self._key, algorithm=_ALGORITHM)
        return cookie, self._login(caller, float(claims["exp"]))

    async def get(self, cookie: str) -> ConsoleLogin | None:
        """The login a cookie holds, or ``None`` (none, forged, expired or signed out)."""
        login = self._decode(cookie)
        if login is None or login.expires_at <= self._clock.now():
            return None
        if await self._store.get_adapter_value(_ADAPTER, _signed_out(login)) is not None:
            return None
        return login

    async def sign_out(self, cookie: str) -> None:
        """Every replica refuses the cookie from now on."""
        login = self._decode(cookie)
        if login is not None:
            await self._store.put_adapter_value(
                _ADAPTER, _signed_out(login), {"expires_at": login.expires_at}
            )
            await self._store.purge_expired_adapter_values(_ADAPTER, before=self._clock.now())

    def _decode(self, cookie: str) -> ConsoleLogin | None:
        if not cookie:
            return None
        login = self._decoded.get(cookie)
        if login is not None:
            return login
        try:
            claims = jwt.decode(
                cookie,
                self._key,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                options={"require": ["aud", "sub", "tenant_id", "scopes", "jti", "exp"], "verify_exp": False},
            )
            caller = Caller(
                tenant_id=str(claims["tenant_id"]),
                subject=str(claims["sub"]),
                agent_type="console",
                scopes=parse_scopes(claims["scopes"]),
                token_id=str(claims["jti"]),
            )
            login = self._login(caller, float(claims["exp"]))
        except (jwt.InvalidTokenError, InvalidArgument, KeyError, TypeError, ValueError):
            return None  # forged, from another key, or malformed: not signed in
        if len(self._decoded) >= _DECODED_CACHE:
            del self._decoded[next(iter(self._decoded))]
        self._decoded[cookie] = login
        return login

    def _login(self, caller: Caller, expires_at: float) -> ConsoleLogin:
        mac = hmac.new(self._key, b"csrf " + caller.token_id.encode(), "sha256").digest()
        return ConsoleLogin(
            caller=caller, csrf=base64.urlsafe_b64encode(mac).decode().rstrip("="), expires_at=expires_at
        )


def _signed_out(login: ConsoleLogin) -> str:
    return f"signed-out:{login.caller.token_id}"
