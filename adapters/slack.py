"""The Slack adapter: input requests as Block Kit messages, answers from buttons and modals.

Each pending request is posted to one channel with buttons (Approve / Approve for
session / Deny, Confirm / Reject, or "Fill in" for a form). Interactions arrive at
``POST /webhooks/receive/slack`` on the shared HTTP server and go through a
slack-bolt ``AsyncApp``, which verifies Slack's signature and timestamp window
(5 minutes) before any listener runs. Every listener acks at once; the answer is
resolved in a task this adapter owns, so Slack always gets its ack within 3 s.
When a request ends, on any surface, the message is updated: buttons gone, one
line saying what happened.

Sensitive forms (any ``sensitive`` or ``password`` field) never reach Slack: the
message says to complete them through the API or the session's chat.

Configuration (``adapters.<name>`` in settings.json)::

    {"channel": "C0123", "mode": "http", "allowed_responders": ["U0456"],
     "bot_token_env": "SLACK_BOT_TOKEN", "signing_secret_env": "SLACK_SIGNING_SECRET",
     "app_token_env": "SLACK_APP_TOKEN", "api_base_url": null, "timeout_s": 10}
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_sdk.web.async_client import AsyncWebClient

from svantic_grpc.adapter import Adapter, AdapterContext
from svantic_grpc.core.errors import MeshError
from svantic_grpc.core.inputs.model import (
    Decision,
    Form,
    FormField,
    InputKind,
    InputRequest,
    InputState,
    Resolution,
    Surface,
)

__all__ = ["RECEIVE_PATH", "SlackAdapter", "SlackConfig"]

logger = logging.getLogger(__name__)

RECEIVE_PATH = "/webhooks/receive/slack"
_ACTION = re.compile(r"^svantic\.(approve|approve_for_session|deny|confirm|reject|fill)$")
_DENY_VIEW = "svantic.deny"
_FORM_VIEW = "svantic.form"
_MAX_TEXT = 2900  # a section's text may hold 3000 characters
_BUTTONS = {
    Decision.APPROVE: ("approve", "Approve", "primary"),
    Decision.APPROVE_FOR_SESSION: ("approve_for_session", "Approve for session", None),
    Decision.DENY: ("deny", "Deny", "danger"),
}
_SENSITIVE_NOTE = (
    ":lock: This request asks for sensitive information, so it is not shown in Slack. "
    "Complete it through the API (ResolveInput) or in the session's chat."
)


@dataclass(frozen=True)
class SlackConfig:
    """The adapter's settings; secrets are named here and read from the environment."""

    channel: str
    """Channel the requests are posted to (an id such as ``C0123``)."""
    mode: str = "http"
    """``http`` (interactions at ``/webhooks/receive/slack``) or ``socket`` (Socket Mode)."""
    bot_token_env: str = "SLACK_BOT_TOKEN"
    """Environment variable holding the bot token (``xoxb-...``)."""
    signing_secret_env: str = "SLACK_SIGNING_SECRET"
    """Environment variable holding the signing secret (HTTP mode)."""
    app_token_env: str = "SLACK_APP_TOKEN"
    """Environment variable holding the app-level token (``xapp-...``, Socket Mode)."""
    api_base_url: str | None = None
    """Slack Web API base URL; ``None`` is Slack's own."""
    allowed_responders: tuple[str, ...] = ()
    """Slack user ids allowed to answer, on top of each request's own allowed responders."""
    timeout_s: int = 10
    """Timeout of one Slack Web API call."""

    @classmethod
    def parse(cls, name: str, config: Mapping[str, Any]) -> SlackConfig:
        """Read ``adapters.<name>``; a ``ValueError`` names the offending key."""
        where = f"adapters.{name}"
        channel = config.get("channel")
        if not isinstance(channel, str) or not channel:
            raise ValueError(f"{where}.channel is required: the Slack channel id to post requests to")
        mode = config.get("mode", "http")
        if mode not in ("http", "socket"):
            raise ValueError(f"{where}.mode must be 'http' or 'socket', not {mode!r}")
        responders = config.get("allowed_responders", ())
        if not isinstance(responders, list | tuple) or not all(isinstance(r, str) for r in responders):
            raise ValueError(f"{where}.allowed_responders must be a list of Slack user ids")
        timeout_s = config.get("timeout_s", 10)
        if not isinstance(timeout_s, int) or isinstance(timeout_s, bool) or timeout_s <= 0:
            raise ValueError(f"{where}.timeout_s must be a positive whole number of seconds")
        unknown = set(config) - {f.name for f in fields(cls)}
        if unknown:
            logger.warning("%s: ignoring unknown keys %s", where, sorted(unknown))
        strings = {
            k: config[k] for k in ("bot_token_env", "signing_secret_env", "app_token_env") if k in config
        }
        return cls(
            channel=channel,
            mode=mode,
            api_base_url=config.get("api_base_url"),
            allowed_responders=tuple(responders),
            timeout_s=timeout_s,
            **strings,
        )


def _secret(env: Mapping[str, str], var: str, key: str) -> str:
    value = env.get(var, "")
    if not value:
        raise ValueError(f"environment variable {var} (adapters.slack.{key}) is not set")
    return value


@dataclass(frozen=True)
class _Posted:
    channel: str
    ts: str


class SlackAdapter(Adapter):
    """Posts input requests to a Slack channel and resolves them from buttons and modals.

    Socket Mode (``mode: socket``) connects out through slack-bolt's
    ``AsyncSocketModeHandler`` instead of serving a route; it needs Slack itself
    and is not covered by the tests here (HTTP mode is, against a fake Web API).
    """

    def __init__(
        self, name: str, config: Mapping[str, Any], context: AdapterContext, env: Mapping[str, str]
    ) -> None:
        super().__init__(name, config, context, env)
        self.settings = SlackConfig.parse(name, config)
        http = self.settings.mode == "http"
        client_args: dict[str, Any] = (
            {"base_url": self.settings.api_base_url} if self.settings.api_base_url else {}
        )
        self._client = AsyncWebClient(
            token=_secret(env, self.settings.bot_token_env, "bot_token_env"),
            timeout=self.settings.timeout_s,
            **client_args,
        )
        self._app = AsyncApp(
            client=self._client,
            signing_secret=_secret(env, self.settings.signing_secret_env, "signing_secret_env")
            if http
            else "",
            request_verification_enabled=http,
            # Listeners ack at once and hand the work to tasks we own (see _spawn), so
            # bolt never runs a listener in a task of its own that nobody awaits.
            process_before_response=True,
            logger=logging.getLogger(f"{__name__}.bolt"),
        )
        self._app.action(_ACTION)(self._on_action)
        self._app.view(_DENY_VIEW)(self._on_deny_submitted)
        self._app.view(_FORM_VIEW)(self._on_form_submitted)
        self._app_token = "" if http else _secret(env, self.settings.app_token_env, "app_token_env")
        self._socket: AsyncSocketModeHandler | None = None
        self._posts: dict[tuple[str, str], asyncio.Future[_Posted | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------

    def routes(self) -> Sequence[web.RouteDef]:
        return [web.post(RECEIVE_PATH, self._receive)] if self.settings.mode == "http" else []

    async def start(self) -> None:
        if self.settings.mode == "socket":
            self._socket = AsyncSocketModeHandler(self._app, self._app_token)
            await self._socket.connect_async()  # type: ignore[no-untyped-call]

    async def stop(self) -> None:
        """Let in-flight answers finish (briefly), then cancel the rest; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._socket is not None:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if self._stopped:
            work.close()
            logger.warning("slack: interaction arrived after stop; dropped")
            return
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- mesh hooks --------------------------------------------------------------------------

    async def on_request(self, request: InputRequest) -> None:
        posted: asyncio.Future[_Posted | None] = asyncio.get_running_loop().create_future()
        self._posts[(request.tenant_id, request.request_id)] = posted
        result: _Posted | None = None
        try:
            resp = await self._client.chat_postMessage(
                channel=self.settings.channel,
                text=f"Input required: {request.summary}",
                blocks=_request_blocks(request),
            )
            result = _Posted(channel=str(resp["channel"]), ts=str(resp["ts"]))
        except Exception:
            logger.exception("slack: posting request %s failed", request.request_id)
        finally:
            posted.set_result(result)
        if result is not None:
            try:  # kept in the mesh's store, so the post is updated even after a restart
                await self.context.remember(_post_key(request), {"channel": result.channel, "ts": result.ts})
            except Exception:
                logger.exception("slack: could not keep where request %s was posted", request.request_id)

    async def on_outcome(self, request: InputRequest) -> None:
        posted = self._posts.pop((request.tenant_id, request.request_id), None)
        try:
            if posted is not None:
                # on_request may still be posting when the outcome arrives.
                where = await asyncio.wait_for(asyncio.shield(posted), timeout=self.settings.timeout_s)
            else:  # posted before a restart, perhaps
                kept = await self.context.recall(_post_key(request))
                where = None if kept is None else _Posted(channel=str(kept["channel"]), ts=str(kept["ts"]))
            if where is None:
                return
            await self.context.forget(_post_key(request))
            await self._client.chat_update(
                channel=where.channel,
                ts=where.ts,
                text=f"{request.summary}: {_outcome_line(request)}",
                blocks=[*_description_blocks(request), _section(_outcome_line(request))],
            )
        except Exception:
            logger.exception("slack: updating the message of request %s failed", request.request_id)

    # -- inbound -----------------------------------------------------------------------------

    async def _receive(self, request: web.Request) -> web.Response:
        # slack_sdk's verifier calls int() on the timestamp; refuse junk before it raises.
        if not request.headers.get("X-Slack-Request-Timestamp", "").isdigit():
            return web.json_response({"error": "invalid request"}, status=401)
        bolt_response = await self._app.async_dispatch(await to_bolt_request(request))
        return await to_aiohttp_response(bolt_response)

    async def _on_action(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        self._spawn(self._answer_action(body))

    async def _on_deny_submitted(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        self._spawn(self._answer_deny(body))

    async def _on_form_submitted(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        self._spawn(self._answer_form(body))

    async def _answer_action(self, body: dict[str, Any]) -> None:
        try:
            action = body["actions"][0]
            what = action["action_id"].removeprefix("svantic.")
            ref = json.loads(action["value"])
            tenant_id, request_id = str(ref["tenant_id"]), str(ref["request_id"])
            user = str(body["user"]["id"])
            channel = str(body.get("channel", {}).get("id") or self.settings.channel)
            request = await self._answerable(tenant_id, request_id, user, channel)
            if request is None:
                return
            if what in ("approve", "approve_for_session"):
                await self._resolve(request, Resolution(decision=Decision(what)), user, channel)
            elif what in ("confirm", "reject"):
                await self._resolve(request, Resolution(confirmed=what == "confirm"), user, channel)
            elif request.state is not InputState.PENDING:
                await self._ephemeral(
                    channel, user, f"Not recorded: this request ended. {_outcome_line(request)}"
                )
            elif what == "deny":
                view = _deny_view(request, channel)
                await self._client.views_open(trigger_id=body["trigger_id"], view=view)
            elif not _form_in_slack(request):
                await self._client.chat_postEphemeral(channel=channel, user=user, text=_SENSITIVE_NOTE)
            else:
                view = _form_view(request, channel)
                await self._client.views_open(trigger_id=body["trigger_id"], view=view)
        except Exception:
            logger.exception("slack: handling a button failed")

    async def _answer_deny(self, body: dict[str, Any]) -> None:
        try:
            tenant_id, request_id, channel, user = _view_ref(body)
            reason = body["view"]["state"]["values"]["reason"]["value"].get("value") or ""
            request = await self._answerable(tenant_id, request_id, user, channel)
            if request is not None:
                await self._resolve(request, Resolution(decision=Decision.DENY, reason=reason), user, channel)
        except Exception:
            logger.exception("slack: handling a denial failed")

    async def _answer_form(self, body: dict[str, Any]) -> None:
        try:
            tenant_id, request_id, channel, user = _view_ref(body)
            request = await self._answerable(tenant_id, request_id, user, channel)
            if request is not None and request.form is not None and _form_in_slack(request):
                values = _form_values(request.form, body["view"]["state"]["values"])
                await self._resolve(request, Resolution(values=values), user, channel)
        except Exception:
            logger.exception("slack: handling a form submission failed")

    async def _answerable(
        self, tenant_id: str, request_id: str, user: str, channel: str
    ) -> InputRequest | None:
        """The request if ``user`` may answer it now; otherwise tell them why (ephemeral) and None."""
        try:
            request = await self.context.get_request(tenant_id=tenant_id, request_id=request_id)
        except MeshError as e:
            await self._ephemeral(channel, user, f"This request cannot be answered: {e.message}")
            return None
        allowed = (*request.allowed_responders, *self.settings.allowed_responders)
        if allowed and user not in allowed and f"slack:{user}" not in allowed:
            await self._ephemeral(
                channel, user, "You are not one of the allowed responders for this request."
            )
            return None
        return request

    async def _resolve(self, request: InputRequest, resolution: Resolution, user: str, channel: str) -> None:
        try:
            await self.context.resolve(
                tenant_id=request.tenant_id,
                request_id=request.request_id,
                resolution=resolution,
                responder=f"slack:{user}",
                surface=Surface.SLACK,
            )
        except MeshError as e:  # AlreadyResolved names who won, how and when
            await self._ephemeral(channel, user, f"Not recorded: {e.message}")

    async def _ephemeral(self, channel: str, user: str, text: str) -> None:
        try:
            await self._client.chat_postEphemeral(channel=channel, user=user, text=text)
        except Exception:
            logger.exception("slack: an ephemeral reply to %s failed", user)


# -- Block Kit -------------------------------------------------------------------------------


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain(text: str, limit: int = 2000) -> dict[str, Any]:
    return {"type": "plain_text", "text": _clip(text, limit) or " "}


def _section(mrkdwn: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _clip(mrkdwn, _MAX_TEXT)}}


def _post_key(request: InputRequest) -> str:
    return f"post/{request.tenant_id}/{request.request_id}"


def _when(ts: float) -> str:
    fallback = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"<!date^{int(ts)}^{{date_short_pretty}} {{time_secs}}|{fallback}>"


def _who(responder: str) -> str:
    return f"<@{responder[6:]}>" if responder.startswith("slack:") else f"`{_esc(responder)}`"


def _sensitive(request: InputRequest) -> bool:
    # A password can only become a plain-text input in Slack, so it counts as sensitive too.
    return request.sensitive or (
        request.form is not None and any(f.type == "password" for f in request.form.fields)
    )


def _form_in_slack(request: InputRequest) -> bool:
    """Whether the form can be filled in a modal (at most 100 blocks, nothing sensitive)."""
    return request.form is not None and not _sensitive(request) and len(request.form.fields) < 100


def _description_blocks(request: InputRequest) -> list[dict[str, Any]]:
    lines = [f"*Input required:* {_esc(request.summary)}"]
    if request.tool_call is not None:
        arguments = json.dumps(request.tool_call.arguments, indent=1, sort_keys=True, default=str)
        lines.append(f"Tool `{_esc(request.tool_call.tool_name)}` with\n```{_esc(_clip(arguments, 2000))}```")
    if request.plan:
        steps = (f"{i}. {_esc(step.description)}" for i, step in enumerate(request.plan, 1))
        lines.append("Plan:\n" + "\n".join(steps))
    if request.form is not None:
        lines.append(f"*{_esc(request.form.title or 'Form')}*")
        if request.form.description:
            lines.append(_esc(request.form.description))
        if not _sensitive(request):
            lines.extend(f"• {_esc(f.label or f.name)} ({f.type})" for f in request.form.fields)
    context = (
        f"session `{_esc(request.session_id)}` · message `{_esc(request.message_id)}` · "
        f"request `{_esc(request.request_id)}` · expires {_when(request.expires_at)}"
    )
    return [
        _section("\n".join(lines)),
        {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
    ]


def _button(request: InputRequest, what: str, label: str, style: str | None) -> dict[str, Any]:
    value = json.dumps({"tenant_id": request.tenant_id, "request_id": request.request_id})
    button: dict[str, Any] = {
        "type": "button",
        "action_id": f"svantic.{what}",
        "text": _plain(label),
        "value": value,
    }
    if style:
        button["style"] = style
    return button


def _request_blocks(request: InputRequest) -> list[dict[str, Any]]:
    blocks = _description_blocks(request)
    if request.kind in (InputKind.TOOL_APPROVAL, InputKind.PLAN_APPROVAL):
        buttons = [_button(request, *_BUTTONS[d]) for d in _BUTTONS if d in request.allowed_decisions]
    elif request.kind is InputKind.CONFIRMATION:
        buttons = [
            _button(request, "confirm", "Confirm", "primary"),
            _button(request, "reject", "Reject", "danger"),
        ]
    elif _form_in_slack(request):
        buttons = [_button(request, "fill", "Fill in", "primary")]
    else:
        return [*blocks, _section(_SENSITIVE_NOTE)]
    return (
        [*blocks, {"type": "actions", "block_id": "svantic.actions", "elements": buttons}]
        if buttons
        else blocks
    )


def _outcome_line(request: InputRequest) -> str:
    if request.state is InputState.EXPIRED:
        return f":hourglass: Expired {_when(request.expires_at)} without an answer."
    if request.state is InputState.CANCELED:
        reason = f": {_esc(request.outcome_reason)}" if request.outcome_reason else "."
        return f":no_entry_sign: Canceled{reason}"
    res = request.resolution
    if res is None:
        return "Ended."
    if res.decision is not None:
        verb = {
            Decision.APPROVE: ":white_check_mark: Approved",
            Decision.APPROVE_FOR_SESSION: ":white_check_mark: Approved for this session",
            Decision.APPROVE_ALWAYS: ":white_check_mark: Approved always",
            Decision.DENY: ":x: Denied",
        }[res.decision]
    elif request.kind is InputKind.FORM:
        verb = ":memo: Form submitted"
    else:
        verb = ":white_check_mark: Confirmed" if res.confirmed else ":x: Rejected"
    line = f"{verb} by {_who(res.resolved_by)} via {res.surface.value} {_when(res.resolved_at)}"
    return f"{line}: {_esc(res.reason)}" if res.reason else f"{line}."


def _metadata(request: InputRequest, channel: str) -> str:
    return json.dumps({"tenant_id": request.tenant_id, "request_id": request.request_id, "channel": channel})


def _view_ref(body: dict[str, Any]) -> tuple[str, str, str, str]:
    """(tenant_id, request_id, channel, user) of a modal submission."""
    ref = json.loads(body["view"]["private_metadata"])
    return str(ref["tenant_id"]), str(ref["request_id"]), str(ref["channel"]), str(body["user"]["id"])


def _deny_view(request: InputRequest, channel: str) -> dict[str, Any]:
    reason = {"type": "plain_text_input", "action_id": "value", "multiline": True}
    return {
        "type": "modal",
        "callback_id": _DENY_VIEW,
        "private_metadata": _metadata(request, channel),
        "title": _plain("Deny request", 24),
        "submit": _plain("Deny"),
        "close": _plain("Cancel"),
        "blocks": [
            _section(f"Deny: {_esc(request.summary)}"),
            {"type": "input", "block_id": "reason", "label": _plain("Reason"), "element": reason},
        ],
    }


def _options(choices: Sequence[str]) -> list[dict[str, Any]]:
    # Option values are indexes: an option's value may hold only 150 characters.
    return [{"text": _plain(c, 75), "value": str(i)} for i, c in enumerate(choices)]


def _element(f: FormField) -> dict[str, Any]:
    el: dict[str, Any] = {"action_id": "value"}
    default = f.default
    if f.type in ("select", "action") and f.options:
        el |= {
            "type": "static_select" if f.type == "select" else "radio_buttons",
            "options": _options(f.options),
        }
        if default in f.options:
            el["initial_option"] = el["options"][f.options.index(default)]
    elif f.type in ("checkbox", "action"):
        el |= {"type": "checkboxes", "options": [{"text": _plain(f.label or f.name, 75), "value": "true"}]}
        if default:
            el["initial_options"] = el["options"]
    elif f.type == "number":
        el |= {"type": "number_input", "is_decimal_allowed": True}
        if isinstance(default, int | float) and not isinstance(default, bool):
            el["initial_value"] = str(default)
    elif f.type == "date":
        el["type"] = "datepicker"
        if isinstance(default, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", default):
            el["initial_date"] = default
    else:
        el |= {"type": "plain_text_input", "multiline": f.type == "textarea"}
        if default is not None:
            el["initial_value"] = str(default)
    return el


def _form_view(request: InputRequest, channel: str) -> dict[str, Any]:
    assert request.form is not None
    blocks = [_section(_esc(request.form.description))] if request.form.description else []
    for i, f in enumerate(request.form.fields):
        blocks.append(
            {
                "type": "input",
                "block_id": f"f{i}",
                "optional": not f.required,
                "label": _plain(f.label or f.name),
                "element": _element(f),
            }
        )
    return {
        "type": "modal",
        "callback_id": _FORM_VIEW,
        "private_metadata": _metadata(request, channel),
        "title": _plain(request.form.title or "Input", 24),
        "submit": _plain("Submit"),
        "close": _plain("Cancel"),
        "blocks": blocks,
    }


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _form_values(form: Form, state: Mapping[str, Any]) -> dict[str, Any]:
    """The submitted values by field name; unanswered optional fields are left out."""
    values: dict[str, Any] = {}
    for i, f in enumerate(form.fields):
        got: Mapping[str, Any] = state.get(f"f{i}", {}).get("value", {})
        if "selected_option" in got:
            option = got["selected_option"]
            if option is not None:
                values[f.name] = f.options[int(option["value"])]
        elif "selected_options" in got:
            values[f.name] = bool(got["selected_options"])
        elif "selected_date" in got:
            if got["selected_date"]:
                values[f.name] = got["selected_date"]
        elif got.get("value") not in (None, ""):
            values[f.name] = _number(got["value"]) if f.type == "number" else got["value"]
    return values
