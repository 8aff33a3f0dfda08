"""What keeps ``GetToken`` cheap for the right secret and dear for a wrong one.

Two parts, both in memory of one process, both used by ``TokenIssuer.issue`` only:

* ``VerifiedSecrets``: after a secret has passed scrypt against a credential's stored
  hash, a keyed digest (HMAC-SHA256 under a random per-process key) of
  (client id, secret, stored hash) is kept for that client id. The same secret again
  costs one HMAC instead of scrypt (~60 ms). The digest is useless outside the process
  (its key never leaves it), a wrong secret never matches it, and a changed stored hash
  changes the digest, so the secret is checked by scrypt afresh. Identical attempts in
  flight at once share one scrypt (1,000 agents with one credential after a restart).
* ``FailedAttempts``: a token bucket of failures per key (a client id, a peer address).
  ``burst`` failures are allowed at once, then one more per ``refill_s``; an exhausted
  bucket answers with the time until the next attempt is allowed. Nothing is locked
  for ever: a bucket refills as soon as the failures stop.
* ``SignInLimits``: the two buckets together. An attempt that needs scrypt counts as
  failed from the moment it starts (so attempts in flight are limited too) and is
  refunded when it proves right. A peer that signed in as a client id before is not
  refused for that client id's failures, only for its own: someone guessing from
  elsewhere cannot lock out an agent that already signed in.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from svantic_grpc.core.clock import Clock
from svantic_grpc.core.errors import ResourceExhausted

__all__ = ["AttemptLimit", "FailedAttempts", "SignInLimits", "VerifiedSecrets", "address_key"]

_MAX_KEYS = 100_000
"""Bound on the keys (client ids, peers, client id + peer pairs) each table remembers."""


@dataclass(frozen=True)
class AttemptLimit:
    """How many failed attempts a key may make: a token bucket."""

    burst: int
    """Failures allowed in a row before attempts are refused."""
    refill_s: float
    """Seconds after which one more attempt is allowed again (the bucket refills one per period)."""


class FailedAttempts:
    """Failed attempts per key as token buckets; an attempt in flight counts as failed until it succeeds."""

    def __init__(self, limit: AttemptLimit, clock: Clock, *, max_keys: int = _MAX_KEYS) -> None:
        if limit.burst < 1 or limit.refill_s <= 0:
            raise ValueError("an attempt limit needs burst >= 1 and refill_s > 0")
        self._limit = limit
        self._clock = clock
        self._max_keys = max_keys
        self._debts: dict[str, tuple[float, float]] = {}
        """key -> (failures owed, when counted); a key with nothing owed is dropped."""

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0 when it may now."""
        excess = self._owed(key) - (self._limit.burst - 1)
        return excess * self._limit.refill_s if excess > 0 else 0.0

    def charge(self, key: str) -> None:
        """Count one failed (or not yet proven) attempt of ``key``."""
        owed = self._owed(key) + 1
        self._debts.pop(key, None)  # re-inserted last: the table drops its oldest first
        if len(self._debts) >= self._max_keys:
            del self._debts[next(iter(self._debts))]
        self._debts[key] = (owed, self._clock.now())

    def refund(self, key: str) -> None:
        """Take back one ``charge`` (the attempt proved right)."""
        owed = self._owed(key) - 1
        if owed > 0:
            self._debts[key] = (owed, self._clock.now())
        else:
            self._debts.pop(key, None)

    def _owed(self, key: str) -> float:
        entry = self._debts.get(key)
        if entry is None:
            return 0.0
        owed, since = entry
        owed -= max(0.0, self._clock.now() - since) / self._limit.refill_s
        if owed <= 0:
            del self._debts[key]
            return 0.0
        return owed


class SignInLimits:
    """Failed sign-in attempts per client id and per peer (``""``: the transport could not tell)."""

    def __init__(
        self, *, per_client: AttemptLimit, per_peer: AttemptLimit, clock: Clock, max_keys: int = _MAX_KEYS
    ) -> None:
        self._per_client = FailedAttempts(per_client, clock, max_keys=max_keys)
        self._per_peer = FailedAttempts(per_peer, clock, max_keys=max_keys)
        self._max_keys = max_keys
        self._signed_in_from: dict[tuple[str, str], None] = {}
        """(client id, peer) pairs that proved the secret: the client id's bucket does not refuse them."""

    def check(self, client_id: str, peer: str) -> None:
        """Raise ``ResourceExhausted`` (with the retry delay) when this attempt is refused."""
        wait = self._per_peer.retry_after(peer) if peer else 0.0
        if (client_id, peer) not in self._signed_in_from:
            wait = max(wait, self._per_client.retry_after(client_id))
        if wait > 0:
            raise ResourceExhausted(
                f"too many failed attempts for this client_id or from this address; retry in {wait:.1f} s",
                reason="TOO_MANY_FAILED_ATTEMPTS",
                metadata={"retry_after_ms": str(math.ceil(wait * 1000))},
                retry_after_s=wait,
            )

    def attempt(self, client_id: str, peer: str) -> None:
        """Count an attempt as failed until ``succeeded`` says otherwise."""
        self._per_client.charge(client_id)
        if peer:
            self._per_peer.charge(peer)

    def succeeded(self, client_id: str, peer: str) -> None:
        """Take back ``attempt``'s count, and trust this peer for this client id from now on."""
        self._per_client.refund(client_id)
        if not peer:
            return
        self._per_peer.refund(peer)
        self._signed_in_from.pop((client_id, peer), None)  # re-inserted last: oldest dropped first
        if len(self._signed_in_from) >= self._max_keys:
            del self._signed_in_from[next(iter(self._signed_in_from))]
        self._signed_in_from[(client_id, peer)] = None


class VerifiedSecrets:
    """Secrets already verified against their stored hash, as keyed digests; scrypt for the rest.

    Args:
        verify: The slow check (``verify_secret``): true when a secret matches a stored hash.
        max_entries: Bound on remembered client ids (one digest each: its current secret).
    """

    def __init__(self, verify: Callable[[str, str], bool], *, max_entries: int = _MAX_KEYS) -> None:
        self._verify = verify
        self._key = secrets.token_bytes(32)  # per process: the digests mean nothing elsewhere
        self._max_entries = max_entries
        self._digests: dict[str, bytes] = {}
        self._in_flight: dict[bytes, asyncio.Future[bool]] = {}

    def digest(self, client_id: str, secret: str, stored_hash: str) -> bytes:
        """The keyed digest of one attempt (length-prefixed fields: no two attempts share one)."""
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for field in (client_id, secret, stored_hash):
            data = field.encode()
            mac.update(len(data).to_bytes(8, "big"))
            mac.update(data)
        return mac.digest()

    def known(self, client_id: str, digest: bytes) -> bool:
        """True when this exact attempt was verified before (constant-time compare)."""
        remembered = self._digests.get(client_id)
        return remembered is not None and hmac.compare_digest(remembered, digest)

    def in_flight(self, digest: bytes) -> bool:
        """True when the same attempt is being verified now (joining it costs no scrypt)."""
        return digest in self._in_flight

    async def verify(self, secret: str, stored_hash: str, digest: bytes) -> bool:
        """scrypt in a worker thread, shared by identical attempts in flight at the same time."""
        pending = self._in_flight.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._verify, secret, stored_hash))
            self._in_flight[digest] = pending
            # The thread cannot be stopped; whoever waits last or not, the entry goes when it ends.
            pending.add_done_callback(lambda _: self._in_flight.pop(digest, None))
        return await asyncio.shield(pending)

    def remember(self, client_id: str, digest: bytes) -> None:
        """Keep ``digest`` as the verified secret of ``client_id`` (replacing an older one)."""
        self._digests.pop(client_id, None)
        if len(self._digests) >= self._max_entries:
            del self._digests[next(iter(self._digests))]
        self._digests[client_id] = digest


def address_key(host: str) -> str:
    """The key a peer's failures count under: an IPv4 address, an IPv6 /64 (one site's), else as given."""
    if not host:
        return ""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
