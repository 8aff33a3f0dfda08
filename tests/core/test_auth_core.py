"""Secret hashing, scopes and the token issuer, without a server."""

from __future__ import annotations

import functools
from typing import Any

import jwt
import pytest

from svantic_grpc.core.auth import (
    Caller,
    Credential,
    Scope,
    TokenIssuer,
    TokenSettings,
    hash_secret,
    verify_secret,
)
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.errors import InvalidArgument, PermissionDenied, Unauthenticated

KEY = "core-test-signing-key-0123456789abcdef0123"
SECRET = "correct horse battery staple"


@functools.cache
def _hash() -> str:
    return hash_secret(SECRET)  # scrypt is slow on purpose: hash once


class CountingIds:
    """Predictable ids: prefix plus a counter."""

    def __init__(self) -> None:
        self.count = 0

    def new_id(self, prefix: str = "") -> str:
        self.count += 1
        return f"{prefix}{self.count}"


def _issuer(clock: ManualClock, *, key: str = KEY, **settings: Any) -> TokenIssuer:
    credentials = [
        Credential("acme", "acme-full", _hash(), (Scope.FULL, Scope.READ)),
        Credential("acme", "acme-admin", _hash(), (Scope.ADMIN, Scope.FULL, Scope.READ)),
        Credential("globex", "globex-read", _hash(), (Scope.READ,)),
    ]
    return TokenIssuer(
        settings=TokenSettings(signing_key=key, **settings),
        credentials=credentials,
        clock=clock,
        ids=CountingIds(),
    )


def _claims(clock: ManualClock, **changes: Any) -> dict[str, Any]:
    now = int(clock.now())
    claims: dict[str, Any] = {
        "iss": "svantic-grpc",
        "sub": "acme-full",
        "tenant_id": "acme",
        "agent_type": "a2ui-terminal",
        "scopes": ["full"],
        "iat": now,
        "exp": now + 600,
        "jti": "tok_x",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(claims: dict[str, Any], key: str = KEY) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


# Secrets


def test_verify_secret_accepts_the_right_secret_only() -> None:
    assert verify_secret(SECRET, _hash())
    assert not verify_secret("wrong", _hash())
    assert not verify_secret("", _hash())


def test_hashes_are_salted() -> None:
    other = hash_secret(SECRET)
    assert other != _hash()
    assert other.startswith("scrypt$")
    assert verify_secret(SECRET, other)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plaintext",
        "scrypt$16384$8$1$onlyfive",
        "bcrypt$16384$8$1$AAAA$AAAA",
        "scrypt$x$8$1$AAAA$AAAA",
        "scrypt$3$8$1$AAAA$AAAA",  # n not a power of two
        "scrypt$16384$8$1$é$AAAA",  # not base64
        "scrypt$16384$8$1$A$AAAA",  # bad base64 length
        "scrypt$1099511627776$8$1$AAAA$AAAA",  # needs far more memory than allowed
        "scrypt$16384$8$1$AAAA$",  # empty digest
        pytest.param(
            "scrypt$99999999999999999999999$8$1$AAAA$AAAA",
            id="n-too-large-for-c",
        ),
    ],
)
def test_garbage_stored_hash_is_false(stored: str) -> None:
    assert verify_secret(SECRET, stored) is False


# Scopes


@pytest.mark.parametrize(
    ("needed", "granted", "ok"),
    [
        (Scope.READ, [Scope.READ], True),
        (Scope.READ, [Scope.FULL], True),
        (Scope.READ, [Scope.ADMIN], True),
        (Scope.FULL, [Scope.READ], False),
        (Scope.FULL, [Scope.FULL], True),
        (Scope.FULL, [Scope.ADMIN], True),
        (Scope.ADMIN, [Scope.READ, Scope.FULL], False),
        (Scope.ADMIN, [Scope.ADMIN], True),
        (Scope.READ, [], False),
    ],
)
def test_scope_hierarchy(needed: Scope, granted: list[Scope], ok: bool) -> None:
    assert needed.satisfied_by(granted) is ok


def test_caller_require_names_the_missing_scope() -> None:
    caller = Caller("acme", "acme-read", "a2ui-terminal", (Scope.READ,), "tok_1")
    caller.require(Scope.READ)
    with pytest.raises(PermissionDenied) as excinfo:
        caller.require(Scope.FULL)
    assert excinfo.value.reason == "MISSING_SCOPE"
    assert excinfo.value.metadata == {"required_scope": "full"}


# Issuing and verifying


async def test_issue_then_verify_gives_the_caller(clock: ManualClock) -> None:
    issuer = _issuer(clock)
    issued = await issuer.issue(client_id="acme-full", client_secret=SECRET, agent_type="researcher")
    assert issued.token_id == "tok_1"
    assert issued.tenant_id == "acme"
    assert issued.scopes == (Scope.FULL, Scope.READ)
    assert issued.expires_at == int(clock.now()) + 86_400
    assert issuer.verify(issued.token) == Caller(
        tenant_id="acme",
        subject="acme-full",
        agent_type="researcher",
        scopes=(Scope.FULL, Scope.READ),
        token_id="tok_1",
    )
    second = await issuer.issue(client_id="globex-read", client_secret=SECRET, agent_type="writer")
    assert issuer.verify(second.token).tenant_id == "globex"
    assert second.token_id == "tok_2"


async def test_requested_scopes_narrow_the_token(clock: ManualClock) -> None:
    issuer = _issuer(clock)
    issued = await issuer.issue(
        client_id="acme-admin", client_secret=SECRET, agent_type="ops", scopes=["read", "read"]
    )
    assert issued.scopes == (Scope.READ,)
    assert issuer.verify(issued.token).scopes == (Scope.READ,)


async def test_scope_not_held_is_permission_denied(clock: ManualClock) -> None:
    with pytest.raises(PermissionDenied) as excinfo:
        await _issuer(clock).issue(
            client_id="globex-read", client_secret=SECRET, agent_type="writer", scopes=["full"]
        )
    assert excinfo.value.reason == "SCOPE_NOT_GRANTED"


async def test_unknown_scope_name_is_invalid_argument(clock: ManualClock) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        await _issuer(clock).issue(
            client_id="acme-full", client_secret=SECRET, agent_type="writer", scopes=["read", "superuser"]
        )
    assert excinfo.value.field == "scopes"
    assert "superuser" in excinfo.value.message


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"client_id": ""}, "client_id"),
        ({"client_secret": ""}, "client_secret"),
        ({"agent_type": ""}, "agent_type"),
        ({"expires_in": -1}, "expires_in"),
    ],
)
async def test_bad_request_fields_are_named(clock: ManualClock, fields: dict[str, Any], field: str) -> None:
    request: dict[str, Any] = {"client_id": "acme-full", "client_secret": SECRET, "agent_type": "writer"}
    request.update(fields)
    with pytest.raises(InvalidArgument) as excinfo:
        await _issuer(clock).issue(**request)
    assert excinfo.value.field == field


@pytest.mark.parametrize(("client_id", "secret"), [("acme-full", "wrong"), ("nobody", SECRET)])
async def test_bad_credentials_are_unauthenticated(clock: ManualClock, client_id: str, secret: str) -> None:
    with pytest.raises(Unauthenticated) as excinfo:
        await _issuer(clock).issue(client_id=client_id, client_secret=secret, agent_type="writer")
    assert excinfo.value.reason == "BAD_CREDENTIALS"


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [(0, 3_600), (60, 60), (7_200, 7_200), (7_201, 7_200), (10**9, 7_200)],
)
async def test_lifetime_defaults_and_is_capped(clock: ManualClock, expires_in: int, lifetime: int) -> None:
    issuer = _issuer(clock, default_ttl_s=3_600, max_ttl_s=7_200)
    issued = await issuer.issue(
        client_id="acme-full", client_secret=SECRET, agent_type="writer", expires_in=expires_in
    )
    claims = jwt.decode(issued.token, KEY, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["exp"] - claims["iat"] == lifetime
    assert issued.expires_at == claims["exp"]


async def test_token_expires_by_the_injected_clock(clock: ManualClock) -> None:
    issuer = _issuer(clock)
    issued = await issuer.issue(client_id="acme-full", client_secret=SECRET, agent_type="w", expires_in=60)
    clock.advance(59)
    assert issuer.verify(issued.token).subject == "acme-full"
    clock.advance(1)
    with pytest.raises(Unauthenticated) as excinfo:
        issuer.verify(issued.token)
    assert excinfo.value.reason == "TOKEN_EXPIRED"


async def test_token_signed_with_another_key_is_rejected(clock: ManualClock) -> None:
    other = _issuer(clock, key="another-signing-key-0123456789abcdef0123")
    issued = await other.issue(client_id="acme-full", client_secret=SECRET, agent_type="w")
    with pytest.raises(Unauthenticated) as excinfo:
        _issuer(clock).verify(issued.token)
    assert excinfo.value.reason == "INVALID_TOKEN"


def test_unsigned_token_is_rejected(clock: ManualClock) -> None:
    token = jwt.encode(_claims(clock, scopes=["admin"]), "", algorithm="none")
    with pytest.raises(Unauthenticated) as excinfo:
        _issuer(clock).verify(token)
    assert excinfo.value.reason == "INVALID_TOKEN"


def test_token_from_another_issuer_is_rejected(clock: ManualClock) -> None:
    with pytest.raises(Unauthenticated):
        _issuer(clock).verify(_sign(_claims(clock, iss="someone-else")))


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c", "Bearer x.y.z"])
def test_malformed_token_is_rejected(clock: ManualClock, token: str) -> None:
    with pytest.raises(Unauthenticated):
        _issuer(clock).verify(token)


def test_a_well_formed_token_verifies(clock: ManualClock) -> None:
    caller = _issuer(clock).verify(_sign(_claims(clock)))
    assert caller == Caller("acme", "acme-full", "a2ui-terminal", (Scope.FULL,), "tok_x")


@pytest.mark.parametrize(
    "claims",
    [
        {"tenant_id": 5},
        {"tenant_id": ""},
        {"tenant_id": ["acme"]},
        {"sub": ""},
        {"sub": {"name": "x"}},
        {"jti": 7},
        {"agent_type": ["w"]},
        {"exp": "9999999999"},
        {"iat": True},
    ],
    ids=lambda c: ",".join(f"{k}={v!r}" for k, v in c.items()),
)
def test_a_token_under_the_right_key_with_claims_this_server_never_issues_is_rejected(
    clock: ManualClock, claims: dict[str, Any]
) -> None:
    # found from outside: such tokens were accepted and made sessions in tenants named "5", ""
    # and "['acme']"
    with pytest.raises(Unauthenticated) as excinfo:
        _issuer(clock).verify(_sign(_claims(clock, **claims)))
    assert excinfo.value.reason == "INVALID_TOKEN"


@pytest.mark.parametrize("missing", ["exp", "iat", "sub", "jti", "iss", "tenant_id"])
def test_token_missing_a_claim_is_rejected(clock: ManualClock, missing: str) -> None:
    with pytest.raises(Unauthenticated):
        _issuer(clock).verify(_sign(_claims(clock, **{missing: None})))


@pytest.mark.parametrize(
    "scopes",
    [
        "full",
        5,
        ["full", "root"],
        [["full"]],
        pytest.param(
            {"admin": True},
            id="object",
        ),
        pytest.param(
            "",
            id="empty-string",
        ),
    ],
)
def test_token_with_malformed_scopes_is_rejected(clock: ManualClock, scopes: Any) -> None:
    with pytest.raises(Unauthenticated):
        _issuer(clock).verify(_sign(_claims(clock, scopes=scopes)))


@pytest.mark.parametrize("exp", ["tomorrow", [1]])
def test_token_with_non_numeric_exp_is_unauthenticated(clock: ManualClock, exp: Any) -> None:
    with pytest.raises(Unauthenticated):
        _issuer(clock).verify(_sign(_claims(clock, exp=exp)))
