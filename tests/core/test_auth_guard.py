"""The failed-attempt limits between peers, and one scrypt for identical attempts, without a server.

Peers other than 127.0.0.1 cannot be reached from a loopback test; here the issuer is
told the peer address directly, as the transports tell it.
"""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest

from svantic_grpc.core.auth import AttemptLimit, Credential, TokenIssuer, TokenSettings, hash_secret
from svantic_grpc.core.auth_guard import VerifiedSecrets, address_key
from svantic_grpc.core.clock import ManualClock, UuidGenerator
from svantic_grpc.core.errors import ResourceExhausted, Unauthenticated

KEY = "guard-test-signing-key-0123456789abcdef0123"
SECRET = "correct horse battery staple"


@functools.cache
def _hash() -> str:
    return hash_secret(SECRET, cost=2**10)


def _issuer(clock: ManualClock, *, per_client: int = 3, per_peer: int = 100) -> TokenIssuer:
    settings = TokenSettings(
        signing_key=KEY,
        failed_per_client=AttemptLimit(burst=per_client, refill_s=60.0),
        failed_per_peer=AttemptLimit(burst=per_peer, refill_s=60.0),
    )
    credentials = [Credential("acme", "acme-full", _hash()), Credential("acme", "acme-bot", _hash())]
    return TokenIssuer(settings=settings, credentials=credentials, clock=clock, ids=UuidGenerator())


async def _issue(issuer: TokenIssuer, peer: str, secret: str = SECRET, client_id: str = "acme-full") -> None:
    await issuer.issue(client_id=client_id, client_secret=secret, agent_type="worker", peer=peer)


async def test_failures_on_a_client_id_do_not_lock_out_a_peer_it_signed_in_from() -> None:
    issuer = _issuer(ManualClock())
    await _issue(issuer, "10.0.0.1")  # the real agent, before the attack
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await _issue(issuer, "203.0.113.9", "guess")
    with pytest.raises(ResourceExhausted):
        await _issue(issuer, "203.0.113.9")  # the guesser, even with the right secret
    with pytest.raises(ResourceExhausted):
        await _issue(issuer, "10.0.0.2")  # a peer never seen as acme-full: the id's limit holds
    await _issue(issuer, "10.0.0.1")  # the agent keeps signing in
    await _issue(issuer, "10.0.0.2", client_id="acme-bot")  # another id from another peer


async def test_a_peers_failures_do_not_limit_another_peer() -> None:
    issuer = _issuer(ManualClock(), per_client=100, per_peer=2)
    for client_id in ("x", "y"):
        with pytest.raises(Unauthenticated):
            await _issue(issuer, "203.0.113.9", "guess", client_id)
    with pytest.raises(ResourceExhausted) as refused:
        await _issue(issuer, "203.0.113.9")
    assert refused.value.retry_after_s is not None and 0 < refused.value.retry_after_s <= 60
    await _issue(issuer, "10.0.0.1")
    # One IPv6 site is one peer: its /64 shares the bucket.
    for host in ("2001:db8:1:2::10", "2001:db8:1:2::11"):
        with pytest.raises(Unauthenticated):
            await _issue(issuer, host, "guess", "x")
    with pytest.raises(ResourceExhausted):
        await _issue(issuer, "2001:db8:1:2:ffff::1")
    await _issue(issuer, "2001:db8:1:3::10")


async def test_many_agents_signing_in_at_once_with_one_credential_are_not_limited() -> None:
    # After a restart nothing is remembered: 200 agents with one credential arrive together.
    issuer = _issuer(ManualClock(), per_client=2, per_peer=2)
    await asyncio.gather(*(_issue(issuer, "10.0.0.1") for _ in range(200)))


async def test_identical_attempts_in_flight_share_one_slow_check() -> None:
    calls: list[str] = []
    release = threading.Event()

    def slow_verify(secret: str, stored: str) -> bool:
        calls.append(secret)
        release.wait(5)
        return secret == SECRET

    checked = VerifiedSecrets(slow_verify)
    right = checked.digest("acme-full", SECRET, "stored")
    wrong = checked.digest("acme-full", "guess", "stored")
    waiting = [asyncio.ensure_future(checked.verify(SECRET, "stored", right)) for _ in range(50)]
    waiting += [asyncio.ensure_future(checked.verify("guess", "stored", wrong)) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiting)
    assert results == [True] * 50 + [False] * 50
    assert sorted(calls) == sorted([SECRET, "guess"])  # one check each, not fifty
    assert not checked.in_flight(right) and not checked.in_flight(wrong)


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8::1", "2001:db8::/64"),
        ("[2001:db8::1]", "2001:db8::/64"),
        ("unix:/tmp/mesh.sock", "unix:/tmp/mesh.sock"),
        ("", ""),
    ],
)
def test_peers_are_counted_by_address_and_ipv6_by_site(host: str, key: str) -> None:
    assert address_key(host) == key
