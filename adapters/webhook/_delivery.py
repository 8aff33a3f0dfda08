"""Outbound delivery: each notification POSTed to each target, signed, retried with backoff.

Every message carries ``webhook-id`` (one per message, the same on each retry of it),
``webhook-timestamp`` and ``webhook-signature`` (HMAC-SHA256 under the target's
``whsec_`` secret, made by the ``standardwebhooks`` package), signed afresh per attempt
so a retry stays inside receivers' windows. Connection errors, timeouts, 5xx and 429
are retried with capped exponential backoff and jitter (``Retry-After`` in seconds is
honoured up to the cap); other answers are final. Deliveries run in tasks this object
owns; ``stop`` cancels and awaits them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
from standardwebhooks import Webhook

from svantic_grpc.adapter import Clock

__all__ = ["Deliveries", "Message", "Retries", "Target"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One receiver of notifications."""

    url: str
    signer: Webhook = field(repr=False)
    """Signs with the target's secret."""


@dataclass(frozen=True)
class Message:
    """One notification to one target; retries resend it under the same id."""

    webhook_id: str
    type: str
    request_id: str
    body: str

    def __str__(self) -> str:
        return f"{self.type} of {self.request_id} ({self.webhook_id})"


@dataclass(frozen=True)
class Retries:
    """How hard a delivery is tried."""

    max_attempts: int
    """Attempts per message and target, the first included."""
    backoff_ms: int
    """Delay before the first retry; doubles on each one, with jitter."""
    max_backoff_ms: int
    """Cap on the delay between two attempts."""
    timeout_ms: int
    """Time allowed for one attempt, connection and answer included."""


class Deliveries:
    """The delivery tasks of one adapter and the HTTP client they share."""

    def __init__(self, retries: Retries, clock: Clock, rng: random.Random) -> None:
        self._retries = retries
        self._clock = clock
        self._rng = rng
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def send(
        self,
        target: Target,
        message: Message,
        after: Iterable[asyncio.Task[None]] = (),
        *,
        still_news: Callable[[], Awaitable[bool]] | None = None,
    ) -> asyncio.Task[None]:
        """Deliver ``message`` to ``target`` once the tasks ``after`` ended; the delivery's task.
        ``still_news`` is asked before each retry: once it says no (what the message announces
        is over), the delivery ends."""
        task = asyncio.create_task(
            self._deliver(target, message, tuple(after), still_news),
            name=f"webhook {message.webhook_id} -> {target.url}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait until every delivery in flight has succeeded, been refused or given up."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def stop(self) -> None:
        """Cancel pending deliveries, wait for them and close the client; idempotent."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _session(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self._retries.timeout_ms / 1000, follow_redirects=False, trust_env=False
            )
        return self._client

    async def _deliver(
        self,
        target: Target,
        message: Message,
        after: tuple[asyncio.Task[None], ...],
        still_news: Callable[[], Awaitable[bool]] | None,
    ) -> None:
        if after:
            await asyncio.wait(after)
        attempts = self._retries.max_attempts
        last = ""
        try:
            for attempt in range(1, attempts + 1):
                if attempt > 1 and still_news is not None and not await still_news():
                    _log.info("webhook %s to %s: no longer news; not tried again", message, target.url)
                    return
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

    async def _post(self, target: Target, message: Message) -> tuple[int, float | None]:
        timestamp = math.floor(self._clock.now())
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
        async with asyncio.timeout(self._retries.timeout_ms / 1000):
            response = await self._session().post(target.url, content=message.body.encode(), headers=headers)
        return response.status_code, _seconds(response.headers.get("retry-after"))

    def _backoff_s(self, attempt: int, retry_after: float | None) -> float:
        cap = self._retries.max_backoff_ms / 1000
        ceiling = min(cap, self._retries.backoff_ms / 1000 * 2.0 ** min(attempt - 1, 32))
        delay = ceiling * self._rng.uniform(0.5, 1.0)
        return max(delay, min(retry_after, cap)) if retry_after is not None else delay


def _seconds(header: str | None) -> float | None:
    """A ``Retry-After`` given in seconds (dates are ignored)."""
    try:
        return max(0.0, float(header)) if header else None
    except ValueError:
        return None
