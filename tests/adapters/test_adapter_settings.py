"""Adapters' settings are read as settings.json's own keys are: every bad key named by its full path.

Also: the Slack adapter answers "not allowed" with the core's responder rule, before
a modal opens for someone the mesh would refuse.
"""

from __future__ import annotations

from typing import Any

import pytest

from adapters.slack import SlackAdapter
from adapters.webhook import WebhookAdapter
from svantic_grpc.adapter import AdapterSettingsError
from svantic_grpc.config import SettingsError, parse_settings
from svantic_grpc.core.inputs.model import InputKind, Surface, responder_allowed
from svantic_grpc.server import MeshServer
from tests._support import SIGNING_ENV
from tests.adapters import test_slack, test_webhook
from tests.adapters.test_slack import make_request, running, until

SLACK_ENV = {"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": "s"}


def _problems(make: Any) -> list[str]:
    with pytest.raises(AdapterSettingsError) as excinfo:
        make()
    return str(excinfo.value).splitlines()


def test_every_bad_webhook_key_is_named_by_its_path_at_once() -> None:
    config = {
        "targets": [{"url": "ftp://x", "secret_env": "T", "colour": "red"}],
        "max_attempts": 0,
        "tolerance": 3,
    }
    problems = _problems(lambda: WebhookAdapter("webhook", config, test_webhook.FakeMesh(), {}))
    assert problems == [
        "adapters.webhook.targets[0].url: must be an http:// or https:// URL",
        "adapters.webhook.targets[0].secret_env: environment variable T is not set",
        "adapters.webhook.targets[0].colour: unknown key",
        "adapters.webhook.max_attempts: Input should be greater than or equal to 1",
        "adapters.webhook.tolerance: unknown key",
    ]


def test_an_unknown_slack_key_is_refused_not_ignored() -> None:
    config = {"channel": "C1", "chanel": "C2"}
    problems = _problems(lambda: SlackAdapter("slack", config, test_slack.FakeMesh(), SLACK_ENV))
    assert problems == ["adapters.slack.chanel: unknown key"]


def test_slack_settings_are_strictly_typed() -> None:
    config = {"channel": "C1", "timeout_s": "10", "allowed_responders": "U1"}
    problems = _problems(lambda: SlackAdapter("slack", config, test_slack.FakeMesh(), SLACK_ENV))
    assert problems == [
        "adapters.slack.allowed_responders: Input should be a valid list",
        "adapters.slack.timeout_s: Input should be a valid integer",
    ]


def test_the_server_names_the_adapter_key_once() -> None:
    settings = parse_settings(
        {
            "grpc_address": "127.0.0.1:0",
            "http_address": "127.0.0.1:0",
            "adapters": {"slack": {"channel": "C1", "timeout_s": 0}},
        }
    )
    with pytest.raises(SettingsError) as excinfo:
        MeshServer(settings, env=SIGNING_ENV | SLACK_ENV)
    assert str(excinfo.value) == "adapters.slack.timeout_s: Input should be greater than 0"


@pytest.mark.parametrize(
    ("responder", "surface", "allowed", "expected"),
    [
        ("slack:U1", Surface.SLACK, ("slack:U1",), True),
        ("slack:U1", Surface.SLACK, ("U1",), True),
        ("slack:U1", Surface.SLACK, ("slack:U2", "U3"), False),
        ("grpc:alice", Surface.GRPC, ("alice",), True),
        ("alice", Surface.GRPC, ("alice",), True),
        ("alice", Surface.GRPC, ("grpc:alice",), True),
        ("alice", Surface.WEBHOOK, ("grpc:alice",), False),
        ("ops@acme", Surface.WEBHOOK, ("ops@acme",), True),
        # found from outside: a webhook answer naming itself with a second prefix passed for Slack's user
        ("x:slack:UBOSS", Surface.WEBHOOK, ("slack:UBOSS",), False),
        ("webhook:slack:UBOSS", Surface.WEBHOOK, ("slack:UBOSS",), False),
        ("UBOSS", Surface.WEBHOOK, ("slack:UBOSS",), False),
        ("x:alice", Surface.WEBHOOK, ("alice",), False),
    ],
)
def test_the_one_responder_rule(
    responder: str, surface: Surface, allowed: tuple[str, ...], expected: bool
) -> None:
    assert responder_allowed(responder, allowed, surface) is expected
    request = make_request(InputKind.TOOL_APPROVAL, allowed_responders=allowed)
    assert request.may_answer(responder, surface) is expected


async def test_slack_refuses_before_a_modal_a_user_the_request_does_not_allow() -> None:
    # The adapter's own list names U1; the request allows only U2, so the mesh would refuse U1:
    # U1 is told so at once, and no Deny modal opens for an answer that could not count.
    async with running(allowed_responders=["U1"]) as h:
        request = make_request(InputKind.TOOL_APPROVAL, allowed_responders=("slack:U2",))
        await h.announce(request)

        await h.click(request, "deny", user="U1")
        await until(lambda: h.ephemerals("U1"))

        assert "not one of the allowed responders" in h.ephemerals("U1")[0]
        assert h.slack.of("views.open") == []
        assert h.mesh.resolved == []
