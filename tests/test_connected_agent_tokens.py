"""The connected helper's check of a dispatch token (``verify_dispatches=True``): a token the mesh
signed for this instance is still refused when it names another dispatch or another session
(found from outside: a token did not bind the session it was made for)."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from svantic_grpc.connected_agent import ConnectedAgent
from svantic_grpc.pb import registry_service_pb2


async def _nothing(*_: object) -> None:
    return None


def _agent_and_signer() -> tuple[ConnectedAgent, Ed25519PrivateKey]:
    agent = ConnectedAgent(
        "127.0.0.1:9",
        client_id="c",
        client_secret="s",
        agent_type="crm",
        instance_id="crm-1",
        handler=_nothing,
        verify_dispatches=True,
    )
    key = Ed25519PrivateKey.generate()
    agent._keys = {"k1": key.public_key()}
    agent._issuer = "svantic-grpc"
    return agent, key


def _dispatch(
    key: Ed25519PrivateKey, *, session: str, dispatch: str, **claims: object
) -> registry_service_pb2.Dispatch:
    now = int(time.time())
    body = {
        "iss": "svantic-grpc",
        "aud": "crm-1",
        "tenant_id": "acme",
        "session_id": "s1",
        "dispatch_id": "d1",
        "iat": now,
        "exp": now + 300,
        **claims,
    }
    token = jwt.encode(body, key, algorithm="EdDSA", headers={"kid": "k1"})
    return registry_service_pb2.Dispatch(dispatch_id=dispatch, session_id=session, dispatch_token=token)


def test_a_token_for_this_dispatch_and_session_verifies() -> None:
    agent, key = _agent_and_signer()
    assert agent._verify(_dispatch(key, session="s1", dispatch="d1"))["session_id"] == "s1"


@pytest.mark.parametrize(
    ("session", "dispatch", "why"),
    [("s2", "d1", "another session"), ("s1", "d2", "another dispatch")],
)
def test_a_token_made_for_other_work_is_refused(session: str, dispatch: str, why: str) -> None:
    agent, key = _agent_and_signer()
    with pytest.raises(jwt.InvalidTokenError, match=why):
        agent._verify(_dispatch(key, session=session, dispatch=dispatch))


def test_a_token_under_a_key_the_agent_does_not_know_is_refused_as_a_bad_token() -> None:
    # found from outside: the helper raised jwt.InvalidKeyError, which its handler does not catch as
    # a bad token, so the dispatch was neither rejected nor run and the message waited for its timeout
    agent, key = _agent_and_signer()
    agent._keys = {"k0": Ed25519PrivateKey.generate().public_key()}  # another replica's, a rotated one
    with pytest.raises(jwt.InvalidTokenError, match="does not know"):
        agent._verify(_dispatch(key, session="s1", dispatch="d1"))
