"""Dispatch tokens: the bytes PyJWT makes for the same claims, and they verify with the JWKS."""

from __future__ import annotations

import jwt
import pytest

from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.dispatch import DispatchTokens


@pytest.mark.parametrize("session_id", ["s1", "séance-ünïcode", 'quote"and\\slash'])
def test_a_dispatch_token_is_what_pyjwt_makes_of_its_claims(session_id: str) -> None:
    clock = ManualClock()
    tokens = DispatchTokens(clock=clock, issuer="svantic-grpc", ttl_s=300)
    token, expires = tokens.sign(
        tenant_id="acme", agent_type="echo", instance_id="echo-1", session_id=session_id, dispatch_id="dsp_1"
    )
    now = int(clock.now())
    claims = {
        "iss": "svantic-grpc",
        "aud": "echo-1",
        "sub": "echo",
        "tenant_id": "acme",
        "agent_type": "echo",
        "session_id": session_id,
        "dispatch_id": "dsp_1",
        "jti": "dsp_1",
        "iat": now,
        "exp": now + 300,
    }
    assert token == jwt.encode(claims, tokens._key, algorithm="EdDSA", headers={"kid": tokens.key_id})
    assert expires == now + 300
    key = jwt.PyJWKSet.from_dict(tokens.jwks())[tokens.key_id].key
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": tokens.key_id, "typ": "JWT"}
    assert (
        jwt.decode(token, key, algorithms=["EdDSA"], audience="echo-1", options={"verify_exp": False})
        == claims
    )
