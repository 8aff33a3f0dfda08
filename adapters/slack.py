"""The Slack adapter: input requests as Block Kit messages, answers from buttons and modals.

Each pending request is posted to one channel with buttons (Approve / Approve for
session / Deny, Confirm / Reject, or "Fill in" for a form). Interactions arrive at
``POST /webhooks/receive/slack`` on the shared HTTP server. Slack's signature and
timestamp window (5 minutes) are checked before the body is read (401 otherwise);
a signed body that is not one of this adapter's buttons or modals, or lacks what
it must carry, gets 400 or 404 (see ``_slack_interactions``); the rest goes through
a slack-bolt ``AsyncApp``. A click is answered in a task this adapter owns and acked
once its answer is stored (within ``_ACK_WITHIN_S``; a click that opens a modal at once);
what the clicker should know (say, that someone else answered first) comes as an ephemeral.
A modal is answered before its ack, so a refusal shows in
the modal itself: replaced by what happened, or an error under the input the mesh
refused; an answer slower than ``_ACK_WITHIN_S`` reports by ephemeral instead.
Winners are named as Slack shows people: ``<@U123>`` for a Slack user, the surface
and name otherwise. When a request ends, on any surface, the message is updated:
buttons gone, one line saying what happened.

Sensitive forms (any ``sensitive`` or ``password`` field) never reach Slack: the
message says to complete them through the API or the session's chat.

Configuration (``adapters.<name>`` in settings.json)::

    {"channel": "C0123", "mode": "http", "allowed_responders": ["U0456"],
     "bot_token_env": "SLACK_BOT_TOKEN", "signing_secret_env": "SLACK_SIGNING_SECRET",
     "app_token_env": "SLACK_APP_TOKEN", "api_base_url": null, "timeout_s": 10, "retries": 4}

A Web API call Slack answers with 429 (its rate limit: about one post per second per channel)
is tried again after its ``Retry-After``, one answered with a 5xx, timed out or cut off again
after a backoff, ``retries`` times (slack_sdk's retry handlers), so a request raised while Slack
is busy is still posted and an outcome still reaches its message. A post still in progress when
its request ends is finished first and then updated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode

from pydantic import Field, ValidationInfo, field_validator
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.adapter.starlette.async_handler import to_starlette_response
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.request.internals import parse_body
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from adapters._slack_interactions import (
    ACTION,
    DENY_VIEW,
    FORM_VIEW,
    Click,
    Malformed,
    Refused,
    Submission,
    admit,
    signed,
)
from svantic_grpc.adapter import (
    Adapter,
    AdapterContext,
    AdapterSettings,
    env_value,
    form_number,
    parse_adapter_settings,
)
from svantic_grpc.core.errors import AlreadyResolved, InvalidArgument, MeshError
from svantic_grpc.core.inputs.model import (
    Decision,
    Form,
    FormField,
    InputKind,
    InputRequest,
    InputState,
    Resolution,
    Surface,
    responder_allowed,
)

__all__ = ["RECEIVE_PATH", "SlackAdapter", "SlackConfig"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

RECEIVE_PATH = "/webhooks/receive/slack"
_ACK_WITHIN_S = 2.0  # Slack waits 3 s for a modal's ack
_NEVER_UPDATABLE = frozenset(
    {
        "message_not_found",
        "channel_not_found",
        "is_archived",
        "not_in_channel",
        "cant_update_message",
        "edit_window_closed",
        "invalid_blocks",
        "msg_too_long",
    }
)
"""chat.update errors no later try would get past (the post or its channel is gone, or Slack will
never take the update): the outcome is given up on for that post instead of told again at every start."""
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
_TOO_BIG_NOTE = (
    "This form is larger than a Slack modal can hold (fields or options). "
    "Complete it in the console, through the API (ResolveInput) or in the session's chat."
)


_SECRET_MODES = {
    "bot_token_env": ("http", "socket"),
    "signing_secret_env": ("http",),
    "app_token_env": ("socket",),
}


class SlackConfig(AdapterSettings):
    """The adapter's settings; secrets are named here and read from the environment."""

    channel: str = Field(min_length=1)
    """Channel the requests are posted to (an id such as ``C0123``)."""
    mode: Literal["http", "socket"] = "http"
    """``http`` (interactions at ``/webhooks/receive/slack``) or ``socket`` (Socket Mode)."""
    bot_token_env: str = Field(default="SLACK_BOT_TOKEN", min_length=1, validate_default=True)
    """Environment variable holding the bot token (``xoxb-...``)."""
    signing_secret_env: str = Field(default="SLACK_SIGNING_SECRET", min_length=1, validate_default=True)
    """Environment variable holding the signing secret (HTTP mode)."""
    app_token_env: str = Field(default="SLACK_APP_TOKEN", min_length=1, validate_default=True)
    """Environment variable holding the app-level token (``xapp-...``, Socket Mode)."""
    api_base_url: str | None = None
    """Slack Web API base URL; ``None`` is Slack's own."""
    allowed_responders: list[str] = Field(default_factory=list)
    """Slack user ids who may answer, from Slack, requests that name no responders of their own;
    empty: anyone in the channel. A request's own list is the core's to check."""
    timeout_s: int = Field(default=10, gt=0)
    """Timeout of one Slack Web API call."""
    retries: int = Field(default=4, ge=0, le=10)
    """How many times a call Slack answered with 429 or a 5xx, or that timed out or was cut off,
    is tried again (after ``Retry-After`` for a 429, with backoff otherwise)."""

    @field_validator("bot_token_env", "signing_secret_env", "app_token_env")
    @classmethod
    def _secret_set(cls, variable: str, info: ValidationInfo) -> str:
        if info.data.get("mode") in _SECRET_MODES[str(info.field_name)]:
            env_value(info, variable)  # set, in the modes that use it
        return variable


class _Transient(AsyncRetryHandler):
    """Tries again a call Slack answered with any 5xx or that timed out, with slack_sdk's backoff
    (its own ``AsyncServerErrorRetryHandler`` takes 500 and 503 only)."""

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if response is not None:
            return response.status_code >= 500
        return isinstance(error, TimeoutError)


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
        self.settings = parse_adapter_settings(SlackConfig, name, config, env)
        http = self.settings.mode == "http"
        client_args: dict[str, Any] = (
            {"base_url": self.settings.api_base_url} if self.settings.api_base_url else {}
        )
        retries = self.settings.retries
        self._client = AsyncWebClient(
            token=env[self.settings.bot_token_env],
            timeout=self.settings.timeout_s,
            retry_handlers=[
                AsyncRateLimitErrorRetryHandler(max_retry_count=retries),
                AsyncConnectionErrorRetryHandler(max_retry_count=retries),
                _Transient(max_retry_count=retries),
            ],
            **client_args,
        )
        self._signing_secret = env[self.settings.signing_secret_env] if http else ""
        self._app = AsyncApp(
            client=self._client,
            signing_secret=self._signing_secret,
            request_verification_enabled=False,  # HTTP: checked before bolt sees it (_receive)
            # Listeners ack at once and hand the work to tasks we own (see _spawn), so
            # bolt never runs a listener in a task of its own that nobody awaits.
            process_before_response=True,
            logger=logging.getLogger(f"{__name__}.bolt"),
        )
        self._app.action(ACTION)(self._on_action)
        self._app.view(DENY_VIEW)(self._on_deny_submitted)
        self._app.view(FORM_VIEW)(self._on_form_submitted)
        self._app_token = "" if http else env[self.settings.app_token_env]
        self._socket: AsyncSocketModeHandler | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._posts: dict[tuple[str, str], asyncio.Future[_Posted | None]] = {}
        self._updating: dict[tuple[str, str], asyncio.Future[None]] = {}
        """Requests whose post is being updated with their outcome, and that update: told twice at
        once (the outcome, and ``_ended_while_posting``, or a restart's telling again), the second
        waits for the first's one chat.update and fails if it fails."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------

    def routes(self) -> Sequence[BaseRoute]:
        return [Route(RECEIVE_PATH, self._receive, methods=["POST"])] if self.settings.mode == "http" else []

    async def start(self) -> None:
        if self.settings.mode == "socket":
            self._socket = AsyncSocketModeHandler(self._app, self._app_token)
            # In the background: slack_sdk retries a connection Slack refuses (an outage, a revoked
            # app token) for ever, and the mesh serves meanwhile; requests are posted through the
            # Web API all the same, and clicks arrive once the socket is up.
            self._connecting = asyncio.create_task(self._connect(self._socket), name="slack-socket-connect")

    async def _connect(self, socket: AsyncSocketModeHandler) -> None:
        try:
            await socket.connect_async()  # type: ignore[no-untyped-call]
        except Exception:
            logger.exception("slack: socket mode could not connect; no clicks arrive until a restart")
        else:
            logger.info("slack: socket mode connected")

    async def stop(self) -> None:
        """Let in-flight answers finish (briefly), then cancel the rest; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        if self._socket is not None:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T] | None:
        if self._stopped:
            work.close()
            logger.warning("slack: interaction arrived after stop; dropped")
            return None
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- mesh hooks --------------------------------------------------------------------------

    async def on_request(self, request: InputRequest) -> None:
        posted: asyncio.Future[_Posted | None] = asyncio.get_running_loop().create_future()
        self._posts[(request.tenant_id, request.request_id)] = posted
        result: _Posted | None = None
        try:
            # Told again after a restart (the first announcement may have died with the process):
            # a request already posted is not posted twice.
            kept = await self.context.recall(_post_key(request))
            if kept is not None:
                result = _Posted(channel=str(kept["channel"]), ts=str(kept["ts"]))
                return
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
                await self.context.remember(
                    _post_key(request),
                    {"channel": result.channel, "ts": result.ts},
                    session=(request.tenant_id, request.session_id),
                )
            except Exception:
                logger.exception("slack: could not keep where request %s was posted", request.request_id)
            await self._ended_while_posting(request)

    async def _ended_while_posting(self, request: InputRequest) -> None:
        """A request that ended while it was being posted, where this adapter was not told (another
        replica took the answer and found no post to update yet): its post is updated now."""
        key = (request.tenant_id, request.request_id)
        if key not in self._posts:
            return  # told here already: ``on_outcome`` updates it
        try:
            current = await self.context.get_request(
                tenant_id=request.tenant_id, request_id=request.request_id
            )
        except MeshError:
            return
        if current.state is not InputState.PENDING and self._posts.pop(key, None) is not None:
            await self.on_outcome(current)

    async def on_outcome(self, request: InputRequest) -> None:
        key = (request.tenant_id, request.request_id)
        updating = self._updating.get(key)
        if updating is None:  # one chat.update per outcome
            spawned = self._spawn(self._update_post(request))  # stop() waits for it, then cancels
            if spawned is None:
                raise RuntimeError(f"slack adapter stopped before the outcome of {request.request_id}")
            updating = self._updating[key] = spawned
            updating.add_done_callback(partial(self._updated, key))
        await asyncio.shield(updating)

    def _updated(self, key: tuple[str, str], update: asyncio.Future[None]) -> None:
        del self._updating[key]
        if not update.cancelled():
            update.exception()  # told to whoever awaits it; nobody waiting is no error of its own

    async def _update_post(self, request: InputRequest) -> None:
        posted = self._posts.pop((request.tenant_id, request.request_id), None)
        try:
            if posted is not None:
                # on_request may still be posting when the outcome arrives (trying again, perhaps):
                # it ends either way, bounded by its retries.
                where = await asyncio.shield(posted)
            else:  # posted before a restart, perhaps
                kept = await self.context.recall(_post_key(request))
                if kept is not None and kept.get("final"):
                    return  # updated already
                where = None if kept is None else _Posted(channel=str(kept["channel"]), ts=str(kept["ts"]))
            if where is None:
                return
            await self._client.chat_update(channel=where.channel, ts=where.ts, **_ended_post(request))
            # Kept, marked final (retention deletes it with the session): a click on another post of
            # the request is then known for one whose location was lost (_update_quietly).
            await self.context.remember(
                _post_key(request),
                {"channel": where.channel, "ts": where.ts, "final": True},
                session=(request.tenant_id, request.session_id),
            )
        except SlackApiError as error:
            if error.response.get("error") not in _NEVER_UPDATABLE:
                logger.exception("slack: updating the message of request %s failed", request.request_id)
                raise  # the mesh tells the outcome again later
            logger.warning(
                "slack: the message of request %s cannot be updated (%s): given up",
                request.request_id,
                error.response.get("error"),
            )
            await self.context.forget(_post_key(request))
        except Exception:
            logger.exception("slack: updating the message of request %s failed", request.request_id)
            raise  # the mesh tells the outcome again later

    # -- inbound -----------------------------------------------------------------------------

    async def _receive(self, request: Request) -> Response:
        # The signature first: nothing of an unsigned body is read (slack-bolt parses first).
        raw = await request.body()
        headers = request.headers
        if not signed(
            self._signing_secret,
            raw,
            headers.get("X-Slack-Request-Timestamp", ""),
            headers.get("X-Slack-Signature", ""),
            time.time(),  # the wall clock, as slack-bolt's own check after this one
        ):
            return JSONResponse({"error": "invalid request"}, status_code=401)
        if raw.startswith(b"ssl_check=1"):  # Slack checking the URL's certificate: nothing to do
            return Response(status_code=200)
        try:
            content_type = headers.get("content-type", "").partition(";")[0].strip()
            interaction = admit(parse_body(raw.decode(), content_type))
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
            refused = Refused(
                400, "malformed interaction: the body is neither Slack's form encoding nor JSON"
            )
        except Refused as exc:
            refused = exc
        else:
            # Verified above, so slack-bolt (its own check off) gets the rebuilt body only: hence
            # its Starlette adapter's response conversion, not its handler (that reads the raw body).
            bolt_request = AsyncBoltRequest(
                body=urlencode({"payload": json.dumps(interaction)}),
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            return to_starlette_response(await self._app.async_dispatch(bolt_request))
        logger.info("slack: refused a signed interaction (%d): %s", refused.status, refused.message)
        return JSONResponse({"error": refused.message}, status_code=refused.status)

    async def _on_action(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        """A click that answers is acked once its answer is stored (within ``_ACK_WITHIN_S``, as a
        modal): acked before, a crash in between lost an answer Slack had been told was taken,
        and the clicker was told nothing. Any other click (one that opens a modal) is acked at once."""
        try:
            click = Click.read(body)
        except Malformed as e:  # only over Socket Mode: the HTTP door refuses these
            logger.warning("slack: ignored a malformed button click: %s", e)
            await ack()
            return
        decided = asyncio.Event()
        task = self._spawn(self._answer_action(click, decided))
        if task is not None and _answer_of(click.what) is not None:
            waiting = asyncio.ensure_future(decided.wait())
            await asyncio.wait({task, waiting}, timeout=_ACK_WITHIN_S, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
        await ack()

    async def _on_deny_submitted(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await self._submitted(ack, body, self._answer_deny)

    async def _on_form_submitted(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await self._submitted(ack, body, self._answer_form)

    async def _submitted(
        self,
        ack: AsyncAck,
        body: dict[str, Any],
        answer: Callable[[Submission], Coroutine[Any, Any, _Verdict | None]],
    ) -> None:
        """Answer a modal before acking it, so a refusal shows in the modal itself.

        Slack waits 3 s for the ack; an answer slower than ``_ACK_WITHIN_S`` goes on
        after the modal closed, and what it has to say comes as an ephemeral.
        """
        try:
            submission = Submission.read(body)
        except Malformed as e:  # only over Socket Mode: the HTTP door refuses these
            logger.warning("slack: ignored a malformed modal submission: %s", e)
            await ack()
            return
        task = self._spawn(answer(submission))
        if task is None:
            await ack()
            return
        done, _ = await asyncio.wait({task}, timeout=_ACK_WITHIN_S)
        if task not in done:
            await ack()
            task.add_done_callback(partial(self._tell_late, submission))
            return
        verdict = _verdict_of(task)
        if verdict is None:
            await ack()
        elif verdict.errors:
            await ack(response_action="errors", errors=verdict.errors)
        else:
            await ack(response_action="update", view=_notice_view(verdict.text))

    def _tell_late(self, submission: Submission, task: asyncio.Task[_Verdict | None]) -> None:
        verdict = _verdict_of(task)
        if verdict is not None:
            channel = submission.channel or self.settings.channel
            self._spawn(self._ephemeral(channel, submission.user, verdict.text))

    async def _answer_action(self, click: Click, decided: asyncio.Event | None = None) -> None:
        """Answer a click; ``decided`` is set once its answer is stored or refused (what the
        clicker is told after that, an ephemeral, is not waited for by the ack)."""
        channel = click.channel or self.settings.channel
        try:
            checked = await self._check(click.tenant_id, click.request_id, click.user)
            answer = _answer_of(click.what)
            if isinstance(checked, _Verdict):
                if decided is not None:
                    decided.set()
                if checked.ended is not None:  # what still shows its buttons is brought up to date now
                    self._spawn(self._update_quietly(checked.ended, click, channel))
                if answer is not None and _already_given(checked.ended, click.user, answer):
                    return  # a retried delivery of the click that was recorded: nothing to tell
                await self._ephemeral(channel, click.user, checked.text)
                return
            request, verdict = checked, None
            if answer is not None:
                verdict = await self._resolve(request, answer, click.user)
                if decided is not None:
                    decided.set()
            elif click.what == "deny":
                await self._open(click, channel, _deny_view(request, channel))
            elif not _form_in_slack(request):
                await self._client.chat_postEphemeral(
                    channel=channel, user=click.user, text=_elsewhere_note(request)
                )
            else:
                await self._open(click, channel, _form_view(request, channel))
            if verdict is not None:
                await self._ephemeral(channel, click.user, verdict.text)
        except Exception:
            logger.exception("slack: handling a button failed")

    async def _update_quietly(self, request: InputRequest, click: Click, channel: str) -> None:
        """For an ended request someone clicked: a post whose update failed (its location is kept
        until one succeeds) loses its buttons now, and so does the clicked message if it is another
        post of the request: one whose location was never kept (a process died between Slack's
        answer and the store's write, and the request was posted again), which only a click finds."""
        with contextlib.suppress(Exception):  # logged by _update_post
            kept = await self.context.recall(_post_key(request))
            await self.on_outcome(request)
            if click.message_ts and (kept is None or kept.get("ts") != click.message_ts):
                # Not the post whose location is kept (updated by ``on_outcome``, or being updated)
                await self._client.chat_update(channel=channel, ts=click.message_ts, **_ended_post(request))

    async def _open(self, click: Click, channel: str, view: dict[str, Any]) -> None:
        """Open a modal for the clicker; one Slack will not open (its trigger expired, a view it
        refuses) is said to them, not dropped."""
        try:
            await self._client.views_open(trigger_id=click.trigger_id, view=view)
        except SlackApiError as error:
            logger.warning(
                "slack: a modal for %s could not open: %s", click.request_id, error.response.get("error")
            )
            await self._ephemeral(
                channel,
                click.user,
                "Not recorded: the form could not open in Slack "
                f"({error.response.get('error') or 'refused'}); click again, or answer through the "
                "console, the API (ResolveInput) or the session's chat.",
            )

    async def _answer_deny(self, submission: Submission) -> _Verdict | None:
        checked = await self._check(submission.tenant_id, submission.request_id, submission.user)
        if isinstance(checked, _Verdict):
            return checked
        resolution = Resolution(decision=Decision.DENY, reason=submission.reason)
        return await self._resolve(checked, resolution, submission.user)

    async def _answer_form(self, submission: Submission) -> _Verdict | None:
        checked = await self._check(submission.tenant_id, submission.request_id, submission.user)
        if isinstance(checked, _Verdict):
            return checked
        if checked.form is None or not _form_in_slack(checked):
            return _Verdict(_elsewhere_note(checked))
        try:
            values = _form_values(checked.form, submission.state)
        except _BadValue as e:  # shown under its input; the modal stays open
            return _Verdict(str(e), errors={e.block: str(e)})
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            logger.warning("slack: ignored an unreadable form submission: %s: %s", type(e).__name__, e)
            return _Verdict("Not recorded: the form could not be read; please try again.")
        verdict = await self._resolve(checked, Resolution(values=values), submission.user)
        if verdict is not None and verdict.field:
            # A value the mesh refused: shown under its input, the modal stays open.
            names = [f.name for f in checked.form.fields]
            if verdict.field in names:
                return _Verdict(verdict.text, errors={f"f{names.index(verdict.field)}": verdict.text})
        return verdict

    async def _check(self, tenant_id: str, request_id: str, user: str) -> InputRequest | _Verdict:
        """The request if ``user`` may answer it now; otherwise what to tell them."""
        try:
            request = await self.context.get_request(tenant_id=tenant_id, request_id=request_id)
        except MeshError as e:
            return _Verdict(f"This request cannot be answered: {_esc(e.message)}")
        if request.state is not InputState.PENDING:
            return _Verdict(_too_late(request), ended=request)
        # The core's rule, checked before a modal opens; the core checks it again when answered. The
        # adapter's own list narrows who in Slack answers requests that name no responders.
        responder = f"slack:{user}"
        narrowed = not request.allowed_responders and self.settings.allowed_responders
        if not request.may_answer(responder, Surface.SLACK) or (
            narrowed and not responder_allowed(responder, self.settings.allowed_responders, Surface.SLACK)
        ):
            return _Verdict("You are not one of the allowed responders for this request.")
        return request

    async def _resolve(self, request: InputRequest, resolution: Resolution, user: str) -> _Verdict | None:
        """Answer ``request``; ``None`` when recorded, otherwise what to tell ``user``."""
        try:
            await self.context.resolve(
                tenant_id=request.tenant_id,
                request_id=request.request_id,
                resolution=resolution,
                responder=f"slack:{user}",
                surface=Surface.SLACK,
            )
        except AlreadyResolved as e:  # someone was quicker: name them as Slack shows people
            try:
                ended = await self.context.get_request(
                    tenant_id=request.tenant_id, request_id=request.request_id
                )
            except MeshError:
                return _Verdict(f"Not recorded: {_esc(e.message)}")
            if _already_given(ended, user, resolution):
                return None  # Slack delivered this click again: it is the answer recorded
            return _Verdict(_too_late(ended))
        except InvalidArgument as e:
            return _Verdict(f"Not recorded: {_esc(e.message)}", field=e.field.rpartition(".")[2])
        except MeshError as e:
            return _Verdict(f"Not recorded: {_esc(e.message)}")
        return None

    async def _ephemeral(self, channel: str, user: str, text: str) -> None:
        try:
            await self._client.chat_postEphemeral(channel=channel, user=user, text=text)
        except Exception:
            logger.exception("slack: an ephemeral reply to %s failed", user)


@dataclass(frozen=True)
class _Verdict:
    """Why an answer from Slack was not recorded, for the person who gave it."""

    text: str
    """Slack mrkdwn (mentions render)."""
    errors: dict[str, str] | None = None
    """Block id -> message, to show under inputs of a still-open modal."""
    field: str = ""
    """The form field the mesh refused, if it named one."""
    ended: InputRequest | None = None
    """The request, when it had already ended."""


_FAILED = _Verdict("Not recorded: the mesh could not take this answer; please try again.")


def _answer_of(what: str) -> Resolution | None:
    """What a button answers by itself (deny and forms open a modal first)."""
    if what in ("approve", "approve_for_session"):
        return Resolution(decision=Decision(what))
    if what in ("confirm", "reject"):
        return Resolution(confirmed=what == "confirm")
    return None


def _already_given(ended: InputRequest | None, user: str, answer: Resolution) -> bool:
    """Whether ``ended`` was answered by this Slack user, this way: Slack retries a delivery it
    thinks was lost (``X-Slack-Retry-Num``), and the clicker is not told their own answer lost."""
    if ended is None or ended.state is not InputState.RESOLVED or ended.resolution is None:
        return False
    given = ended.resolution
    return (
        given.surface is Surface.SLACK
        and given.resolved_by == f"slack:{user}"
        and given.decision == answer.decision
        and given.confirmed == answer.confirmed
        and dict(given.values) == dict(answer.values)
    )


def _verdict_of(task: asyncio.Task[_Verdict | None]) -> _Verdict | None:
    """What a finished modal answer has to say; a failure is logged once and said as such."""
    if task.cancelled():
        return None
    error = task.exception()
    if error is not None:
        logger.error("slack: answering a modal failed", exc_info=error)
        return _FAILED
    return task.result()


def _too_late(request: InputRequest) -> str:
    ended = "was already answered" if request.state is InputState.RESOLVED else "has ended"
    return f"Not recorded: this request {ended}. {_outcome_line(request)}"


def _notice_view(text: str) -> dict[str, Any]:
    """A modal that replaces a submitted one: what happened, and a Close button."""
    return {
        "type": "modal",
        "title": _plain("Not recorded", 24),
        "close": _plain("Close"),
        "blocks": [_section(text)],
    }


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


def _elsewhere_note(request: InputRequest) -> str:
    """Why a form is answered elsewhere than in Slack."""
    return _SENSITIVE_NOTE if _sensitive(request) else _TOO_BIG_NOTE


_MAX_OPTIONS = {"select": 100, "action": 10}
"""Most options Block Kit takes in a ``static_select`` and in ``radio_buttons``."""


def _form_in_slack(request: InputRequest) -> bool:
    """Whether the form can be filled in a modal: at most 100 blocks, options within Block Kit's
    limits, nothing sensitive."""
    form = request.form
    return (
        form is not None
        and not _sensitive(request)
        and len(form.fields) < 100
        and all(len(f.options) <= _MAX_OPTIONS.get(f.type, len(f.options)) for f in form.fields)
    )


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
        return [*blocks, _section(_elsewhere_note(request))]
    return (
        [*blocks, {"type": "actions", "block_id": "svantic.actions", "elements": buttons}]
        if buttons
        else blocks
    )


def _ended_post(request: InputRequest) -> dict[str, Any]:
    """A request's post once it ended: what was asked and what became of it, without buttons."""
    line = _outcome_line(request)
    return {"text": f"{request.summary}: {line}", "blocks": [*_description_blocks(request), _section(line)]}


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


def _deny_view(request: InputRequest, channel: str) -> dict[str, Any]:
    reason = {"type": "plain_text_input", "action_id": "value", "multiline": True}
    return {
        "type": "modal",
        "callback_id": DENY_VIEW,
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
    elif f.type == "checkbox":  # (an action without options is the text it names, as in the console)
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
        "callback_id": FORM_VIEW,
        "private_metadata": _metadata(request, channel),
        "title": _plain(request.form.title or "Input", 24),
        "submit": _plain("Submit"),
        "close": _plain("Cancel"),
        "blocks": blocks,
    }


class _BadValue(ValueError):
    """A typed value the form cannot take; ``block`` is its input's block id in the modal."""

    def __init__(self, block: str, text: str) -> None:
        super().__init__(text)
        self.block = block


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
            if f.type != "number":
                values[f.name] = got["value"]
                continue
            try:
                values[f.name] = form_number(str(got["value"]))
            except ValueError as e:
                raise _BadValue(f"f{i}", f"{f.label or f.name}: {e}") from None
    return values
