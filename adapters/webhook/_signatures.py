"""Inbound Standard Webhooks signatures: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``.

Checked against the inbound secret with the mesh's clock (the ``standardwebhooks``
package's own check uses the wall clock and a fixed window). The headers, when any
is present, decide alone: a bad signature is refused even if the body also carries
a callback token.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from standardwebhooks import Webhook

from adapters.webhook._http import Refused

__all__ = ["Signed", "signature_headers", "verify"]


@dataclass(frozen=True)
class Signed:
    """The Standard Webhooks headers of one call, as sent."""

    webhook_id: str
    timestamp: str
    signatures: str
    """Space-separated ``v1,<base64>`` signatures."""


def signature_headers(headers: Mapping[str, str]) -> Signed | None:
    """The signature headers when any of them is present."""
    webhook_id, stamp, signature = (
        headers.get(n, "") for n in ("webhook-id", "webhook-timestamp", "webhook-signature")
    )
    if not (webhook_id or stamp or signature):
        return None
    return Signed(webhook_id, stamp, signature)


def verify(inbound: Webhook | None, text: str, signed: Signed, *, now: float, tolerance_s: int) -> int:
    """Check a signed call; its timestamp when the signature holds.

    Raises:
        Refused: 401, naming what is wrong (no inbound secret, a header missing, a stale
            timestamp, a signature that does not match).
    """
    if inbound is None:
        raise Refused(401, "UNAUTHENTICATED", "signed resolutions are not enabled (no inbound secret)")
    if not (signed.webhook_id and signed.timestamp and signed.signatures):
        raise Refused(401, "UNAUTHENTICATED", "needs webhook-id, webhook-timestamp and webhook-signature")
    try:
        timestamp = int(signed.timestamp)
    except ValueError:
        raise Refused(401, "UNAUTHENTICATED", "webhook-timestamp must be seconds since the epoch") from None
    if abs(now - timestamp) > tolerance_s:
        raise Refused(401, "STALE_TIMESTAMP", f"webhook-timestamp is outside the {tolerance_s} s window")
    expected = inbound.sign(
        msg_id=signed.webhook_id, timestamp=datetime.fromtimestamp(timestamp, tz=UTC), data=text
    ).encode()
    for candidate in signed.signatures.split(" "):
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected):
            return timestamp
    raise Refused(401, "BAD_SIGNATURE", "webhook-signature does not match")
