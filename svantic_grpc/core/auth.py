"""Credentials, tokens and the caller they identify.

Secrets are stored as scrypt hashes; tokens are HS256 JWTs made with PyJWT. A
token names its tenant, so every core call scopes itself with ``Caller.tenant_id``.
A secret pays scrypt once per process, and failed attempts are limited per client id
and per peer (``auth_guard`` says how).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from svantic_grpc.core._validate import check_agent_type
from svantic_grpc.core.auth_guard import AttemptLimit, SignInLimits, VerifiedSecrets, address_key
from svantic_grpc.core.clock import Clock, IdGenerator
from svantic_grpc.core.errors import InvalidArgument, PermissionDenied, Unauthenticated

__all__ = [
    "AttemptLimit",
    "Caller",
    "Credential",
    "Scope",
    "TokenIssuer",
    "TokenSettings",
    "hash_secret",
    "parse_scopes",
    "verify_secret",
]

_ALGORITHM = "HS256"
_FAILED_PER_CLIENT = AttemptLimit(burst=10, refill_s=30.0)
_FAILED_PER_PEER = AttemptLimit(burst=20, refill_s=1.0)
_VERIFIED_CACHE_SIZE = 10_000
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


class Scope(enum.Enum):
    """What a token may do. ``read`` reads; ``full`` also writes; ``admin`` does everything."""

    READ = "read"
    FULL = "full"
    ADMIN = "admin"

    __hash__ = object.__hash__  # by identity, as MessageState's (Enum's own hashes the name in Python)

    def satisfied_by(self, granted: Iterable[Scope]) -> bool:
        """True when any granted scope covers this one."""
        needed = _RANK[self]
        return any(_RANK[g] >= needed for g in granted)


_RANK = {Scope.READ: 0, Scope.FULL: 1, Scope.ADMIN: 2}
"""What each scope covers (``Scope.satisfied_by``; checked on every call)."""


def hash_secret(secret: str, *, cost: int = _SCRYPT_N) -> str:
    """A salted scrypt hash of ``secret``, as stored in settings.json.

    ``cost`` is scrypt's N (a power of two); the default suits production, tests
    may lower it. The hash records its parameters, so verification needs no setting.
    """
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=cost, r=_SCRYPT_R, p=_SCRYPT_P)
    encode = base64.urlsafe_b64encode
    return f"scrypt${cost}${_SCRYPT_R}${_SCRYPT_P}${encode(salt).decode()}${encode(digest).decode()}"


def verify_secret(secret: str, stored: str) -> bool:
    """True when ``secret`` matches a hash made by ``hash_secret`` (constant time)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.urlsafe_b64decode(digest)
        actual = hashlib.scrypt(
            secret.encode(), salt=base64.urlsafe_b64decode(salt), n=int(n), r=int(r), p=int(p)
        )
    except (ValueError, TypeError, OverflowError):
        return False  # not a hash we made (or parameters scrypt refuses)
    return hmac.compare_digest(actual, expected)


@dataclass(frozen=True)
class Credential:
    """A client id, its hashed secret, its tenant and the scopes it may hold."""

    tenant_id: str
    client_id: str
    secret_hash: str
    scopes: tuple[Scope, ...] = (Scope.FULL,)


@dataclass(frozen=True)
class Caller:
    """Who is calling: decoded from a verified token."""

    tenant_id: str
    subject: str
    agent_type: str
    scopes: tuple[Scope, ...]
    token_id: str

    def require(self, scope: Scope) -> None:
        """Raise ``PermissionDenied`` unless the caller holds ``scope``."""
        if scope in self.scopes:  # held as it is (most calls): no ranks to compare
            return
        if not scope.satisfied_by(self.scopes):
            held = ", ".join(s.value for s in self.scopes) or "none"
            raise PermissionDenied(
                f"this call needs the {scope.value!r} scope; the token has {held}",
                reason="MISSING_SCOPE",
                metadata={"required_scope": scope.value},
            )


@dataclass(frozen=True)
class TokenSettings:
    """How tokens are signed and how long they live."""

    signing_key: str
    issuer: str = "svantic-grpc"
    default_ttl_s: int = 86_400
    max_ttl_s: int = 7 * 86_400
    clock_skew_s: int = 60
    """How far in the future a token's ``iat`` may lie (clocks of signers drift) before it is refused."""
    failed_per_client: AttemptLimit = _FAILED_PER_CLIENT
    """Failed ``GetToken`` attempts one client id may make (from peers it never signed in from)."""
    failed_per_peer: AttemptLimit = _FAILED_PER_PEER
    """Failed ``GetToken`` attempts one peer (an IPv4 address, an IPv6 /64) may make."""


@dataclass(frozen=True)
class IssuedToken:
    """A token and what it grants."""

    token: str
    token_id: str
    tenant_id: str
    scopes: tuple[Scope, ...]
    expires_at: float


class TokenIssuer:
    """Checks credentials, mints tokens, and verifies them."""

    def __init__(
        self,
        *,
        settings: TokenSettings,
        credentials: Iterable[Credential],
        clock: Clock,
        ids: IdGenerator,
    ) -> None:
        self._settings = settings
        self._credentials: Mapping[str, Credential] = {c.client_id: c for c in credentials}
        self._clock = clock
        self._ids = ids
        self._secrets = VerifiedSecrets(verify_secret)
        self._limits = SignInLimits(
            per_client=settings.failed_per_client, per_peer=settings.failed_per_peer, clock=clock
        )
        # Verified tokens -> (caller, issued at, expiry). A token is immutable, so its signature needs
        # checking once; expiry is still checked on every call. Bounded: oldest dropped first.
        self._verified: dict[str, tuple[Caller, float, float]] = {}

    async def issue(
        self,
        *,
        client_id: str,
        client_secret: str,
        agent_type: str,
        expires_in: int = 0,
        scopes: Iterable[str] = (),
        peer: str = "",
    ) -> IssuedToken:
        """A token for a valid credential.

        ``peer`` is the caller's network address (host only), for the per-peer limit of
        failed attempts; empty when the transport cannot tell.

        Raises:
            InvalidArgument: a field is missing or out of range.
            ResourceExhausted: too many failed attempts for this client id or from this
                peer; ``retry_after_s`` says when to try again.
            Unauthenticated: the credential is unknown or the secret is wrong.
            PermissionDenied: a requested scope is not held by the credential.
        """
        if not client_id:
            raise InvalidArgument("client_id", "is required")
        if not client_secret:
            raise InvalidArgument("client_secret", "is required")
        if not agent_type:
            raise InvalidArgument("agent_type", "is required (for example 'a2ui-terminal')")
        # it travels in every call's token and names the caller's joins: never an internal agent's
        check_agent_type("agent_type", agent_type)
        if expires_in < 0:
            raise InvalidArgument("expires_in", "must be 0 (server default) or a positive number of seconds")
        requested = parse_scopes(scopes)
        credential = self._credentials.get(client_id)
        holds = await self._secret_holds(client_id, client_secret, credential, address_key(peer))
        if credential is None or not holds:
            raise Unauthenticated("unknown client_id or wrong client_secret", reason="BAD_CREDENTIALS")
        granted = requested or credential.scopes
        missing = [s.value for s in granted if s not in credential.scopes]
        if missing:
            raise PermissionDenied(
                f"the credential does not hold scope(s) {', '.join(missing)}", reason="SCOPE_NOT_GRANTED"
            )
        lifetime = min(expires_in or self._settings.default_ttl_s, self._settings.max_ttl_s)
        now = self._clock.now()
        token_id = self._ids.new_id("tok_")
        claims: dict[str, Any] = {
            "iss": self._settings.issuer,
            "sub": client_id,
            "tenant_id": credential.tenant_id,
            "agent_type": agent_type,
            "scopes": [s.value for s in granted],
            "iat": int(now),
            "exp": int(now) + lifetime,
            "jti": token_id,
        }
        token = jwt.encode(claims, self._settings.signing_key, algorithm=_ALGORITHM)
        return IssuedToken(token, token_id, credential.tenant_id, tuple(granted), float(claims["exp"]))

    def derived_key(self, purpose: str) -> bytes:
        """A key for ``purpose`` derived from the token signing key (HMAC-SHA256 of the purpose).

        Every replica configured with the same signing key derives the same key, and nothing
        signed with it is a token: a token never verifies under a derived key, nor the reverse.
        """
        return hmac.new(
            self._settings.signing_key.encode(), b"svantic-grpc derived key: " + purpose.encode(), "sha256"
        ).digest()

    def replace_credentials(self, credentials: Iterable[Credential]) -> None:
        """Use ``credentials`` from now on (a rotated secret, a removed client).

        Tokens already issued stay valid until they expire. A secret verified before is
        verified by scrypt again when its stored hash changed.
        """
        self._credentials = {c.client_id: c for c in credentials}

    async def _secret_holds(
        self, client_id: str, secret: str, credential: Credential | None, peer: str
    ) -> bool:
        """True when ``secret`` is the credential's, paying scrypt only for an attempt not verified before.

        Refused attempts cost nothing; every other wrong secret costs one scrypt, for an
        unknown client id too (against a dummy hash), so timing tells no id apart.
        """
        stored = credential.secret_hash if credential else _DUMMY_HASH
        digest = self._secrets.digest(client_id, secret, stored)
        self._limits.check(client_id, peer)
        if credential is not None and self._secrets.known(client_id, digest):
            return True
        if self._secrets.in_flight(digest):  # the same attempt is being checked: share its answer
            return await self._secrets.verify(secret, stored, digest) and credential is not None
        self._limits.attempt(client_id, peer)
        if not await self._secrets.verify(secret, stored, digest) or credential is None:
            return False
        self._limits.succeeded(client_id, peer)
        self._secrets.remember(client_id, digest)
        return True

    def verify(self, token: str) -> Caller:
        """The caller a token identifies.

        Raises:
            Unauthenticated: malformed, wrongly signed, unsigned, expired,
                issued in the future (beyond the clock-skew leeway) or
                missing claims.
        """
        verified = self._verified.get(token)
        if verified is None:
            verified = self._decode(token)
            if len(self._verified) >= _VERIFIED_CACHE_SIZE:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = verified
        caller, issued, expires = verified
        # Times are checked against the injected clock, not the wall clock, on every call.
        now = self._clock.now()
        if expires <= now:
            raise Unauthenticated("token expired; get a new one with GetToken", reason="TOKEN_EXPIRED")
        if issued > now + self._settings.clock_skew_s:
            raise Unauthenticated(
                "token issued in the future (iat is ahead of the server's clock); check the signer's clock",
                reason="TOKEN_NOT_YET_VALID",
            )
        return caller

    def verify_for_stream(self, token: str) -> tuple[Caller, float]:
        """``verify``, and the seconds the token has left by this issuer's clock: a stream opened
        with it ends then, as a new call with it would be refused."""
        caller = self.verify(token)
        expires = self._verified[token][2]  # just verified: in the cache
        return caller, expires - self._clock.now()

    def _decode(self, token: str) -> tuple[Caller, float, float]:
        try:
            claims = jwt.decode(
                token,
                self._settings.signing_key,
                algorithms=[_ALGORITHM],
                issuer=self._settings.issuer,
                options={
                    "require": ["exp", "iat", "sub", "jti", "iss", "tenant_id", "scopes"],
                    "verify_exp": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}", reason="INVALID_TOKEN") from exc
        try:
            # Only what this server issues is accepted: even under the right key, a claim of
            # another type (a tenant ``5`` or ``["acme"]``, an ``exp`` written as a string) or an
            # empty name is no token of its.
            expires, issued = claims["exp"], claims["iat"]
            if not all(type(n) in (int, float) and math.isfinite(n) for n in (expires, issued)):
                raise TypeError("exp and iat must be numbers")
            scopes = claims["scopes"]
            if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
                raise TypeError("scopes must be a list of strings")
            tenant_id, subject, token_id = claims["tenant_id"], claims["sub"], claims["jti"]
            agent_type = claims.get("agent_type", "")
            if not all(isinstance(c, str) and c for c in (tenant_id, subject, token_id)):
                raise TypeError("tenant_id, sub and jti must be non-empty strings")
            if not isinstance(agent_type, str):
                raise TypeError("agent_type must be a string")
            caller = Caller(
                tenant_id=tenant_id,
                subject=subject,
                agent_type=agent_type,
                scopes=parse_scopes(scopes),
                token_id=token_id,
            )
        except (KeyError, InvalidArgument, TypeError, ValueError) as exc:
            raise Unauthenticated("token claims are malformed", reason="INVALID_TOKEN") from exc
        return caller, float(issued), float(expires)


def parse_scopes(values: Iterable[str]) -> tuple[Scope, ...]:
    """Scopes by their names, once each; ``InvalidArgument`` names an unknown one."""
    scopes: list[Scope] = []
    for value in values:
        try:
            scope = Scope(value)
        except ValueError:
            raise InvalidArgument("scopes", f"unknown scope {value!r}; use read, full or admin") from None
        if scope not in scopes:
            scopes.append(scope)
    return tuple(scopes)


_DUMMY_HASH = hash_secret(os.urandom(16).hex())
