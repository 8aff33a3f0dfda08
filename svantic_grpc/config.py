"""settings.json: the server's configuration, validated at start-up.

Unknown keys and wrong types are errors that name the key's path. Secrets are
never read from the file: ``resolve_auth`` reads the mesh's keys from the environment
variables the settings name (``auth.signing_key_env``, ``dispatch.signing_key_env``),
and credentials are stored hashed. ``dial_address`` turns a bind address into one a
client on this machine can dial.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import os
import socket
import urllib.parse
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from svantic_grpc.core.auth import AttemptLimit, Credential, Scope, TokenSettings, hash_secret

__all__ = [
    "DEFAULT_SETTINGS_FILE",
    "DEV_CLIENT_ID",
    "DEV_CLIENT_SECRET",
    "DEV_TENANT_ID",
    "AttemptLimitSettings",
    "AuthSettings",
    "DispatchSettings",
    "FailedAttemptSettings",
    "MetricsSettings",
    "ReplicaSettings",
    "ResolvedAuth",
    "RetentionSettings",
    "Settings",
    "SettingsError",
    "dial_address",
    "is_loopback",
    "load_settings",
    "parse_settings",
    "replica_id",
    "resolve_auth",
    "settings_for_serve",
    "validation_problems",
    "with_overrides",
]

#: DEVELOPMENT DEFAULT, LOOPBACK ONLY: the credential the product's walkthrough uses.
#: Active only when no signing key is set in the environment, and refused on any
#: non-loopback bind.
DEV_TENANT_ID = "dev"
DEV_CLIENT_ID = "svantic"
DEV_CLIENT_SECRET = "your-secret"
_DEV_SIGNING_KEY = "svantic-grpc-DEVELOPMENT-ONLY-signing-key-not-for-production"


_MAX_S = 10 * 365 * 86_400
"""Ten years: the longest duration a setting may give (a time that far ahead is still a timestamp)."""
_MAX_MS = _MAX_S * 1000
_SCRYPT_MAXMEM = 32 * 1024 * 1024
"""What OpenSSL's scrypt (``hashlib.scrypt``) allows by default."""

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$"
"""What the API accepts as an id (``core._validate``): tenant and client ids in settings too."""


class SettingsError(ValueError):
    """settings.json is unreadable or invalid; the message names each bad key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CredentialSettings(_Model):
    """One client credential of a tenant."""

    client_id: str = Field(pattern=_ID_PATTERN)
    secret_hash: str = Field(pattern=r"^scrypt\$\d{1,8}\$\d{1,3}\$\d{1,3}\$[A-Za-z0-9_=-]+\$[A-Za-z0-9_=-]+$")
    """Made with `svantic-grpc hash-secret`; never the secret itself."""
    scopes: list[Literal["read", "full", "admin"]] = ["full"]

    @field_validator("secret_hash")
    @classmethod
    def _usable_hash(cls, value: str) -> str:
        """A hash scrypt can check: else every sign-in would be 'wrong client_secret', silently."""
        _, n, r, p, salt, digest = value.split("$")
        cost, block, parallel = int(n), int(r), int(p)
        memory = 128 * block * (cost + 2) + 128 * block * parallel  # as OpenSSL counts it
        if cost < 2 or cost & (cost - 1) or block < 1 or parallel < 1 or memory > _SCRYPT_MAXMEM:
            raise ValueError(
                "is not a usable scrypt hash (its cost must be a power of two above 1, within 32 MiB of "
                "memory): make it with `svantic-grpc hash-secret`"
            )
        try:
            base64.urlsafe_b64decode(salt)
            base64.urlsafe_b64decode(digest)
        except ValueError:
            raise ValueError("is not a usable scrypt hash (salt or digest is not base64)") from None
        return value


class TenantSettings(_Model):
    """A tenant (account) and its credentials."""

    tenant_id: str = Field(pattern=_ID_PATTERN)
    credentials: list[CredentialSettings] = []


class AttemptLimitSettings(_Model):
    """A token bucket of failed ``GetToken`` (and console sign-in) attempts."""

    burst: int = Field(gt=0)
    """Failures allowed in a row; the next attempt is refused (RESOURCE_EXHAUSTED with a retry delay)."""
    refill_s: float = Field(gt=0, le=_MAX_S)
    """Seconds after which one more attempt is allowed; the bucket is full again after burst x refill_s."""

    def limit(self) -> AttemptLimit:
        return AttemptLimit(burst=self.burst, refill_s=self.refill_s)


class FailedAttemptSettings(_Model):
    """Limits of failed attempts to get a token, so guessing and scrypt's CPU stay bounded."""

    per_client_id: AttemptLimitSettings = AttemptLimitSettings(burst=10, refill_s=30.0)
    """Per client id, from every peer but those that signed in as that client id before."""
    per_peer: AttemptLimitSettings = AttemptLimitSettings(burst=20, refill_s=1.0)
    """Per peer address (an IPv4 address, an IPv6 /64), whatever the client id."""


class AuthSettings(_Model):
    """How tokens are made."""

    issuer: str = Field(default="svantic-grpc", min_length=1)
    signing_key_env: str = "SVANTIC_SIGNING_KEY"
    """Environment variable holding the HS256 signing key (at least 32 bytes)."""
    token_ttl_s: int = Field(default=86_400, gt=0, le=_MAX_S)
    max_token_ttl_s: int = Field(default=7 * 86_400, gt=0, le=_MAX_S)
    clock_skew_s: int = Field(default=60, ge=0, le=_MAX_S)
    """How far in the future a token's ``iat`` may lie before the token is refused."""
    failed_attempts: FailedAttemptSettings = FailedAttemptSettings()

    @model_validator(mode="after")
    def _ttl_within_max(self) -> AuthSettings:
        if self.token_ttl_s > self.max_token_ttl_s:
            raise ValueError("token_ttl_s must not exceed max_token_ttl_s")
        return self


class MetricsSettings(_Model):
    """Prometheus metrics at ``GET /metrics`` on the HTTP server."""

    enabled: bool = True
    """Off: no ``/metrics`` route, and the gRPC calls and the core record nothing."""


class DispatchSettings(_Model):
    """How messages are handed to remote agents."""

    timeout_ms: int = Field(default=60_000, gt=0, le=_MAX_MS)
    """How long one dispatch may take before its message fails."""
    connect_timeout_ms: int = Field(default=5_000, gt=0, le=_MAX_MS)
    """How long to wait for a hosted agent's connection (then fail over)."""
    failover_attempts: int = Field(default=2, ge=0)
    """Other instances tried when a dispatch could not be delivered."""
    critic_retries: int = Field(default=1, ge=0)
    """Re-dispatches when a result does not fit the skill's declared output."""
    max_dispatches_per_session: int = Field(default=1000, ge=0)
    """Guardrail budget per session; 0 is unlimited."""
    token_ttl_s: int = Field(default=300, gt=0, le=_MAX_S)
    """Lifetime of the signed token sent with each dispatch."""
    signing_key_env: str = "SVANTIC_DISPATCH_KEY"
    """Env var with the Ed25519 private key (PEM) for dispatch tokens; unset: a new key per run."""


class PolicyMatch(_Model):
    """What a policy applies to (``fnmatch`` patterns)."""

    tool: str = "*"
    agent_type: str = "*"


class EvaluatorSettings(_Model):
    """Makes a policy apply only above a threshold (bulk operations)."""

    type: Literal["bulk"]
    argument: str = Field(min_length=1)
    """The tool argument to count: a list's length, or a number."""
    threshold: int = Field(ge=0)


class PolicySettings(_Model):
    """One tool or plan policy."""

    name: str = Field(min_length=1)
    scope: Literal["tool", "plan"] = "tool"
    match: PolicyMatch = PolicyMatch()
    enforcement: Literal["block", "allow", "require_approval", "audit", "notify"]
    priority: int = 100
    """Lower wins."""
    approvers: list[str] = []
    """Who may answer approvals this policy asks for; empty means anyone in the tenant."""
    evaluator: EvaluatorSettings | None = None


class GuardrailSettings(_Model):
    """Per-session budgets."""

    max_tool_calls_per_session: int = Field(default=0, ge=0)
    """0 is unlimited."""


class PostgresSettings(_Model):
    """The PostgreSQL store (``"store": "postgresql://user@host:port/db"``)."""

    schema_name: str = Field(default="svantic", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """Schema holding the mesh's tables (created at start-up); replicas sharing state name the same one.
    Lower-case letters, digits and ``_`` (PostgreSQL folds an unquoted name to lower case)."""
    pool_size: int = Field(default=10, ge=2, le=1000)
    """Most connections one replica holds."""


class ReplicaSettings(_Model):
    """This process among several replicas sharing a PostgreSQL store (ignored by the other stores)."""

    id: str = Field(default="", max_length=200)
    """This replica's name in session leases; unique among the replicas. Empty: host name and gRPC
    port (with the process id when the port is 0)."""
    lease_ms: int = Field(default=10_000, ge=500, le=_MAX_MS)
    """How long a replica holds a session without renewing: a replica that dies has its sessions
    taken over by the others this long after its last renewal."""
    renew_ms: int = Field(default=3_000, gt=0, le=_MAX_MS)
    """How often a replica renews its leases and looks for expired ones to take over."""

    @model_validator(mode="after")
    def _renew_within_lease(self) -> ReplicaSettings:
        if self.renew_ms * 2 > self.lease_ms:
            raise ValueError("renew_ms must be at most half of lease_ms")
        return self


class RetentionSettings(_Model):
    """How long what is finished is kept."""

    closed_sessions_s: int = Field(default=86_400, ge=0, le=_MAX_S)
    """A closed session, its messages, input requests and event log are deleted this long after it
    closed; 0 keeps them for ever. The audit trail is kept."""
    max_events_per_session: int = Field(default=10_000, ge=0)
    """A session's event log keeps its newest this many events (plus at most 64); 0 keeps all."""
    sweep_interval_s: float = Field(default=60.0, gt=0, le=_MAX_S)
    """How often closed sessions past their retention are looked for."""


class Settings(_Model):
    """The whole settings.json."""

    grpc_address: str = "127.0.0.1:50051"
    """host:port for gRPC; port 0 picks a free one."""
    http_address: str = "127.0.0.1:8080"
    """host:port for the HTTP server, always on (/healthz, /readyz, adapters' routes); port 0 picks one."""
    http_public_url: str = ""
    """How callers reach that HTTP server (webhook callback URLs); default http://<bound http_address>."""
    grpc_public_address: str = ""
    """host:port clients on other machines dial for gRPC (the A2A agent card's gRPC bindings); default
    the host of `http_public_url` with the bound gRPC port when that is set, else the bound address."""
    http_max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    """Largest HTTP request body; a larger one is refused with 413 before it is read whole."""
    http_read_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """How long a request's line and headers, and then its body, may take to arrive: a connection
    whose headers are late is closed, a body that is late is answered 408 (slow clients would
    otherwise hold connections for ever)."""
    session_ttl_ms: int = Field(default=1_800_000, ge=0, le=_MAX_MS)
    """Idle time after which a session is closed; 0 disables."""
    input_request_ttl_ms: int = Field(default=3_600_000, gt=0, le=_MAX_MS)
    """How long an input request waits for a human before it expires."""
    heartbeat_timeout_ms: int = Field(default=90_000, gt=0, le=_MAX_MS)
    """Silence after which a registered instance is unhealthy."""
    shutdown_grace_s: float = Field(default=5.0, ge=0, le=_MAX_S)
    """How long in-flight calls may finish on shutdown."""
    shutdown_timeout_s: float = Field(default=30.0, gt=0, le=_MAX_S)
    """How much longer than the grace (gRPC's, then HTTP's) a stop may take (a store that stopped
    answering holds the writes under way); past it, or at a second SIGINT/SIGTERM, the process exits
    at once, as a crash would: every acknowledged write is in the store and the next start resumes
    the rest."""
    subscriber_buffer: int = Field(default=1024, gt=0, le=1_000_000)
    """Events a live stream subscriber may fall behind before it is cut off."""
    max_streams_per_tenant: int = Field(default=2000, ge=0, le=1_000_000)
    """Live streams (WatchSession, Converse, streaming sends, agents' Connect) a tenant may hold
    open on one server; one more is RESOURCE_EXHAUSTED `TOO_MANY_STREAMS`. 0: no limit."""
    store: str = "memory"
    """`memory` (default), `sqlite:///path/to/mesh.db` or `postgresql://user@host:port/db`."""
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The event loop `serve` runs the server on: `uvloop` (libuv's, in C) or `asyncio` (the
    standard library's selector loop, in Python). Every completed gRPC write wakes the loop once:
    an event to 1,000 watchers costs about a third fewer server instructions on uvloop."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    """`json`: one JSON object per log line, with the session and trace ids when known."""
    auth: AuthSettings = AuthSettings()
    dispatch: DispatchSettings = DispatchSettings()
    internal_agents: dict[str, str] = {}
    """Role -> `module:Class` replacing an internal agent (orchestrator, executor, planner, chat, ...)."""
    tenants: list[TenantSettings] = []
    policies: list[PolicySettings] = []
    """Tool and plan policies."""
    guardrails: GuardrailSettings = GuardrailSettings()
    retention: RetentionSettings = RetentionSettings()
    postgres: PostgresSettings = PostgresSettings()
    replica: ReplicaSettings = ReplicaSettings()
    adapters: dict[str, dict[str, Any]] = {}
    """Adapter name -> its configuration."""
    metrics: MetricsSettings = MetricsSettings()

    @field_validator("policies")
    @classmethod
    def _unique_policy_names(cls, value: list[PolicySettings]) -> list[PolicySettings]:
        names = [p.name for p in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"policy names must be unique: {', '.join(duplicates)}")
        return value

    @field_validator("store")
    @classmethod
    def _store_kind(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError(
                f"unknown store {value!r}: use memory, sqlite:///path/to/mesh.db or "
                "postgresql://user@host:port/db"
            )
        return value

    @field_validator("http_public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if not value:
            return value
        parsed = urllib.parse.urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
            raise ValueError("must be an http(s) URL with a host, for example https://mesh.example.com")
        return value

    @field_validator("grpc_address", "http_address", "grpc_public_address")
    @classmethod
    def _host_port(cls, value: str, info: ValidationInfo) -> str:
        if not value and info.field_name == "grpc_public_address":
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError("must be host:port, for example 127.0.0.1:50051")
        return value

    def public_grpc_target(self, port: int) -> str:
        """``host:port`` of the gRPC server for clients elsewhere (see ``grpc_public_address``)."""
        if self.grpc_public_address:
            return self.grpc_public_address
        if self.http_public_url:
            host = urllib.parse.urlsplit(self.http_public_url).hostname or ""
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return dial_address(self.grpc_address, port)


def parse_settings(data: Any, *, source: str = "settings") -> Settings:
    """Validate already-parsed JSON."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError("\n".join(f"{source}: {p}" for p in validation_problems(exc))) from None


def validation_problems(exc: ValidationError, *, prefix: str = "") -> list[str]:
    """One line per error: the key's path (after ``prefix``, e.g. ``adapters.webhook``) and what is wrong.

    Paths read as in the file: ``adapters.webhook.targets[0].url: ...``.
    """
    problems = []
    for error in exc.errors():
        path = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        else:  # a validator's ValueError reads as itself, without pydantic's "Value error, "
            message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{path.lstrip('.') or '(top level)'}: {message}")
    return problems


def with_overrides(settings: Settings, **overrides: Any) -> Settings:
    """``settings`` with some keys replaced, validated like the file (command-line flags)."""
    data = settings.model_dump()
    data.update(overrides)
    return parse_settings(data, source="command line")


def load_settings(path: str | Path) -> Settings:
    """Read and validate a settings file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such settings file") from None
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{path}: not valid JSON: {exc}") from None
    return parse_settings(data, source=str(path))


DEFAULT_SETTINGS_FILE = "settings.json"
"""Read from the working directory when no file is named; the repository's copy documents every key."""


def settings_for_serve(path: str | Path | None) -> tuple[Settings, str]:
    """The settings ``serve`` runs with, and where they came from (for the log).

    A named file must exist and be valid. Without one, ``./settings.json`` is read when
    there is one (the repository root has it), and otherwise the embedded defaults
    serve: the same values as that file, so the server starts from any directory.
    """
    if path is not None:
        return load_settings(path), str(path)
    default = Path(DEFAULT_SETTINGS_FILE)
    if default.is_file():
        return load_settings(default), str(default)
    return Settings(), f"embedded defaults (no ./{DEFAULT_SETTINGS_FILE} here)"


class ResolvedAuth:
    """Token settings, credentials and keys after applying the environment."""

    def __init__(
        self,
        tokens: TokenSettings,
        credentials: tuple[Credential, ...],
        development: bool,
        dispatch_key_pem: str | None = None,
    ) -> None:
        self.tokens = tokens
        self.credentials = credentials
        self.development = development
        """True when the loopback-only development default is in use."""
        self.dispatch_key_pem = dispatch_key_pem
        """The private key dispatch tokens are signed with (``dispatch.signing_key_env``), if set."""


def resolve_auth(settings: Settings, env: Mapping[str, str] | None = None) -> ResolvedAuth:
    """The secrets from the environment: the token signing key (without one, the development
    default) and the dispatch signing key."""
    env = os.environ if env is None else env
    auth = settings.auth
    credentials = tuple(
        Credential(tenant.tenant_id, c.client_id, c.secret_hash, tuple(Scope(s) for s in c.scopes))
        for tenant in settings.tenants
        for c in tenant.credentials
    )
    key = env.get(auth.signing_key_env, "")
    development = not key
    if development:
        key = _DEV_SIGNING_KEY
        if not any(c.client_id == DEV_CLIENT_ID for c in credentials):
            dev = Credential(
                DEV_TENANT_ID, DEV_CLIENT_ID, hash_secret(DEV_CLIENT_SECRET), (Scope.FULL, Scope.ADMIN)
            )
            credentials = (*credentials, dev)
    elif len(key.encode()) < 32:
        raise SettingsError(f"${auth.signing_key_env}: the signing key must be at least 32 bytes")
    seen: set[str] = set()
    for c in credentials:
        if c.client_id in seen:
            raise SettingsError(f"tenants: client_id {c.client_id!r} appears more than once")
        seen.add(c.client_id)
    tokens = TokenSettings(
        signing_key=key,
        issuer=auth.issuer,
        default_ttl_s=auth.token_ttl_s,
        max_ttl_s=auth.max_token_ttl_s,
        clock_skew_s=auth.clock_skew_s,
        failed_per_client=auth.failed_attempts.per_client_id.limit(),
        failed_per_peer=auth.failed_attempts.per_peer.limit(),
    )
    dispatch_key = env.get(settings.dispatch.signing_key_env) or None
    if dispatch_key is None and not development:
        dispatch_key = _derived_dispatch_key(key)
    return ResolvedAuth(tokens, credentials, development, dispatch_key)


def _derived_dispatch_key(signing_key: str) -> str:
    """An Ed25519 dispatch key (PEM) derived from the token signing key, as ``TokenIssuer.derived_key``
    derives keys: every replica and every restart with the same signing key signs dispatch tokens
    with the same key, so an agent that fetched ``GetDispatchKeys`` from any of them verifies them."""
    seed = hmac.new(signing_key.encode(), b"svantic-grpc derived key: dispatch tokens", "sha256").digest()
    key = Ed25519PrivateKey.from_private_bytes(seed)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem.decode()


def replica_id(settings: Settings) -> str:
    """The replica's id: from settings, else host name and gRPC port (and process id for port 0)."""
    if settings.replica.id:
        return settings.replica.id
    port = settings.grpc_address.rpartition(":")[2]
    suffix = port if port != "0" else f"0-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return f"{socket.gethostname()}:{suffix}"


def dial_address(address: str, port: int | str) -> str:
    """``host:port`` a client on this machine dials to reach a server bound to ``address``
    on ``port``: a wildcard host (all interfaces) is dialled on 127.0.0.1."""
    host = address.rpartition(":")[0]
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def is_loopback(address: str) -> bool:
    """True when a host:port binds only to this machine."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
