"""The webhook adapter (entry point ``adapters.webhook:WebhookAdapter``).

One module per job: ``_settings`` (settings.json and secrets), ``_notifications``
(what goes out), ``_delivery`` (signed POSTs with retries), ``_strict_json`` (what may
come in), ``_signatures`` (inbound Standard Webhooks signatures), ``_replay`` (each
``webhook-id`` once), ``_callbacks`` (callback tokens and which answer won),
``_answers`` (an inbound body read into a resolution), ``_http`` (how refusals look),
and ``_adapter`` (the adapter that ties them to the mesh).
"""

from adapters.webhook._adapter import RECEIVE_PATH, WebhookAdapter
from adapters.webhook._notifications import SENSITIVE_NOTE
from adapters.webhook._settings import TargetSettings, WebhookSettings
from adapters.webhook._strict_json import MAX_BODY_DEPTH

__all__ = [
    "MAX_BODY_DEPTH",
    "RECEIVE_PATH",
    "SENSITIVE_NOTE",
    "TargetSettings",
    "WebhookAdapter",
    "WebhookSettings",
]
