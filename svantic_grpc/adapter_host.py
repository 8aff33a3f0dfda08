"""Loads the configured adapters and keeps them informed.

Adapters come from the ``svantic_grpc.adapters`` entry-point group and are
configured under ``adapters`` in settings.json (``"enabled": false`` skips one).
Their routes (``routes()``) are mounted on the mesh's one HTTP server
(``svantic_grpc.http_server``) by the composition root. Each adapter is told of
input requests in its own task, so a slow or failing adapter never holds up the
mesh or the other adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from svantic_grpc.adapter import ENTRY_POINT_GROUP, Adapter, AdapterSettingsError
from svantic_grpc.core.clock import Clock, IdGenerator
from svantic_grpc.core.errors import NotFound
from svantic_grpc.core.inputs.checks import checked_resolution
from svantic_grpc.core.inputs.model import InputRequest, Resolution, Surface
from svantic_grpc.core.inputs.service import Inputs
from svantic_grpc.core.store import Store
from svantic_grpc.http_server import HttpServer

__all__ = ["START_TIMEOUT_S", "AdapterHost", "AdapterLoadError"]

RESERVED_PREFIX = "svantic-host/"
"""Keys of an adapter's stored values that start with this are the host's (``remember``)."""

START_TIMEOUT_S = 30.0
"""How long an adapter's ``start`` may take before it is disabled and the mesh serves without it."""

_log = logging.getLogger(__name__)


class AdapterLoadError(ValueError):
    """An adapter named in settings cannot be found or configured; the message names the key."""


class _Context:
    """What adapters may do with the mesh (``svantic_grpc.adapter.AdapterContext``), within the
    tenants the adapter serves (``tenants``; ``None``: all): another tenant's request is not found."""

    def __init__(
        self,
        host: AdapterHost,
        name: str,
        inputs: Inputs,
        store: Store,
        clock: Clock,
        ids: IdGenerator,
        tenants: frozenset[str] | None = None,
    ) -> None:
        self._host = host
        self._name = name
        self._inputs = inputs
        self._store = store
        self.clock = clock
        self.ids = ids
        self.tenants = tenants

    def serves(self, tenant_id: str) -> bool:
        return self.tenants is None or tenant_id in self.tenants

    def _check(self, tenant_id: str, request_id: str) -> None:
        if not self.serves(tenant_id):
            raise NotFound(f"input request {request_id!r} not found", reason="INPUT_NOT_FOUND")

    def shared_key(self, purpose: str) -> bytes | None:
        derive = self._host.derive_key
        return None if derive is None else derive(f"adapter {self._name}: {purpose}")

    async def remember(
        self,
        key: str,
        value: Mapping[str, Any],
        *,
        session: tuple[str, str] | None = None,
        if_absent: bool = False,
    ) -> bool:
        return await self._store.put_adapter_value(
            self._name, key, value, session=session, if_absent=if_absent
        )

    async def recall(self, key: str) -> dict[str, Any] | None:
        return await self._store.get_adapter_value(self._name, key)

    async def forget(self, key: str) -> None:
        await self._store.delete_adapter_value(self._name, key)

    @property
    def http_base_url(self) -> str:
        return self._host.http.public_url

    async def get_request(self, *, tenant_id: str, request_id: str) -> InputRequest:
        self._check(tenant_id, request_id)
        return await self._inputs.get(tenant_id, request_id)

    def as_stored(self, request: InputRequest, resolution: Resolution) -> Resolution:
        return checked_resolution(request, resolution)

    async def resolve(
        self, *, tenant_id: str, request_id: str, resolution: Resolution, responder: str, surface: Surface
    ) -> InputRequest:
        self._check(tenant_id, request_id)
        return await self._inputs.resolve(
            tenant_id=tenant_id,
            request_id=request_id,
            resolution=resolution,
            responder=responder,
            surface=surface,
        )


class AdapterHost:
    """The adapters of one server."""

    def __init__(
        self,
        *,
        configs: Mapping[str, Mapping[str, Any]],
        http: HttpServer,
        inputs: Inputs,
        store: Store,
        clock: Clock,
        ids: IdGenerator,
        env: Mapping[str, str],
        derive_key: Callable[[str], bytes] | None = None,
    ) -> None:
        self._configs = {name: dict(c) for name, c in configs.items() if c.get("enabled", True) is not False}
        self.derive_key = derive_key
        """Keys derived from the token signing key (``TokenIssuer.derived_key``); ``None`` on the
        development default."""
        self.http = http
        self._inputs = inputs
        self._store = store
        self._clock = clock
        self._ids = ids
        self._env = env
        self.adapters: dict[str, Adapter] = {}
        self._contexts: dict[str, _Context] = {}

    def load(self) -> None:
        """Find and construct every enabled adapter (at start-up, before serving).

        Raises:
            AdapterLoadError: an unknown adapter name or a bad adapter configuration.
        """
        if not self._configs:
            return
        available = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        for name, config in self._configs.items():
            tenants = _tenants(name, config.pop("tenants", None))
            context = _Context(self, name, self._inputs, self._store, self._clock, self._ids, tenants)
            self._contexts[name] = context
            entry = available.get(name)
            if entry is None:
                known = ", ".join(sorted(available)) or "none installed"
                raise AdapterLoadError(f"adapters.{name}: no adapter of that name (available: {known})")
            config.pop("enabled", None)
            try:
                adapter_class = entry.load()
                self.adapters[name] = adapter_class(name, config, context, self._env)
            except AdapterSettingsError as exc:  # each line names its key's full path already
                raise AdapterLoadError(str(exc)) from None
            except (ValueError, KeyError, TypeError) as exc:
                raise AdapterLoadError(f"adapters.{name}: {exc}") from None
        # Before recovery: what it ends is kept untold for the adapters (told once they listen).
        self._inputs.tells_outcomes = bool(self.adapters)

    def routes(self) -> list[BaseRoute]:
        """Every loaded adapter's inbound routes (for the HTTP server, before ``start``); an adapter
        that then fails to start answers on them 503 ``ADAPTER_DISABLED`` instead of reaching an
        adapter that was stopped."""
        adapters = self.adapters.items()
        return [self._guarded(name, route) for name, adapter in adapters for route in adapter.routes()]

    def _guarded(self, name: str, route: BaseRoute) -> BaseRoute:
        if not isinstance(route, Route):
            return route
        endpoint = route.endpoint

        async def guarded(request: Request) -> Response:
            if name not in self.adapters:
                body = {
                    "status": "refused",
                    "error": {
                        "reason": "ADAPTER_DISABLED",
                        "message": f"the {name} adapter is off on this server (it did not start); answer "
                        "through the API, the console or the session's chat, or try again after a restart",
                    },
                }
                return JSONResponse(body, status_code=503)
            response: Response = await endpoint(request)
            return response

        return Route(route.path, guarded, methods=list(route.methods or ()), name=route.name)

    async def start(self) -> None:
        """Start the adapters (their routes are served already) and subscribe them to input requests."""
        for name, adapter in list(self.adapters.items()):
            try:
                # Bounded: an adapter whose service does not answer must not keep the mesh from
                # serving (longer work belongs in the adapter's own background task).
                async with asyncio.timeout(START_TIMEOUT_S):
                    await adapter.start()
            except Exception as exc:
                _log.error(
                    "adapter %s failed to start%s; it is disabled, and the outcomes the others are told "
                    "stay untold for it, told again at the next start",
                    name,
                    f" within {START_TIMEOUT_S:g}s" if isinstance(exc, TimeoutError) else "",
                    exc_info=not isinstance(exc, TimeoutError),
                )
                del self.adapters[name]
                self._inputs.marks_told = False
                with contextlib.suppress(Exception):  # what it opened before it failed
                    async with asyncio.timeout(START_TIMEOUT_S):
                        await adapter.stop()
                continue
            self._inputs.add_listener(_Scoped(adapter, self._contexts[name]))
        if self.adapters:
            _log.info("adapters on: %s", ", ".join(self.adapters))
        if told := await self._inputs.start_telling():
            _log.info("told the adapters %d outcome(s) again that they may not have been told", told)

    async def stop(self) -> None:
        """Stop the adapters; safe to call twice."""
        for name, adapter in self.adapters.items():
            try:
                await adapter.stop()
            except Exception:
                _log.exception("adapter %s failed to stop cleanly", name)
        self.adapters = {}


class _Scoped:
    """An adapter told only of the requests of the tenants it serves."""

    def __init__(self, adapter: Adapter, context: _Context) -> None:
        self._adapter = adapter
        self._context = context

    def __repr__(self) -> str:
        return repr(self._adapter)

    async def on_request(self, request: InputRequest) -> None:
        if self._context.serves(request.tenant_id):
            await self._adapter.on_request(request)

    async def on_outcome(self, request: InputRequest) -> None:
        if self._context.serves(request.tenant_id):
            await self._adapter.on_outcome(request)

    async def on_outcome_again(self, request: InputRequest) -> None:
        """Told again (a later look, a take-over, a restart): only if not told already."""
        if not self._context.serves(request.tenant_id):
            return
        if await self._context.recall(self._told_key(request)) is not None:
            return
        await self._adapter.on_outcome(request)
        await self.told(request)

    async def told(self, request: InputRequest) -> None:
        """Keep, with the session, that this adapter was told (only when another was not)."""
        if self._context.serves(request.tenant_id):
            key = self._told_key(request)
            await self._context.remember(key, {}, session=(request.tenant_id, request.session_id))

    @staticmethod
    def _told_key(request: InputRequest) -> str:
        return f"{RESERVED_PREFIX}outcome-told/{request.tenant_id}/{request.request_id}"


def _tenants(name: str, value: Any) -> frozenset[str] | None:
    """``adapters.<name>.tenants``: the tenant ids the adapter serves (absent: every tenant)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
        raise AdapterLoadError(f"adapters.{name}.tenants: must be a non-empty list of tenant ids")
    return frozenset(value)
