"""Console logins held by the store: a signed-out login's record lasts only as long as the login."""

from __future__ import annotations

from pathlib import Path

from svantic_grpc.console.auth import ConsoleLogins
from svantic_grpc.core.auth import Credential, TokenIssuer, TokenSettings, hash_secret
from svantic_grpc.core.clock import ManualClock, UuidGenerator
from svantic_grpc.stores.sqlite import SqliteStore

KEY = "console-logins-test-signing-key-0123456789abcdef"
SECRET = "console logins secret"


async def test_sign_out_records_go_once_their_logins_have_expired(tmp_path: Path) -> None:
    clock = ManualClock()
    issuer = TokenIssuer(
        settings=TokenSettings(signing_key=KEY),
        credentials=[Credential("acme", "acme-ops", hash_secret(SECRET, cost=2**10))],
        clock=clock,
        ids=UuidGenerator(),
    )
    store = await SqliteStore.open(tmp_path / "mesh.db")
    try:
        logins = ConsoleLogins(tokens=issuer, store=store, clock=clock, ttl_s=3600)
        first, _ = await logins.sign_in("acme-ops", SECRET)
        second, _ = await logins.sign_in("acme-ops", SECRET)
        await logins.sign_out(first)
        assert await logins.get(first) is None
        assert await logins.get(second) is not None

        async def kept() -> int:
            return await store.purge_expired_adapter_values("console", before=clock.now() + 10 * 3600)

        clock.advance(3600 + 1)  # the first login (and the second) have expired
        third, _ = await logins.sign_in("acme-ops", SECRET)
        await logins.sign_out(third)  # deletes the first login's record, keeps its own
        assert await logins.get(first) is None  # refused for its age now
        assert await logins.get(third) is None
        fourth, _ = await logins.sign_in("acme-ops", SECRET)
        assert await logins.get(fourth) is not None
        assert await kept() == 1  # only the third's record was left (purged here to count it)
    finally:
        await store.close()
