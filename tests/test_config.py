"""settings.json: loading, validation that names the key, auth resolution and the loopback rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from svantic_grpc.config import (
    DEV_CLIENT_ID,
    Settings,
    SettingsError,
    is_loopback,
    load_settings,
    parse_settings,
    resolve_auth,
)
from svantic_grpc.core.auth import Scope, hash_secret, verify_secret
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.dispatch import DispatchTokens
from svantic_grpc.server import MeshServer
from tests._support import SIGNING_ENV, tenant_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "SVANTIC_SIGNING_KEY"
GOOD_KEY = "k" * 32


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "settings.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _error(data: Any) -> str:
    with pytest.raises(SettingsError) as excinfo:
        parse_settings(data)
    return str(excinfo.value)


# --- the committed file and defaults ---------------------------------------------------------


def test_committed_settings_file_loads_with_the_documented_defaults() -> None:
    settings = load_settings(REPO_ROOT / "settings.json")
    assert settings.session_ttl_ms == 1_800_000
    assert settings.store == "memory"
    assert settings.heartbeat_timeout_ms > 0
    assert settings.input_request_ttl_ms > 0
    assert settings.auth.signing_key_env == KEY_ENV
    assert settings.auth.token_ttl_s == 86_400
    assert is_loopback(settings.grpc_address)
    assert is_loopback(settings.http_address)
    assert settings.tenants == []
    assert settings.event_loop == "uvloop"


def test_an_unknown_event_loop_is_refused_naming_the_key() -> None:
    message = _error({"event_loop": "trio"})
    assert "event_loop" in message


def test_the_committed_file_says_exactly_the_embedded_defaults() -> None:
    # `serve` outside the repository runs on Settings(); at the root it reads this file.
    assert load_settings(REPO_ROOT / "settings.json") == Settings()


def test_an_empty_object_gets_the_same_defaults() -> None:
    settings = parse_settings({})
    assert settings.session_ttl_ms == 1_800_000
    assert settings.store == "memory"
    assert settings.auth.token_ttl_s == 86_400


def test_zero_session_ttl_is_allowed_and_disables_the_reaper() -> None:
    assert parse_settings({"session_ttl_ms": 0}).session_ttl_ms == 0


def test_tenants_and_credentials_load() -> None:
    settings = parse_settings({"tenants": tenant_settings()})
    assert [t.tenant_id for t in settings.tenants] == ["acme", "globex"]
    assert [c.client_id for c in settings.tenants[0].credentials] == ["acme-full", "acme-read", "acme-admin"]
    assert settings.tenants[0].credentials[1].scopes == ["read"]


# --- errors name the key ----------------------------------------------------------------------


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, {"session_ttl_ms": "soon"})
    with pytest.raises(SettingsError) as excinfo:
        load_settings(path)
    message = str(excinfo.value)
    assert "session_ttl_ms" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("data", "path"),
    [
        pytest.param({"auth": {"token_ttl_s": "a day"}}, "auth.token_ttl_s", id="nested"),
        pytest.param({"heartbeat_timeout_ms": True}, "heartbeat_timeout_ms", id="bool-for-int"),
        pytest.param({"session_ttl_ms": 1.5}, "session_ttl_ms", id="float-for-int"),
        pytest.param({"tenants": {"acme": {}}}, "tenants", id="object-for-list"),
        pytest.param({"log_level": "LOUD"}, "log_level", id="not-a-choice"),
    ],
)
def test_wrong_types_name_the_key_path(data: dict[str, Any], path: str) -> None:
    message = _error(data)
    assert f"{path}:" in message


def test_a_bad_list_item_names_its_index_path() -> None:
    tenants = tenant_settings()
    tenants[1]["credentials"] = [{"client_id": "globex-full", "secret_hash": "plain-text-secret"}]
    message = _error({"tenants": tenants})
    assert "tenants[1].credentials[0].secret_hash" in message


def test_an_unknown_scope_names_its_index_path() -> None:
    tenants = tenant_settings()
    tenants[0]["credentials"][0]["scopes"] = ["full", "root"]
    assert "tenants[0].credentials[0].scopes[1]" in _error({"tenants": tenants})


@pytest.mark.parametrize(
    ("data", "path"),
    [
        pytest.param({"session_ttl": 5}, "session_ttl", id="top-level"),
        pytest.param({"auth": {"signing_key": "x" * 40}}, "auth.signing_key", id="nested"),
        pytest.param({"tenants": [{"tenant_id": "acme", "name": "Acme"}]}, "tenants[0].name", id="in-list"),
    ],
)
def test_unknown_keys_are_reported_not_ignored(data: dict[str, Any], path: str) -> None:
    message = _error(data)
    assert path in message
    assert "unknown" in message


def test_every_problem_is_reported_at_once() -> None:
    message = _error({"session_ttl_ms": "soon", "store": 3, "bogus": 1})
    for key in ("session_ttl_ms", "store", "bogus"):
        assert key in message


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"session_ttl_ms": -1}, id="negative-session-ttl"),
        pytest.param({"heartbeat_timeout_ms": 0}, id="zero-heartbeat-timeout"),
        pytest.param({"input_request_ttl_ms": -5}, id="negative-input-ttl"),
        pytest.param({"auth": {"token_ttl_s": 0}}, id="zero-token-ttl"),
        # found from outside: durations past any timestamp started, then broke every call
        pytest.param({"session_ttl_ms": 10**30}, id="session-ttl-past-any-timestamp"),
        pytest.param({"input_request_ttl_ms": 10**20}, id="input-ttl-past-any-timestamp"),
        pytest.param({"dispatch": {"timeout_ms": 10**20}}, id="dispatch-timeout-past-any-timestamp"),
        pytest.param({"retention": {"closed_sessions_s": 10**15}}, id="retention-past-any-timestamp"),
    ],
)
def test_out_of_range_numbers_are_refused(data: dict[str, Any]) -> None:
    (key,) = data
    assert key in _error(data)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.0.0.1:", ":50051", "127.0.0.1:http", "127.0.0.1:70000", "", "localhost:-1"],
)
def test_bad_grpc_address_is_refused(address: str) -> None:
    assert "grpc_address" in _error({"grpc_address": address})


def test_bad_http_address_is_refused() -> None:
    assert "http_address" in _error({"http_address": "nowhere"})


@pytest.mark.parametrize("address", ["127.0.0.1:0", "0.0.0.0:50051", "[::1]:0", "localhost:8080"])
def test_good_addresses_are_accepted(address: str) -> None:
    assert parse_settings({"grpc_address": address}).grpc_address == address


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(SettingsError) as excinfo:
        load_settings(missing)
    assert str(missing) in str(excinfo.value)
    assert "no such settings file" in str(excinfo.value)


def test_invalid_json_is_a_clear_error(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"session_ttl_ms": 1800000,}')
    with pytest.raises(SettingsError) as excinfo:
        load_settings(path)
    assert str(path) in str(excinfo.value)
    assert "not valid JSON" in str(excinfo.value)
    assert "line 1" in str(excinfo.value)


def test_a_json_document_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError):
        load_settings(_write(tmp_path, "[1, 2]"))


# --- resolve_auth -----------------------------------------------------------------------------


def test_without_a_signing_key_the_development_credential_is_used() -> None:
    auth = resolve_auth(parse_settings({}), env={})
    assert auth.development
    (dev,) = auth.credentials
    assert dev.client_id == DEV_CLIENT_ID == "svantic"
    assert verify_secret("your-secret", dev.secret_hash)
    assert Scope.FULL.satisfied_by(dev.scopes)
    assert len(auth.tokens.signing_key.encode()) >= 32


def test_an_empty_signing_key_counts_as_none() -> None:
    assert resolve_auth(parse_settings({}), env={KEY_ENV: ""}).development


def test_a_short_signing_key_is_refused() -> None:
    with pytest.raises(SettingsError) as excinfo:
        resolve_auth(parse_settings({}), env={KEY_ENV: "k" * 31})
    assert KEY_ENV in str(excinfo.value)
    assert "32 bytes" in str(excinfo.value)


def test_a_signing_key_turns_development_mode_off() -> None:
    auth = resolve_auth(parse_settings({"tenants": tenant_settings()}), env={KEY_ENV: GOOD_KEY})
    assert not auth.development
    assert auth.tokens.signing_key == GOOD_KEY
    ids = {c.client_id for c in auth.credentials}
    assert DEV_CLIENT_ID not in ids
    assert ids == {"acme-full", "acme-read", "acme-admin", "globex-full"}
    by_id = {c.client_id: c for c in auth.credentials}
    assert by_id["globex-full"].tenant_id == "globex"
    assert by_id["acme-read"].scopes == (Scope.READ,)


def test_the_dispatch_key_is_derived_from_the_signing_key_unless_set() -> None:
    # found from outside: replicas (and restarts) without SVANTIC_DISPATCH_KEY each signed dispatch
    # tokens with a key of their own, which agents that fetched another replica's keys refused
    def key_id(env: dict[str, str]) -> str | None:
        pem = resolve_auth(parse_settings({"tenants": tenant_settings()}), env=env).dispatch_key_pem
        if pem is None:
            return None
        return DispatchTokens(clock=ManualClock(), issuer="t", ttl_s=60, private_key_pem=pem).key_id

    one, same = key_id({KEY_ENV: GOOD_KEY}), key_id({KEY_ENV: GOOD_KEY})
    assert one is not None and one == same  # every replica and restart with this signing key
    assert key_id({KEY_ENV: "another-signing-key-of-32-bytes-or-more!"}) not in (None, one)
    own = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert key_id({KEY_ENV: GOOD_KEY, "SVANTIC_DISPATCH_KEY": own.decode()}) not in (None, one)
    assert resolve_auth(parse_settings({}), env={}).dispatch_key_pem is None  # development: per process


def test_the_signing_key_env_name_comes_from_settings() -> None:
    settings = parse_settings({"auth": {"signing_key_env": "MY_MESH_KEY"}})
    assert resolve_auth(settings, env={KEY_ENV: GOOD_KEY}).development
    assert not resolve_auth(settings, env={"MY_MESH_KEY": GOOD_KEY}).development


def test_token_settings_come_from_settings() -> None:
    settings = parse_settings({"auth": {"issuer": "acme-mesh", "token_ttl_s": 600, "max_token_ttl_s": 3600}})
    tokens = resolve_auth(settings, env={KEY_ENV: GOOD_KEY}).tokens
    assert (tokens.issuer, tokens.default_ttl_s, tokens.max_ttl_s) == ("acme-mesh", 600, 3600)


@pytest.mark.parametrize("same_tenant", [False, True])
def test_duplicate_client_ids_are_refused(same_tenant: bool) -> None:
    digest = tenant_settings()[0]["credentials"][0]["secret_hash"]
    credential = {"client_id": "shared", "secret_hash": digest}
    if same_tenant:
        tenants = [{"tenant_id": "acme", "credentials": [credential, credential]}]
    else:
        tenants = [
            {"tenant_id": "acme", "credentials": [credential]},
            {"tenant_id": "globex", "credentials": [credential]},
        ]
    with pytest.raises(SettingsError) as excinfo:
        resolve_auth(parse_settings({"tenants": tenants}), env={KEY_ENV: GOOD_KEY})
    assert "shared" in str(excinfo.value)


def test_hash_secret_is_salted_and_verifiable() -> None:
    first, second = hash_secret("hunter2"), hash_secret("hunter2")
    assert first != second
    assert first.startswith("scrypt$")
    assert verify_secret("hunter2", first) and verify_secret("hunter2", second)
    assert not verify_secret("hunter3", first)
    assert not verify_secret("hunter2", "not-a-hash")


# --- the loopback rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:0", True),
        ("127.0.0.2:50051", True),
        ("[::1]:0", True),
        ("localhost:0", True),
        ("0.0.0.0:0", False),
        ("[::]:0", False),
        ("10.1.2.3:50051", False),
        ("mesh.example.com:443", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def _settings(address: str) -> Settings:
    return parse_settings({"grpc_address": address, "http_address": address})


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "10.1.2.3:50051"])
def test_development_mode_refuses_a_non_loopback_bind(address: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        MeshServer(_settings(address), env={})
    assert "loopback" in str(excinfo.value)
    assert KEY_ENV in str(excinfo.value)


@pytest.mark.parametrize("address", ["127.0.0.1:0", "[::1]:0", "localhost:0"])
def test_development_mode_accepts_a_loopback_bind(address: str) -> None:
    server = MeshServer(_settings(address), env={})
    assert server.development


def test_a_signing_key_allows_a_non_loopback_bind() -> None:
    server = MeshServer(_settings("0.0.0.0:0"), env=SIGNING_ENV)
    assert not server.development


async def test_development_server_serves_on_loopback() -> None:
    async with MeshServer(_settings("127.0.0.1:0"), env={}) as server:
        assert server.port > 0
        assert server.target == f"127.0.0.1:{server.port}"


def test_an_unknown_store_is_a_settings_error() -> None:
    with pytest.raises(SettingsError) as excinfo:
        MeshServer(parse_settings({"store": "mongodb://nowhere", "grpc_address": "127.0.0.1:0"}), env={})
    assert "store" in str(excinfo.value)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        # found from outside: each started (or crashed after creating the schema) and failed later
        pytest.param(
            {"postgres": {"schema_name": "Review_Upper"}}, "postgres.schema_name", id="upper-case-schema"
        ),
        pytest.param(
            {"postgres": {"schema_name": "bad-schema; drop"}}, "postgres.schema_name", id="schema-sql"
        ),
        pytest.param({"http_public_url": "not a url"}, "http_public_url", id="public-url-not-a-url"),
        pytest.param(
            {"http_public_url": "ftp://mesh.example.com"}, "http_public_url", id="public-url-not-http"
        ),
        pytest.param({"tenants": [{"tenant_id": "has space"}]}, "tenants[0].tenant_id", id="tenant-id-space"),
        pytest.param({"store": ""}, "store", id="empty-store"),
        pytest.param({"store": "mysql://x"}, "store", id="unknown-store"),
        pytest.param({"auth": {"issuer": ""}}, "auth.issuer", id="empty-issuer"),
        pytest.param({"subscriber_buffer": 10**12}, "subscriber_buffer", id="huge-subscriber-buffer"),
    ],
)
def test_values_the_mesh_cannot_use_are_refused_naming_the_key(data: dict[str, Any], path: str) -> None:
    assert f"{path}:" in _error(data)


def test_a_secret_hash_scrypt_cannot_check_is_refused() -> None:
    tenants = tenant_settings()
    good = tenants[0]["credentials"][0]["secret_hash"]
    _, _cost, r, p, salt, digest = good.split("$")
    for cost in ("99999999", "1", "3"):  # not a power of two above 1
        tenants[0]["credentials"][0]["secret_hash"] = "$".join(("scrypt", cost, r, p, salt, digest))
        message = _error({"tenants": tenants})
        assert "tenants[0].credentials[0].secret_hash" in message and "hash-secret" in message
    tenants[0]["credentials"][0]["secret_hash"] = "$".join(("scrypt", str(2**20), r, p, salt, digest))
    assert "32 MiB" in _error({"tenants": tenants})  # more memory than scrypt may use here
