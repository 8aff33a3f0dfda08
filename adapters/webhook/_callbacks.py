"""Callback tokens of the webhook adapter, and the record of which answer won.

A callback token is an HS256 JWT naming one request and an expiry: whoever holds it
may answer that request. It carries everything needed to check it, so the adapter
keeps no table of tokens; the mesh's one-answer rule makes it single-use in effect.

A caller whose response got lost retries with the same token. To tell it that its own
answer won, the adapter keeps one small record per request in the mesh's store
(``AdapterContext.remember``): which credential (token or ``webhook-id``) answered and
a fingerprint of the answer. The record is written *before* the answer is handed to
the mesh and dropped if the mesh refuses it, all under a per-request lock, so after
any crash or restart the record names the winner whenever a webhook answer won.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import jwt

from adapters.webhook._answers import Answer
from adapters.webhook._http import Refused
from svantic_grpc.adapter import AdapterContext
from svantic_grpc.core.errors import MeshError
from svantic_grpc.core.inputs.model import InputRequest, InputState, Surface

__all__ = ["CallbackTokens", "Grant", "Winners", "fingerprint"]

_AUDIENCE = "svantic-webhook-callback"

_Key = tuple[str, str]
"""(tenant id, request id)"""


@dataclass(frozen=True)
class Grant:
    """What a callback token allows: answering one request until ``expires_at``."""

    tenant_id: str
    request_id: str
    expires_at: float
    credential: str
    """Names the token in winner records (``token:`` and a digest, never the token)."""


class CallbackTokens:
    """Signs and checks callback tokens under one key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def issue(self, request: InputRequest, expires_at: float) -> str:
        claims = {
            "aud": _AUDIENCE,
            "tenant_id": request.tenant_id,
            "request_id": request.request_id,
            "expires_at": expires_at,
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(claims, self._key, algorithm="HS256")

    def check(self, token: str) -> Grant:
        """The token's grant; raises ``Refused`` (401) unless this key signed it.

        Its expiry is left to the caller, on the mesh's clock: an expired token still
        learns whether its own answer won.
        """
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                audience=_AUDIENCE,
                options={"require": ["aud", "jti"], "verify_exp": False},
            )
            return Grant(
                tenant_id=str(claims["tenant_id"]),
                request_id=str(claims["request_id"]),
                expires_at=float(claims["expires_at"]),
                # A digest: the store never holds a usable token.
                credential="token:" + hashlib.sha256(token.encode()).hexdigest(),
            )
        except (jwt.InvalidTokenError, KeyError, TypeError, ValueError):
            raise Refused(401, "INVALID_CALLBACK_TOKEN", "callback token is invalid") from None


def fingerprint(answer: dict[str, Any]) -> str:
    """A digest of an answer's content, to tell a retry from a different answer."""
    text = json.dumps(answer, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class Winners:
    """Which webhook answer won each request, kept in the mesh's store."""

    def __init__(self, context: AdapterContext) -> None:
        self._context = context
        self._locks: dict[_Key, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, tenant_id: str, request_id: str) -> AsyncIterator[None]:
        """Serialise this adapter's answers to one request (claim, resolve, release)."""
        key = (tenant_id, request_id)
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def claim(
        self, request: InputRequest, *, credential: str, answer: str, responder: str, over: bool = False
    ) -> bool:
        """Record ``credential`` as answering; call under ``hold`` before resolving. Only if no claim
        is recorded (by this process or another one sharing the store), unless ``over`` (a claim
        left by a process that died before its answer reached the mesh). Returns whether it claimed.
        The record belongs to the request's session: retention deletes it with the session."""
        record = {"by": credential, "answer": answer, "responder": responder}
        return await self._context.remember(
            _record_key(request.tenant_id, request.request_id),
            record,
            session=(request.tenant_id, request.session_id),
            if_absent=not over,
        )

    async def release(self, tenant_id: str, request_id: str, *, credential: str, answer: str) -> None:
        """Drop the claim of an answer the mesh refused (it changed nothing); under ``hold``. Only
        if the record is still that answer's: another replica may have claimed over it since."""
        key = _record_key(tenant_id, request_id)
        record = await self._context.recall(key)
        if record is not None and (record.get("by"), record.get("answer")) == (credential, answer):
            await self._context.forget(key)

    async def won(self, request: InputRequest, credential: str, answer: str, given: Answer) -> str | None:
        """The fingerprint of the answer ``credential`` gave, if that answer won ``request``;
        ``answer`` is the fingerprint of the one ``given`` now."""
        resolution = request.resolution
        if request.state is not InputState.RESOLVED or resolution is None:
            return None
        if resolution.surface is not Surface.WEBHOOK:
            return None  # a claim left by a crash before its answer reached the mesh
        # What the mesh stored says first what won: the same answer (its responder included)
        # through a webhook is this one's retry, whatever the record says. Replicas that took over
        # a dead one's claim at once overwrite each other's records, and the one the mesh refused
        # lets its own go (found from outside: the sender whose answer won was told it had lost).
        with contextlib.suppress(MeshError):  # as the mesh would store it (a confirmation's approve
            # is stored confirmed, a form's decision dropped); an answer it would refuse never won
            if Answer.content_of(
                self._context.as_stored(request, given.resolution(0.0))
            ) == Answer.content_of(resolution):
                return answer
        record = await self._context.recall(_record_key(request.tenant_id, request.request_id))
        if record is None or record.get("by") != credential:
            return None
        if record.get("responder") != resolution.resolved_by:
            return None  # another webhook adapter's answer
        return str(record.get("answer", ""))


def _record_key(tenant_id: str, request_id: str) -> str:
    return f"answered/{tenant_id}/{request_id}"
