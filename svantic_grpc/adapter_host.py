"""Loads the configured adapters, serves their inbound HTTP, and keeps them informed.

Adapters come from the ``svantic_grpc.adapters`` entry-point group and are
configured under ``adapters`` in settings.json (``"enabled": false`` skips one).
Their routes share one aiohttp server on ``http_address``, started and stopped
with the gRPC server. Each adapter is told of input requests in its own task, so
a slow or failing adapter never holds up the mesh or the other adapters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from aiohttp import web

from svantic_grpc.adapter import ENTRY_POINT_GROUP, Adapter
from svantic_grpc.config import dial_address
from svantic_grpc.core.clock import Clock, IdGenerator
from svantic_grpc.core.inputs.model import InputRequest, Resolution, Surface
from svantic_grpc.core.inputs.service import Inputs
from svantic_grpc.core.store import Store

__all__ = ["AdapterHost", "AdapterLoadError"]

_log = logging.getLogger(__name__)


class AdapterLoadError(ValueError):
    """An adapter named in settings cannot be found or configured; the message names the key."""


class _Context:
    """What adapters may do with the mesh (``svantic_grpc.adapter.AdapterContext``)."""

    def __init__(
        self, host: AdapterHost, name: str, inputs: Inputs, store: Store, clock: Clock, ids: IdGenerator
    ) -> None:
        self._host = host
        self._name = name
        self._inputs = inputs
        self._store = store
        self.clock = clock
        self.ids = ids

    async def remember(self, key: str, value: Mapping[str, Any]) -> None:
        await self._store.put_adapter_value(self._name, key, value)

    async def recall(self, key: str) -> dict[str, Any] | None:
        return await self._store.get_adapter_value(self._name, key)

    async def forget(self, key: str) -> None:
        await self._store.delete_adapter_value(self._name, key)

    @property
    def http_base_url(self) -> str:
        return self._host.http_base_url

    async def get_request(self, *, tenant_id: str, request_id: str) -> InputRequest:
        return await self._inputs.get(tenant_id, request_id)

    async def resolve(
        self, *, tenant_id: str, request_id: str, resolution: Resolution, responder: str, surface: Surface
    ) -> InputRequest:
        return await self._inputs.resolve(
            tenant_id=tenant_id,
            request_id=request_id,
            resolution=resolution,
            responder=responder,
            surface=surface,
        )


class AdapterHost:
    """The adapters of one server, and the HTTP server they share."""

    def __init__(
        self,
        *,
        configs: Mapping[str, Mapping[str, Any]],
        http_address: str,
        public_url: str,
        inputs: Inputs,
        store: Store,
        clock: Clock,
        ids: IdGenerator,
        env: Mapping[str, str],
    ) -> None:
        self._configs = {name: dict(c) for name, c in configs.items() if c.get("enabled", True) is not False}
        self._address = http_address
        self._public_url = public_url
        self._inputs = inputs
        self._store = store
        self._clock = clock
        self._ids = ids
        self._env = env
        self.adapters: dict[str, Adapter] = {}
        self._runner: web.AppRunner | None = None
        self.http_port = 0

    def load(self) -> None:
        """Find and construct every enabled adapter (at start-up, before serving).

        Raises:
            AdapterLoadError: an unknown adapter name or a bad adapter configuration.
        """
        if not self._configs:
            return
        available = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        for name, config in self._configs.items():
            context = _Context(self, name, self._inputs, self._store, self._clock, self._ids)
            entry = available.get(name)
            if entry is None:
                known = ", ".join(sorted(available)) or "none installed"
                raise AdapterLoadError(f"adapters.{name}: no adapter of that name (available: {known})")
            config.pop("enabled", None)
            try:
                adapter_class = entry.load()
                self.adapters[name] = adapter_class(name, config, context, self._env)
            except (ValueError, KeyError, TypeError) as exc:
                raise AdapterLoadError(f"adapters.{name}: {exc}") from None

    @property
    def http_base_url(self) -> str:
        """How callers reach the adapters' HTTP server (the bound port once serving)."""
        if self._public_url:
            return self._public_url.rstrip("/")
        port = self._address.rpartition(":")[2]
        return f"http://{dial_address(self._address, self.http_port or port)}"

    async def start(self) -> None:
        """Serve the adapters' routes, start them, and subscribe them to input requests."""
        if not self.adapters:
            return
        app = web.Application()
        for adapter in self.adapters.values():
            app.add_routes(list(adapter.routes()))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = self._address.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port))
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise AdapterLoadError(f"http_address: cannot bind {self._address}: {exc}") from None
        self._runner = runner
        self.http_port = runner.addresses[0][1]
        _log.info("adapters %s serving HTTP on %s:%d", ", ".join(self.adapters), host, self.http_port)
        for name, adapter in list(self.adapters.items()):
            try:
                await adapter.start()
            except Exception:
                _log.exception("adapter %s failed to start; it is disabled", name)
                del self.adapters[name]
                continue
            self._inputs.add_listener(adapter)

    async def stop(self) -> None:
        """Stop the adapters and the HTTP server; safe to call twice."""
        for name, adapter in self.adapters.items():
            try:
                await adapter.stop()
            except Exception:
                _log.exception("adapter %s failed to stop cleanly", name)
        self.adapters = {}
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
