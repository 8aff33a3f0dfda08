"""Webhook adapter: signed notifications out, signed or token-carrying resolutions in.

It follows the Standard Webhooks scheme (https://www.standardwebhooks.com): every
notification carries ``webhook-id`` (one per message, the same on each retry of it),
``webhook-timestamp`` and ``webhook-signature`` (HMAC-SHA256 under the target's
``whsec_`` secret, made by the ``standardwebhooks`` package).

Out: ``input.required`` for each new request, then ``input.resolved``,
``input.expired`` or ``input.canceled`` for its outcome, POSTed to every target by
background tasks the adapter owns. Connection errors, timeouts, 5xx and 429 are
retried with capped exponential backoff and jitter; other answers are final.

In: ``POST /webhooks/receive`` resolves a request when the body carries the
callback token sent with the notification, or when it is signed with the inbound
secret inside the timestamp window. A callback token is a JWT (HS256) naming its
request and expiry: with ``callback_token_key_env`` set, a token sent before a
restart still answers its request after it. The first answer wins (200,
``"repeat": false``); the same token with the same answer again, say after a lost
response, gets that 200 again with ``"repeat": true``, at any time and after a
restart (see ``_webhook_callbacks``); any other answer to an ended request gets 409
naming who answered. A signed message is processed once per ``webhook-id``; a
replay gets ``{"status": "duplicate"}`` and changes nothing. A body nesting more than
``MAX_BODY_DEPTH`` levels is refused (400).

Sensitive forms never leave the mesh: their notifications carry no defaults, no
values and no callback token, and a webhook cannot answer them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import random
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from adapters._webhook_callbacks import CallbackTokens, Refused, Winners, fingerprint
from svantic_grpc.adapter import Adapter, AdapterContext
from svantic_grpc.core.errors import (
    AlreadyResolved,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from svantic_grpc.core.inputs.model import (
    Decision,
    Form,
    InputRequest,
    InputState,
    Resolution,
    Surface,
)

__all__ = [
    "MAX_BODY_DEPTH",
    "RECEIVE_PATH",
    "SENSITIVE_NOTE",
    "WebhookAdapter",
    "WebhookSettings",
    "WebhookTarget",
]

_log = logging.getLogger(__name__)

RECEIVE_PATH = "/webhooks/receive"
_MIN_TOKEN_KEY_BYTES = 32

SENSITIVE_NOTE = "This request has sensitive fields; complete it through the API or chat, not a webhook."
MAX_BODY_DEPTH = 16
"""How deeply an inbound body may nest objects and arrays (the body itself is level 1)."""
_DEFAULT_INBOUND_ENV = "SVANTIC_WEBHOOK_SECRET"
_SECRET_PREFIX = "whsec_"
_MIN_SECRET_BYTES = 24  # the Standard Webhooks recommendation (24 to 64 random bytes)
_OUTCOME_TYPES = {
    InputState.RESOLVED: "input.resolved",
    InputState.EXPIRED: "input.expired",
    InputState.CANCELED: "input.canceled",
}
# Domain errors -> HTTP status; the first matching class wins (subclasses first).
_HTTP_STATUS: tuple[tuple[type[MeshError], int], ...] = (
    (AlreadyResolved, 409),
    (NotFound, 404),
    (PermissionDenied, 403),
    (InvalidArgument, 422),
    (Unauthenticated, 401),
    (Conflict, 409),
    (FailedPrecondition, 409),
    (ResourceExhausted, 429),
    (Unavailable, 503),
)

_Key = tuple[str, str]
"""(tenant id, request id)"""


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class WebhookTarget:
    """One receiver of notifications."""

    url: str
    """Where notifications are POSTed (http or https)."""
    signer: Webhook = field(repr=False)
    """Signs with the target's secret (from the env var named by ``secret_env``)."""


@dataclass(frozen=True)
class WebhookSettings:
    """The adapter's configuration (``adapters.<name>`` in settings.json, secrets from env)."""

    targets: tuple[WebhookTarget, ...]
    """Receivers of notifications; may be empty (inbound only)."""
    inbound: Webhook | None = field(repr=False)
    """Verifies signed resolutions; ``None`` when no inbound secret is set (tokens only)."""
    max_attempts: int = 5
    """Deliveries tried per notification and target, the first included."""
    backoff_ms: int = 500
    """Delay before the first retry; doubles on each one, with jitter."""
    max_backoff_ms: int = 30_000
    """Cap on the delay between two attempts."""
    timeout_ms: int = 5_000
    """Time allowed for one attempt, connection and answer included."""
    tolerance_s: int = 300
    """How far an inbound ``webhook-timestamp`` may be from now."""
    callback_token_ttl_s: float | None = None
    """Lifetime of a callback token; ``None``: until the request expires."""
    token_key: bytes | None = field(default=None, repr=False)
    """Signs callback tokens (from ``callback_token_key_env``); ``None``: a random key per
    process, so tokens do not outlive it."""

    @classmethod
    def parse(cls, name: str, config: Mapping[str, Any], env: Mapping[str, str]) -> WebhookSettings:
        """Validate ``config``; raises ``ValueError`` naming the offending key."""
        where = f"adapters.{name}"
        unknown = sorted(set(config) - _KNOWN_KEYS)
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(_KNOWN_KEYS))})")
        raw_targets = config.get("targets", [])
        if not isinstance(raw_targets, list):
            raise ValueError(f"{where}.targets: must be a list of {{url, secret_env}}")
        targets = tuple(_target(f"{where}.targets[{i}]", raw, env) for i, raw in enumerate(raw_targets))
        inbound_env = config.get("inbound_secret_env", _DEFAULT_INBOUND_ENV)
        if not isinstance(inbound_env, str) or not inbound_env:
            raise ValueError(f"{where}.inbound_secret_env: must name an environment variable")
        inbound = None
        if env.get(inbound_env) or "inbound_secret_env" in config:
            inbound = _secret(f"{where}.inbound_secret_env", inbound_env, env)
        ttl = config.get("callback_token_ttl_s")
        token_key = None
        if "callback_token_key_env" in config:
            key_env = config["callback_token_key_env"]
            if not isinstance(key_env, str) or not key_env:
                raise ValueError(f"{where}.callback_token_key_env: must name an environment variable")
            token_key = env.get(key_env, "").encode()
            if len(token_key) < _MIN_TOKEN_KEY_BYTES:
                raise ValueError(
                    f"{where}.callback_token_key_env: environment variable {key_env} must hold "
                    f"a key of at least {_MIN_TOKEN_KEY_BYTES} bytes"
                )
        return cls(
            targets=targets,
            inbound=inbound,
            max_attempts=_integer(where, config, "max_attempts", 5, minimum=1),
            backoff_ms=_integer(where, config, "backoff_ms", 500, minimum=0),
            max_backoff_ms=_integer(where, config, "max_backoff_ms", 30_000, minimum=0),
            timeout_ms=_integer(where, config, "timeout_ms", 5_000, minimum=1),
            tolerance_s=_integer(where, config, "tolerance_s", 300, minimum=1),
            callback_token_ttl_s=None if ttl is None else _positive(f"{where}.callback_token_ttl_s", ttl),
            token_key=token_key,
        )


_KNOWN_KEYS = frozenset(
    {
        "targets",
        "inbound_secret_env",
        "max_attempts",
        "backoff_ms",
        "max_backoff_ms",
        "timeout_ms",
        "tolerance_s",
        "callback_token_ttl_s",
        "callback_token_key_env",
    }
)


def _target(where: str, raw: object, env: Mapping[str, str]) -> WebhookTarget:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be an object {{url, secret_env}}")
    unknown = sorted(set(raw) - {"url", "secret_env"})
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (known: secret_env, url)")
    url = raw.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}.url: must be an http:// or https:// URL")
    assert isinstance(url, str)
    secret_env = raw.get("secret_env")
    if not isinstance(secret_env, str) or not secret_env:
        raise ValueError(f"{where}.secret_env: must name an environment variable")
    return WebhookTarget(url=url, signer=_secret(f"{where}.secret_env", secret_env, env))


def _secret(where: str, variable: str, env: Mapping[str, str]) -> Webhook:
    value = env.get(variable, "")
    if not value:
        raise ValueError(f"{where}: environment variable {variable} is not set")
    body = value.removeprefix(_SECRET_PREFIX)
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not value.startswith(_SECRET_PREFIX) or len(key) < _MIN_SECRET_BYTES:
        raise ValueError(
            f"{where}: {variable} must hold a Standard Webhooks secret, "
            f"whsec_<base64 of at least {_MIN_SECRET_BYTES} random bytes>"
        )
    return Webhook(key)


def _integer(where: str, config: Mapping[str, Any], key: str, default: int, *, minimum: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}.{key}: must be an integer >= {minimum}")
    return value


def _positive(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{where}: must be a number > 0")
    return float(value)


# ---------------------------------------------------------------- what goes out


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _form_json(form: Form | None) -> dict[str, Any] | None:
    if form is None:
        return None
    fields = []
    for f in form.fields:
        if f.private:
            continue  # nothing of a sensitive field leaves the mesh, not even its label
        item: dict[str, Any] = {
            "name": f.name,
            "type": f.type,
            "label": f.label,
            "required": f.required,
            "sensitive": f.sensitive,
            "options": list(f.options),
        }
        if f.default is not None:
            item["default"] = f.default
        fields.append(item)
    return {
        "title": form.title,
        "description": form.description,
        "sensitive": form.sensitive,
        "fields": fields,
    }


def _public_values(request: InputRequest, values: Mapping[str, Any]) -> dict[str, Any]:
    """Form values minus those of sensitive fields."""
    hidden = {f.name for f in request.form.fields if f.private} if request.form else set()
    return {k: v for k, v in values.items() if k not in hidden}


def _request_json(request: InputRequest) -> dict[str, Any]:
    """The request as a webhook receiver sees it; never a sensitive default or value."""
    call = request.tool_call
    data: dict[str, Any] = {
        "id": request.request_id,
        "tenant": request.tenant_id,
        "session": request.session_id,
        "message": request.message_id,
        "kind": request.kind.value,
        "summary": request.summary,
        "state": request.state.value,
        "created_at": _iso(request.created_at),
        "expires_at": _iso(request.expires_at),
        "tool_call": None
        if call is None
        else {"name": call.tool_name, "arguments": call.arguments, "agent_type": call.agent_type},
        "plan": [
            {"description": p.description, "agent_type": p.agent_type, "tool_name": p.tool_name}
            for p in request.plan
        ],
        "form": _form_json(request.form),
        "allowed_decisions": [d.value for d in request.allowed_decisions],
        "allowed_responders": list(request.allowed_responders),
        "policy": request.policy,
        "sensitive": request.sensitive,
    }
    if request.state is not InputState.PENDING:
        r = request.resolution
        data["outcome_reason"] = request.outcome_reason
        data["resolution"] = (
            None
            if r is None
            else {
                "decision": r.decision.value if r.decision else None,
                "reason": r.reason,
                "confirmed": r.confirmed,
                "values": _public_values(request, r.values),
                "payload": r.payload,
                "resolved_by": r.resolved_by,
                "surface": r.surface.value,
                "resolved_at": _iso(r.resolved_at),
            }
        )
    return data


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class _Message:
    """One notification to one target; retries resend it under the same id."""

    webhook_id: str
    type: str
    request_id: str
    body: str

    def __str__(self) -> str:
        return f"{self.type} of {self.request_id} ({self.webhook_id})"


# ---------------------------------------------------------------- what comes in


@dataclass(frozen=True)
class _Answer:
    """A parsed inbound body."""

    request_id: str
    tenant_id: str
    responder: str
    decision: Decision | None
    reason: str
    values: dict[str, Any]
    confirmed: bool
    payload: dict[str, Any]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> _Answer:
        def text(key: str, default: str = "") -> str:
            value = body.get(key, default)
            if value is None:
                return default
            if not isinstance(value, str):
                raise InvalidArgument(key, "must be a string")
            return value

        def obj(key: str) -> dict[str, Any]:
            value = body.get(key)
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise InvalidArgument(key, "must be an object")
            return value

        decision = text("decision")
        choices = [d.value for d in Decision]
        if decision and decision not in choices:
            raise InvalidArgument("decision", f"must be one of {', '.join(choices)}")
        confirmed = body.get("confirmed", False)
        if not isinstance(confirmed, bool):
            raise InvalidArgument("confirmed", "must be true or false")
        return cls(
            request_id=text("request_id"),
            tenant_id=text("tenant_id"),
            responder=text("responder") or "webhook",
            decision=Decision(decision) if decision else None,
            reason=text("reason"),
            values=obj("values"),
            confirmed=confirmed,
            payload=obj("payload"),
        )

    def content(self) -> dict[str, Any]:
        """What the answer says (its target left out)."""
        return {
            "responder": self.responder,
            "decision": self.decision.value if self.decision else None,
            "reason": self.reason,
            "values": self.values,
            "confirmed": self.confirmed,
            "payload": self.payload,
        }

    def resolution(self, now: float) -> Resolution:
        return Resolution(
            decision=self.decision,
            reason=self.reason,
            values=self.values,
            confirmed=self.confirmed,
            payload=self.payload,
            resolved_by=self.responder,
            surface=Surface.WEBHOOK,
            resolved_at=now,
        )


def _error(status: int, reason: str, message: str, field: str = "") -> JSONResponse:
    error: dict[str, str] = {"reason": reason, "message": message}
    if field:
        error["field"] = field
    return JSONResponse({"status": "refused", "error": error}, status_code=status)


def _mesh_error(exc: MeshError) -> JSONResponse:
    status = next((code for cls, code in _HTTP_STATUS if isinstance(exc, cls)), 400)
    return _error(status, exc.reason, exc.message, exc.field if isinstance(exc, InvalidArgument) else "")


def _depth(value: Any) -> int:
    """How deeply ``value`` nests objects and arrays (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


class _StrictJsonError(ValueError):
    """Valid to Python's json module, but not JSON the mesh can keep as it came."""


def _no_constant(name: str) -> Any:
    raise _StrictJsonError(f"{name} is not a JSON number")


def _int64(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise _StrictJsonError(f"the integer {text} does not fit in 64 bits")
    return value


# ---------------------------------------------------------------- the adapter


class WebhookAdapter(Adapter):
    """Tells webhook targets about input requests and resolves them from signed or tokened calls.

    Args:
        name: The adapter's key under ``adapters`` in settings.json.
        config: That key's object (see ``WebhookSettings``).
        context: The mesh.
        env: The process environment; secrets come from here.
        rng: Source of retry jitter (tests pass a seeded one).

    Raises:
        ValueError: ``config`` is invalid or a secret is missing; the message names the key.
    """

    def __init__(
        self,
        name: str,
        config: Mapping[str, Any],
        context: AdapterContext,
        env: Mapping[str, str],
        *,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name, config, context, env)
        self.settings = WebhookSettings.parse(name, config, env)
        self._rng = rng or random.Random()
        self._client: httpx.AsyncClient | None = None
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._announcing: dict[_Key, set[asyncio.Task[None]]] = {}
        self._tokens = CallbackTokens(self.settings.token_key or secrets.token_bytes(_MIN_TOKEN_KEY_BYTES))
        self._winners = Winners(context)
        self._seen: dict[str, int] = {}  # processed webhook-id -> its timestamp, oldest first

    # -- lifecycle

    def routes(self) -> Sequence[BaseRoute]:
        return (Route(RECEIVE_PATH, self._receive, methods=["POST"]),)

    async def start(self) -> None:
        if self.settings.inbound is None:
            _log.info("webhook adapter %s: no inbound secret; only callback tokens resolve", self.name)
        if self.settings.token_key is None:
            _log.info(
                "webhook adapter %s: no callback_token_key_env; callback tokens end with this process",
                self.name,
            )
        self._session()

    async def stop(self) -> None:
        """Cancel pending deliveries and wait for them; idempotent."""
        self._stopped = True
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def drain(self) -> None:
        """Wait until every delivery in flight has succeeded, been refused or given up."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def _session(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.settings.timeout_ms / 1000, follow_redirects=False, trust_env=False
            )
        return self._client

    # -- outbound

    async def on_request(self, request: InputRequest) -> None:
        try:
            self._announce(request)
        except Exception:
            _log.exception("webhook adapter %s: could not announce %s", self.name, request.request_id)

    async def on_outcome(self, request: InputRequest) -> None:
        try:
            self._report(request)
        except Exception:
            _log.exception("webhook adapter %s: could not report %s", self.name, request.request_id)

    def _announce(self, request: InputRequest) -> None:
        if self._stopped:
            _log.warning("webhook adapter %s stopped; %s not announced", self.name, request.request_id)
            return
        key = (request.tenant_id, request.request_id)
        data = _request_json(request)
        callback_url = self.context.http_base_url.rstrip("/") + RECEIVE_PATH
        for target in self.settings.targets:
            notification: dict[str, Any] = {"type": "input.required", "request": data, "callback": None}
            if request.sensitive:
                notification["note"] = SENSITIVE_NOTE
            else:
                token, expires_at = self._issue_token(request)
                notification["callback"] = {
                    "url": callback_url,
                    "token": token,
                    "expires_at": _iso(expires_at),
                }
            task = self._spawn(target, self._message(request, notification))
            self._announcing.setdefault(key, set()).add(task)
            task.add_done_callback(partial(self._announced, key))

    def _announced(self, key: _Key, task: asyncio.Task[None]) -> None:
        tasks = self._announcing.get(key)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._announcing[key]

    def _report(self, request: InputRequest) -> None:
        kind = _OUTCOME_TYPES.get(request.state)
        if kind is None:
            _log.warning("webhook adapter %s: %s has not ended", self.name, request.request_id)
            return
        key = (request.tenant_id, request.request_id)
        # An announcement still retrying is moot now; it ends before the outcome goes out.
        earlier = tuple(self._announcing.pop(key, ()))
        for task in earlier:
            task.cancel()
        if self._stopped:
            return
        notification = {"type": kind, "request": _request_json(request)}
        for target in self.settings.targets:
            self._spawn(target, self._message(request, notification), after=earlier)

    def _message(self, request: InputRequest, notification: Mapping[str, Any]) -> _Message:
        return _Message(
            webhook_id=self.context.ids.new_id("msg_"),
            type=str(notification["type"]),
            request_id=request.request_id,
            body=_dumps(notification),
        )

    def _spawn(
        self, target: WebhookTarget, message: _Message, after: Iterable[asyncio.Task[None]] = ()
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(
            self._deliver(target, message, tuple(after)), name=f"webhook {message.webhook_id} -> {target.url}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _deliver(
        self, target: WebhookTarget, message: _Message, after: tuple[asyncio.Task[None], ...]
    ) -> None:
        if after:
            await asyncio.wait(after)
        attempts = self.settings.max_attempts
        last = ""
        try:
            for attempt in range(1, attempts + 1):
                retry_after: float | None = None
                try:
                    status, retry_after = await self._post(target, message)
                except (httpx.TransportError, TimeoutError) as exc:
                    last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                else:
                    if 200 <= status < 300:
                        _log.debug("webhook %s delivered to %s", message, target.url)
                        return
                    last = f"HTTP {status}"
                    if status < 500 and status != 429:
                        _log.warning(
                            "webhook %s refused by %s with HTTP %d; not retried", message, target.url, status
                        )
                        return
                if attempt < attempts:
                    await asyncio.sleep(self._backoff_s(attempt, retry_after))
            _log.warning(
                "webhook %s to %s: gave up after %d attempts (last: %s)", message, target.url, attempts, last
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("webhook %s to %s failed", message, target.url)

    async def _post(self, target: WebhookTarget, message: _Message) -> tuple[int, float | None]:
        # Signed per attempt: a retry carries a fresh timestamp, so it stays inside receivers' windows.
        timestamp = math.floor(self.context.clock.now())
        signature = target.signer.sign(
            msg_id=message.webhook_id, timestamp=datetime.fromtimestamp(timestamp, tz=UTC), data=message.body
        )
        headers = {
            "content-type": "application/json",
            "webhook-id": message.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        # One deadline for the whole attempt, connection and answer included (httpx's own are per phase).
        async with asyncio.timeout(self.settings.timeout_ms / 1000):
            response = await self._session().post(target.url, content=message.body.encode(), headers=headers)
        return response.status_code, _seconds(response.headers.get("retry-after"))

    def _backoff_s(self, attempt: int, retry_after: float | None) -> float:
        cap = self.settings.max_backoff_ms / 1000
        ceiling = min(cap, self.settings.backoff_ms / 1000 * 2.0 ** min(attempt - 1, 32))
        delay = ceiling * self._rng.uniform(0.5, 1.0)
        return max(delay, min(retry_after, cap)) if retry_after is not None else delay

    # -- callback tokens

    def _issue_token(self, request: InputRequest) -> tuple[str, float]:
        expires_at = request.expires_at
        if self.settings.callback_token_ttl_s is not None:
            expires_at = min(expires_at, self.context.clock.now() + self.settings.callback_token_ttl_s)
        return self._tokens.issue(request, expires_at), expires_at

    # -- inbound

    async def _receive(self, request: Request) -> JSONResponse:
        try:
            text = (await request.body()).decode()
            body = json.loads(text, parse_constant=_no_constant, parse_int=_int64)
        except RecursionError:
            return _error(400, "MALFORMED_JSON", f"body must nest at most {MAX_BODY_DEPTH} levels")
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
            detail = f": {exc.args[0]}" if isinstance(exc, _StrictJsonError) else ""
            return _error(400, "MALFORMED_JSON", f"body must be a JSON object{detail}")
        if not isinstance(body, dict):
            return _error(400, "MALFORMED_JSON", "body must be a JSON object")
        if _depth(body) > MAX_BODY_DEPTH:
            # What is stored must stay readable by every client (protobuf decoders stop at ~100 levels).
            return _error(400, "MALFORMED_JSON", f"body must nest at most {MAX_BODY_DEPTH} levels")
        try:
            # Standard Webhooks headers, when present, decide alone: a bad signature is refused
            # even if the body also carries a token.
            signed = _signature_headers(request.headers)
            if signed is not None:
                webhook_id, timestamp = self._verify(text, signed)
                if webhook_id in self._seen:
                    return JSONResponse({"status": "duplicate"})
                return await self._resolve_signed(body, webhook_id, timestamp)
            if isinstance(body.get("callback_token"), str):
                return await self._resolve_with_token(body)
            raise Refused(401, "UNAUTHENTICATED", "needs a valid webhook-signature or callback_token")
        except Refused as exc:
            return _error(exc.status, exc.reason, exc.message, exc.field)
        except MeshError as exc:
            return _mesh_error(exc)
        except Exception:
            _log.exception("webhook adapter %s: resolving through %s failed", self.name, RECEIVE_PATH)
            return _error(500, "INTERNAL", "the mesh could not take this answer; try again")

    async def _resolve_signed(self, body: dict[str, Any], webhook_id: str, timestamp: int) -> JSONResponse:
        self._remember(webhook_id, timestamp)  # before awaiting: a concurrent replay is a duplicate
        try:
            answer = _Answer.parse(body)
            if not answer.request_id:
                raise InvalidArgument("request_id", "required")
            if not answer.tenant_id:
                raise InvalidArgument("tenant_id", "required with a signature")
            return await self._resolve(answer.tenant_id, answer.request_id, answer, f"signature:{webhook_id}")
        except Exception:
            self._seen.pop(webhook_id, None)  # refused: nothing changed, so a resend is no duplicate
            raise

    async def _resolve_with_token(self, body: dict[str, Any]) -> JSONResponse:
        grant = self._tokens.check(str(body["callback_token"]))
        if body.get("request_id") not in (None, "", grant.request_id) or body.get("tenant_id") not in (
            None,
            "",
            grant.tenant_id,
        ):
            raise Refused(401, "INVALID_CALLBACK_TOKEN", "callback token is for another request")
        answer = _Answer.parse(body)
        return await self._resolve(
            grant.tenant_id, grant.request_id, answer, grant.credential, expires_at=grant.expires_at
        )

    async def _resolve(
        self,
        tenant_id: str,
        request_id: str,
        answer: _Answer,
        credential: str,
        *,
        expires_at: float | None = None,
    ) -> JSONResponse:
        """Answer the request once; the same credential and answer again learns that it won."""
        answered = fingerprint(answer.content())
        async with self._winners.hold(tenant_id, request_id):
            current = await self.context.get_request(tenant_id=tenant_id, request_id=request_id)
            pending = current.state is InputState.PENDING
            if pending:
                if expires_at is not None and self.context.clock.now() >= expires_at:
                    raise Refused(401, "CALLBACK_TOKEN_EXPIRED", "callback token expired")
                if current.sensitive:
                    raise Refused(422, "SENSITIVE_INPUT", SENSITIVE_NOTE, "values")
                await self._winners.claim(
                    tenant_id, request_id, credential=credential, answer=answered, responder=answer.responder
                )
            else:
                won = await self._winners.won(current, credential)
                if won == answered:  # a retry of the answer that won: the same success, marked
                    body = {"status": "resolved", "repeat": True, "request": _request_json(current)}
                    return JSONResponse(body)
                if won is not None:
                    raise AlreadyResolved(
                        f"input request {request_id!r} was already answered with this callback "
                        "credential, differently; the first answer stands",
                        metadata={"winner": "this credential"},
                    )
                # Otherwise the mesh refuses it below, naming who answered, how and when.
            try:
                resolved = await self.context.resolve(
                    tenant_id=tenant_id,
                    request_id=request_id,
                    resolution=answer.resolution(self.context.clock.now()),
                    responder=answer.responder,
                    surface=Surface.WEBHOOK,
                )
            except MeshError:
                if pending:
                    await self._winners.release(tenant_id, request_id)  # refused: it changed nothing
                raise
        return JSONResponse({"status": "resolved", "repeat": False, "request": _request_json(resolved)})

    def _verify(self, text: str, signed: tuple[str, str, str]) -> tuple[str, int]:
        """Check a signed call against the inbound secret; returns (webhook id, timestamp)."""
        webhook_id, stamp, signatures = signed
        if self.settings.inbound is None:
            raise Refused(401, "UNAUTHENTICATED", "signed resolutions are not enabled (no inbound secret)")
        if not (webhook_id and stamp and signatures):
            raise Refused(401, "UNAUTHENTICATED", "needs webhook-id, webhook-timestamp and webhook-signature")
        try:
            timestamp = int(stamp)
        except ValueError:
            raise Refused(
                401, "UNAUTHENTICATED", "webhook-timestamp must be seconds since the epoch"
            ) from None
        # Checked with the mesh clock (the package's own check uses the wall clock and a fixed window).
        if abs(self.context.clock.now() - timestamp) > self.settings.tolerance_s:
            raise Refused(
                401,
                "STALE_TIMESTAMP",
                f"webhook-timestamp is outside the {self.settings.tolerance_s} s window",
            )
        expected = self.settings.inbound.sign(
            msg_id=webhook_id,
            timestamp=datetime.fromtimestamp(timestamp, tz=UTC),
            data=text,
        ).encode()
        for candidate in signatures.split(" "):
            if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected):
                return webhook_id, timestamp
        raise Refused(401, "BAD_SIGNATURE", "webhook-signature does not match")

    def _remember(self, webhook_id: str, timestamp: int) -> None:
        # Ids older than the window can go: a replay of them is refused as stale anyway.
        horizon = self.context.clock.now() - self.settings.tolerance_s
        while self._seen:
            oldest = next(iter(self._seen))
            if self._seen[oldest] >= horizon:
                break
            del self._seen[oldest]
        self._seen[webhook_id] = timestamp


def _signature_headers(headers: Mapping[str, str]) -> tuple[str, str, str] | None:
    """(id, timestamp, signature) when any Standard Webhooks header is present."""
    webhook_id, stamp, signature = (
        headers.get(n, "") for n in ("webhook-id", "webhook-timestamp", "webhook-signature")
    )
    if not (webhook_id or stamp or signature):
        return None
    return webhook_id, stamp, signature


def _seconds(header: str | None) -> float | None:
    """A ``Retry-After`` given in seconds (dates are ignored)."""
    try:
        return max(0.0, float(header)) if header else None
    except ValueError:
        return None
