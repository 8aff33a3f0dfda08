"""Listing a tenant's agents after every way an agent comes and goes (each store).

The memory store lists from a per-tenant index of its agents: an agent inserted by a
``write``, or deleted, must show (or not) in the listing as in every other store.
"""

from __future__ import annotations

from dataclasses import replace

from svantic_grpc.core.store import Change, Store
from tests.stores.test_contract import make_agent, store

__all__ = ["store"]


async def test_listing_follows_creates_writes_and_deletes(store: Store) -> None:
    await store.create_agent(make_agent("a"))
    await store.create_agent(make_agent("b", agent_type="writer"))
    await store.write(Change("acme", "", agents=(make_agent("c"),)))  # inserted by a write
    await store.create_agent(make_agent("a", tenant_id="globex"))
    listed = await store.list_agents(tenant_id="acme")
    assert [a.instance_id for a in listed] == ["a", "c", "b"]
    await store.delete_agent(tenant_id="acme", instance_id="a", version=1)
    assert [a.instance_id for a in await store.list_agents(tenant_id="acme")] == ["c", "b"]
    assert [a.instance_id for a in await store.list_agents(tenant_id="globex")] == ["a"]
    await store.delete_agent(tenant_id="acme", instance_id="b", version=1)
    await store.delete_agent(tenant_id="acme", instance_id="c", version=1)
    assert list(await store.list_agents(tenant_id="acme")) == []
    # an update keeps the agent listed, as updated
    (globex,) = await store.list_agents(tenant_id="globex")
    await store.update_agent(replace(globex, url="http://agents.example/moved"))
    (moved,) = await store.list_agents(tenant_id="globex")
    assert moved.url == "http://agents.example/moved"
    await store.create_agent(make_agent("a"))  # the tenant's listing starts again after it emptied
    assert [a.instance_id for a in await store.list_agents(tenant_id="acme")] == ["a"]
