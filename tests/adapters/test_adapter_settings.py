"""Adapters' settings are read as settings.json's own keys are: every bad key named by its full path."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.slack import SlackAdapter
from adapters.webhook import WebhookAdapter
from svantic_grpc.adapter import AdapterSettingsError
from svantic_grpc.config import SettingsError, parse_settings
from svantic_grpc.server import MeshServer
from tests._support import SIGNING_ENV
from tests.adapters import test_slack, test_webhook

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
