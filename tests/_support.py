"""Test support: a real gRPC server on 127.0.0.1:0 with two tenants.

Each test gets its own server. Tenants `acme` and `globex` have credentials with
different scopes; the signing key is passed as an environment mapping, never
read from the process environment.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from svantic_grpc.config import parse_settings
from svantic_grpc.core.auth import hash_secret
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.pb import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    message_service_pb2_grpc,
    registry_service_pb2_grpc,
    session_service_pb2_grpc,
)
from svantic_grpc.server import MeshServer

SIGNING_ENV = {"SVANTIC_SIGNING_KEY": "test-signing-key-0123456789abcdef0123456789"}
SECRET = "s3cret-for-tests"


@functools.cache
def _secret_hash() -> str:
    # scrypt is slow on purpose; a lower cost keeps GetToken quick in tests (hashes record their cost).
    return hash_secret(SECRET, cost=2**10)


def tenant_settings() -> list[dict[str, Any]]:
    """acme: a full, a read-only and an admin credential; globex: one full credential."""
    digest = _secret_hash()
    return [
        {
            "tenant_id": "acme",
            "credentials": [
                {"client_id": "acme-full", "secret_hash": digest, "scopes": ["full"]},
                {"client_id": "acme-read", "secret_hash": digest, "scopes": ["read"]},
                {"client_id": "acme-admin", "secret_hash": digest, "scopes": ["admin", "full", "read"]},
            ],
        },
        {
            "tenant_id": "globex",
            "credentials": [{"client_id": "globex-full", "secret_hash": digest, "scopes": ["full"]}],
        },
    ]


@dataclass
class Client:
    """Stubs for one server, with a token per credential on demand."""

    server: MeshServer
    channel: aio.Channel

    def __post_init__(self) -> None:
        self.auth = auth_service_pb2_grpc.AuthServiceStub(self.channel)
        self.sessions = session_service_pb2_grpc.SessionServiceStub(self.channel)
        self.registry = registry_service_pb2_grpc.RegistryServiceStub(self.channel)
        self.messages = message_service_pb2_grpc.MessageServiceStub(self.channel)
        self._tokens: dict[tuple[str, str], str] = {}

    async def token(self, client_id: str = "acme-full", agent_type: str = "a2ui-terminal") -> str:
        key = (client_id, agent_type)
        if key not in self._tokens:
            response = await self.auth.GetToken(
                auth_service_pb2.GetTokenRequest(
                    client_id=client_id, client_secret=SECRET, agent_type=agent_type
                )
            )
            self._tokens[key] = response.token
        return self._tokens[key]

    async def md(self, client_id: str = "acme-full") -> tuple[tuple[str, str], ...]:
        """Call metadata carrying a bearer token for ``client_id``."""
        return (("authorization", f"Bearer {await self.token(client_id)}"),)


@asynccontextmanager
async def running_server(
    *, clock: ManualClock | None = None, env: dict[str, str] | None = None, **overrides: Any
) -> AsyncIterator[Client]:
    """A real server on 127.0.0.1:0 (gRPC and HTTP) with the test tenants; ``overrides`` patch settings.json
    keys."""
    data: dict[str, Any] = {
        "grpc_address": "127.0.0.1:0",
        "http_address": "127.0.0.1:0",
        "tenants": tenant_settings(),
        "shutdown_grace_s": 0,
    }
    data.update(overrides)
    server = MeshServer(parse_settings(data), env=SIGNING_ENV if env is None else env, clock=clock)
    async with server, aio.insecure_channel(server.target) as channel:
        yield Client(server, channel)


def rpc_error(excinfo: object) -> aio.AioRpcError:
    error = getattr(excinfo, "value", excinfo)
    assert isinstance(error, aio.AioRpcError), error
    return error


def code_of(excinfo: object) -> grpc.StatusCode:
    """The status code of a failed call (from ``pytest.raises``)."""
    return rpc_error(excinfo).code()


def error_details(excinfo: object) -> tuple[str, str]:
    """(ErrorInfo.reason, BadRequest field or "") of a failed call."""
    error = rpc_error(excinfo)
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw, f"no rich status details on {error.code()}: {error.details()}"
    status = status_pb2.Status.FromString(raw)
    reason, field = "", ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            field = bad.field_violations[0].field
    return reason, field


@contextmanager
def closes_failing(client: Client) -> Iterator[None]:
    """While inside, the server's store fails every close of a session (as a full disk would)."""
    store = client.server.mesh.store
    write = store.update_session_with_events

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise OSError("the disk is full")

    store.update_session_with_events = failing  # type: ignore[method-assign]
    try:
        yield
    finally:
        store.update_session_with_events = write  # type: ignore[method-assign]
