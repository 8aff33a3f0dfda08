"""The webhook adapter's settings (``adapters.<name>`` in settings.json), validated like the core's own.

Unknown keys and wrong types are refused with their path (``parse_adapter_settings``).
Secrets are named here and read from the environment: each target's Standard Webhooks
secret (``whsec_`` and the base64 of at least 24 random bytes), the inbound secret and
the callback token key are checked while the settings are read, so a missing or
malformed one stops the server naming the key that names it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from standardwebhooks import Webhook

from svantic_grpc.adapter import AdapterSettings, env_value

__all__ = ["DEFAULT_INBOUND_ENV", "MIN_TOKEN_KEY_BYTES", "TargetSettings", "WebhookSettings", "signer"]

DEFAULT_INBOUND_ENV = "SVANTIC_WEBHOOK_SECRET"
"""Read for the inbound secret when ``inbound_secret_env`` is not given (optional then)."""
MIN_TOKEN_KEY_BYTES = 32
_SECRET_PREFIX = "whsec_"
_MIN_SECRET_BYTES = 24  # the Standard Webhooks recommendation (24 to 64 random bytes)


class TargetSettings(AdapterSettings):
    """One receiver of notifications."""

    url: str
    """Where notifications are POSTed (http or https)."""
    secret_env: str = Field(min_length=1)
    """Environment variable holding the target's ``whsec_`` secret."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return url

    @field_validator("secret_env")
    @classmethod
    def _secret_set(cls, variable: str, info: ValidationInfo) -> str:
        _key(env_value(info, variable), variable)
        return variable


class WebhookSettings(AdapterSettings):
    """The adapter's configuration."""

    targets: list[TargetSettings] = Field(default_factory=list)
    """Receivers of notifications; may be empty (inbound only)."""
    inbound_secret_env: str | None = Field(default=None, min_length=1)
    """Environment variable holding the secret that signs inbound resolutions; not given:
    ``SVANTIC_WEBHOOK_SECRET`` when set, otherwise only callback tokens resolve."""
    max_attempts: int = Field(default=12, ge=1)
    """Deliveries tried per notification and target, the first included (the defaults span about
    five minutes: a receiver's deploy or a short outage still hears of every request)."""
    backoff_ms: int = Field(default=1_000, ge=0)
    """Delay before the first retry; doubles on each one, with jitter."""
    max_backoff_ms: int = Field(default=60_000, ge=0)
    """Cap on the delay between two attempts."""
    timeout_ms: int = Field(default=5_000, ge=1)
    """Time allowed for one attempt, connection and answer included."""
    tolerance_s: int = Field(default=300, ge=1)
    """How far an inbound ``webhook-timestamp`` may be from now."""
    callback_token_ttl_s: float | None = Field(default=None, gt=0)
    """Lifetime of a callback token; not given: until the request expires."""
    callback_token_key_env: str | None = Field(default=None, min_length=1)
    """Environment variable holding the key that signs callback tokens (32 bytes or more); not
    given: a random key per process, so tokens do not outlive it."""

    @model_validator(mode="before")
    @classmethod
    def _default_inbound(cls, data: Any, info: ValidationInfo) -> Any:
        # The default variable counts only when it is set; then it is checked like a named one.
        env: Mapping[str, str] = (info.context or {}).get("env", {})
        if isinstance(data, dict) and "inbound_secret_env" not in data and env.get(DEFAULT_INBOUND_ENV):
            return {**data, "inbound_secret_env": DEFAULT_INBOUND_ENV}
        return data

    @field_validator("inbound_secret_env")
    @classmethod
    def _inbound_set(cls, variable: str | None, info: ValidationInfo) -> str | None:
        if variable is not None:
            _key(env_value(info, variable), variable)
        return variable

    @field_validator("callback_token_key_env")
    @classmethod
    def _token_key_set(cls, variable: str | None, info: ValidationInfo) -> str | None:
        if variable is not None and len(env_value(info, variable).encode()) < MIN_TOKEN_KEY_BYTES:
            raise ValueError(
                f"environment variable {variable} must hold a key of at least {MIN_TOKEN_KEY_BYTES} bytes"
            )
        return variable

    def inbound(self, env: Mapping[str, str]) -> Webhook | None:
        """Verifies signed resolutions; ``None`` when no inbound secret is set (tokens only)."""
        return None if self.inbound_secret_env is None else signer(env, self.inbound_secret_env)

    def token_key(self, env: Mapping[str, str]) -> bytes | None:
        """The callback token key, or ``None`` (a random one per process)."""
        return None if self.callback_token_key_env is None else env[self.callback_token_key_env].encode()


def signer(env: Mapping[str, str], variable: str) -> Webhook:
    """Signs and verifies with the Standard Webhooks secret in ``variable``.

    Raises:
        ValueError: it is unset or not a ``whsec_`` secret of at least 24 bytes.
    """
    value = env.get(variable, "")
    if not value:
        raise ValueError(f"environment variable {variable} is not set")
    return Webhook(_key(value, variable))


def _key(value: str, variable: str) -> bytes:
    body = value.removeprefix(_SECRET_PREFIX)
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not value.startswith(_SECRET_PREFIX) or len(key) < _MIN_SECRET_BYTES:
        raise ValueError(
            f"{variable} must hold a Standard Webhooks secret, "
            f"whsec_<base64 of at least {_MIN_SECRET_BYTES} random bytes>"
        )
    return key
