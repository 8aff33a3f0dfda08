"""A token whose ``iat`` lies in the future is refused beyond a small clock-skew leeway."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from svantic_grpc.config import parse_settings, resolve_auth
from svantic_grpc.core.auth import TokenIssuer, TokenSettings
from svantic_grpc.core.clock import ManualClock, UuidGenerator
from svantic_grpc.core.errors import Unauthenticated

KEY = "iat-test-signing-key-0123456789abcdef0123"


def _issuer(clock: ManualClock, **settings: Any) -> TokenIssuer:
    return TokenIssuer(
        settings=TokenSettings(signing_key=KEY, **settings), credentials=(), clock=clock, ids=UuidGenerator()
    )


def _token(clock: ManualClock, *, issued_in: int) -> str:
    now = int(clock.now())
    claims = {
        "iss": "svantic-grpc",
        "sub": "acme-full",
        "tenant_id": "acme",
        "agent_type": "a2ui-terminal",
        "scopes": ["full"],
        "iat": now + issued_in,
        "exp": now + issued_in + 3600,
        "jti": f"tok_{issued_in}",
    }
    return jwt.encode(claims, KEY, algorithm="HS256")


def test_a_token_issued_an_hour_ahead_is_refused(clock: ManualClock) -> None:
    with pytest.raises(Unauthenticated) as excinfo:
        _issuer(clock).verify(_token(clock, issued_in=3600))
    assert excinfo.value.reason == "TOKEN_NOT_YET_VALID"
    assert "future" in excinfo.value.message


def test_a_token_within_the_default_leeway_is_accepted(clock: ManualClock) -> None:
    caller = _issuer(clock).verify(_token(clock, issued_in=60))
    assert caller.tenant_id == "acme"


def test_just_beyond_the_leeway_is_refused_until_the_clock_catches_up(clock: ManualClock) -> None:
    issuer = _issuer(clock)
    token = _token(clock, issued_in=61)
    with pytest.raises(Unauthenticated):
        issuer.verify(token)
    clock.advance(1)
    assert issuer.verify(token).subject == "acme-full"


def test_the_leeway_is_a_setting(clock: ManualClock) -> None:
    settings = parse_settings({"auth": {"clock_skew_s": 5}})
    tokens = resolve_auth(settings, env={"SVANTIC_SIGNING_KEY": KEY}).tokens
    assert tokens.clock_skew_s == 5
    issuer = TokenIssuer(settings=tokens, credentials=(), clock=clock, ids=UuidGenerator())
    with pytest.raises(Unauthenticated):
        issuer.verify(_token(clock, issued_in=6))
    assert issuer.verify(_token(clock, issued_in=5)).subject == "acme-full"
