"""The interface adapters implement, and what the mesh offers them.

An adapter tells humans about input requests and carries their answers back
(Slack, webhooks, ...). Adapters are found through the ``svantic_grpc.adapters``
entry-point group, configured under ``adapters`` in settings.json, and run on the
server's event loop. The core never imports an adapter; an adapter uses only this
module and the core's public model: the input-request model
(``svantic_grpc.core.inputs.model``) and its errors (``svantic_grpc.core.errors``).

Lifecycle: the server constructs each enabled adapter, mounts its ``routes()``
(Starlette routes) on the mesh's HTTP server (``svantic_grpc.http_server``), calls
``start()``, then ``on_request`` for each new pending request and ``on_outcome``
once for each request that ended (resolved on any surface, expired, or canceled),
and ``stop()`` at shutdown. A failing adapter
is logged and never blocks the mesh or the other adapters.

Settings: an adapter declares its ``adapters.<name>`` object as a subclass of
``AdapterSettings`` (pydantic: unknown keys refused, strict types) and reads it with
``parse_adapter_settings``, which names each bad key by its path, as settings.json's own
keys are (``adapters.webhook.targets[0].url: ...``). Secrets are never in settings: a
key names an environment variable, and a validator checks it with ``env_value``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo
from starlette.routing import BaseRoute

from svantic_grpc import _json
from svantic_grpc.config import validation_problems
from svantic_grpc.core.clock import Clock, IdGenerator
from svantic_grpc.core.inputs.checks import form_number
from svantic_grpc.core.inputs.model import InputRequest, Resolution, Surface

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "AdapterContext",
    "AdapterSettings",
    "AdapterSettingsError",
    "Clock",
    "IdGenerator",
    "env_value",
    "form_number",
    "parse_adapter_settings",
    "strict_json",
]

ENTRY_POINT_GROUP = "svantic_grpc.adapters"

S = TypeVar("S", bound="AdapterSettings")


class AdapterSettings(BaseModel):
    """Base of an adapter's settings: unknown keys refused, strict types, frozen (as settings.json)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AdapterSettingsError(ValueError):
    """An adapter's settings are invalid; one line per problem, each naming its key's full path."""


def parse_adapter_settings(model: type[S], name: str, config: Mapping[str, Any], env: Mapping[str, str]) -> S:
    """Validate ``adapters.<name>`` against ``model``.

    Validators may read the environment through ``env_value(info, variable)``.

    Raises:
        AdapterSettingsError: every problem, e.g. ``adapters.webhook.targets[0].url: ...``.
    """
    try:
        return model.model_validate(dict(config), context={"env": env})
    except ValidationError as exc:
        problems = validation_problems(exc, prefix=f"adapters.{name}")
        raise AdapterSettingsError("\n".join(problems)) from None


def env_value(info: ValidationInfo, variable: str) -> str:
    """The environment variable ``variable`` during ``parse_adapter_settings``.

    Raises:
        ValueError: it is not set (or empty), naming it; pydantic adds the key's path.
    """
    env: Mapping[str, str] = (info.context or {}).get("env", {})
    value = env.get(variable, "")
    if not value:
        raise ValueError(f"environment variable {variable} is not set")
    return value


def strict_json(text: str, *, max_depth: int) -> Any:
    """The value of inbound JSON ``text`` under the mesh's one rule for JSON it keeps.

    Raises:
        ValueError: not JSON, ``NaN``/``Infinity``, a number beyond a double's range, an
            integer beyond 64 bits, a lone surrogate escape in a string or key, or nested deeper
            than ``max_depth``; the message says which
            and reads after a subject ("body " + message).
    """
    return _json.loads(text, max_depth=max_depth)


class AdapterContext(Protocol):
    """What the mesh offers adapters."""

    clock: Clock
    ids: IdGenerator

    @property
    def http_base_url(self) -> str:
        """How callers reach the mesh's HTTP server, e.g. ``http://127.0.0.1:8080`` (``http_public_url``
        when set)."""
        ...

    async def get_request(self, *, tenant_id: str, request_id: str) -> InputRequest:
        """A request of the tenant (``NotFound`` otherwise)."""
        ...

    def as_stored(self, request: InputRequest, resolution: Resolution) -> Resolution:
        """``resolution`` as ``resolve`` would store it for ``request`` (a confirmation's approve
        stored as confirmed, say); ``InvalidArgument`` naming the field if it would refuse it."""
        ...

    def shared_key(self, purpose: str) -> bytes | None:
        """A 32-byte key for ``purpose``, derived from the mesh's token signing key: the same on
        every replica and after a restart with the same signing key, and nothing a token verifies
        under. ``None`` on the development default (a key anyone could derive)."""
        ...

    async def remember(
        self,
        key: str,
        value: Mapping[str, Any],
        *,
        session: tuple[str, str] | None = None,
        if_absent: bool = False,
    ) -> bool:
        """Keep a small JSON object under ``key`` for this adapter, in the mesh's store: with a
        durable store it is still there after a restart. With ``session`` (tenant id, session id)
        it goes when retention deletes that session; without, it stays until ``forget``. With
        ``if_absent`` only if nothing is kept under ``key`` (decided by the store, across every
        process sharing it). Returns whether it was kept. Keys starting ``svantic-host/`` are the
        mesh's own."""
        ...

    async def recall(self, key: str) -> dict[str, Any] | None:
        """What ``remember`` kept under ``key`` (``None`` if nothing)."""
        ...

    async def forget(self, key: str) -> None:
        """Drop what ``remember`` kept under ``key``."""
        ...

    async def resolve(
        self, *, tenant_id: str, request_id: str, resolution: Resolution, responder: str, surface: Surface
    ) -> InputRequest:
        """Answer a request. First resolution wins.

        Raises (``svantic_grpc.core.errors``):
            NotFound: no such request in the tenant.
            AlreadyResolved: it ended already; the message names who, how and when.
            PermissionDenied: ``responder`` is not an allowed responder.
            InvalidArgument: the answer does not fit the request (decision, form values).
        """
        ...


class Adapter:
    """Base class of adapters. Override the hooks you need.

    Args:
        name: The adapter's key under ``adapters`` in settings.json.
        config: That key's object.
        context: The mesh.
        env: The process environment (secrets come from here, never from config).
    """

    def __init__(
        self, name: str, config: Mapping[str, Any], context: AdapterContext, env: Mapping[str, str]
    ) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.env = env

    def routes(self) -> Sequence[BaseRoute]:
        """Inbound HTTP routes (Starlette) to mount on the mesh's HTTP server."""
        return ()

    async def start(self) -> None:
        """Called once after routes are mounted, before any request is announced. It must return
        within ``adapter_host.START_TIMEOUT_S`` (30 s), or the adapter is disabled: a connection that
        may take long (a socket to a service that may be down) belongs in a background task."""

    async def stop(self) -> None:
        """Called once at shutdown; release clients and background tasks."""

    async def on_request(self, request: InputRequest) -> None:
        """A new pending request: tell the humans."""

    async def on_outcome(self, request: InputRequest) -> None:
        """A request ended (``request.state``: resolved, expired or canceled): update what was shown."""
