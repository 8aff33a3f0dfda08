"""The console's routes: sign-in, the approval queue, sessions and agents, under ``/console``.

Every page is rendered on the server with autoescaped templates and works without
JavaScript for reading; ``static/console.js`` only follows the server-sent event
streams. Each handler calls one public core service with the signed-in ``Caller``, so
the core's tenant and scope checks apply exactly as for the gRPC API.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import math
import pathlib
import secrets
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from svantic_grpc.console.auth import COOKIE, ConsoleLogin, ConsoleLogins
from svantic_grpc.console.feed import QueueFeed
from svantic_grpc.console.resolve_form import FIELD_PREFIX, resolution_from_form
from svantic_grpc.core.errors import (
    AlreadyResolved,
    Conflict,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from svantic_grpc.core.events import (
    AgentJoined,
    AgentLeft,
    Event,
    EventPayload,
    InputEnded,
    InputRaised,
    MessageStateChanged,
    StatusChanged,
)
from svantic_grpc.core.inputs.model import Surface
from svantic_grpc.core.mesh import Mesh
from svantic_grpc.core.models import SessionStatus

__all__ = ["Console", "console_routes"]

_HERE = pathlib.Path(__file__).parent
_PRE = "svantic_console_pre"
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_STATUS = {
    NotFound: 404,
    PermissionDenied: 403,
    Unauthenticated: 401,
    InvalidArgument: 400,
    Conflict: 409,
}
_KEEPALIVE_S = 15.0
_REPLICA_POLL_S = 2.0
"""How often an open queue page on a replica looks for requests raised or ended on the others."""
QUEUE_SHOWN = 200
"""The queue shows this many pending requests, the oldest first, and says when more wait."""
_MAX_FORM = 256 * 1024

Handler = Callable[[Request, ConsoleLogin], Awaitable[Response]]


def console_routes(mesh: Mesh) -> list[BaseRoute]:
    """The console mounted at ``/console``; registers its queue listener with the core."""
    return Console(mesh).routes()


def _when(t: float | None) -> str:
    if not t:
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


class Console:
    """The console's state (logins, the queue feed) and its routes; ``close`` ends live streams."""

    def __init__(self, mesh: Mesh, *, public_url: str = "") -> None:
        self.mesh = mesh
        self.tls = public_url.startswith("https://")
        """Reached over TLS (``http_public_url`` says https): cookies are ``Secure`` even when a proxy
        in front ends TLS and this server sees plain HTTP."""
        self.logins = ConsoleLogins(tokens=mesh.tokens, store=mesh.store, clock=mesh.clock)
        self.feed = QueueFeed()
        mesh.inputs.add_listener(self.feed)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["when"] = _when
        self.env.filters["seg"] = path_segment
        self.env.globals["CONSOLE"] = Surface.CONSOLE
        self.env.filters["json_text"] = _json_text
        self.env.globals["FIELD_PREFIX"] = FIELD_PREFIX

    def close(self) -> None:
        """The server is stopping: end every live stream now instead of eating the shutdown grace."""
        self.feed.close()

    def routes(self) -> list[BaseRoute]:
        """Everything under ``/console``."""
        return [Mount("/console", routes=self._routes())]

    def _routes(self) -> list[BaseRoute]:
        a = self._authed
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", a(self.logout, post=True), methods=["POST"]),
            Route("/queue", a(self.queue), methods=["GET"]),
            Route("/queue/items", a(self.queue_items), methods=["GET"]),
            Route("/queue/events", a(self.queue_events), methods=["GET"]),
            Route("/inputs/{request_id}/resolve", a(self.resolve, post=True), methods=["POST"]),
            Route("/sessions", a(self.sessions), methods=["GET"]),
            Route("/sessions/{session_id}", a(self.session), methods=["GET"]),
            Route("/sessions/{session_id}/events", a(self.session_events), methods=["GET"]),
            Route("/sessions/{session_id}/close", a(self.close_session, post=True), methods=["POST"]),
            Route("/agents", a(self.agents), methods=["GET"]),
            Route("/agents/{instance_id}/deregister", a(self.deregister, post=True), methods=["POST"]),
            Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
        ]

    # Rendering

    def render(self, name: str, status: int = 200, **context: Any) -> Response:
        context.setdefault("login", None)
        context.setdefault("notice", "")
        html = self.env.get_template(name).render(**context)
        return _secured(HTMLResponse(html, status_code=status))

    def error(self, login: ConsoleLogin | None, exc: MeshError) -> Response:
        status = next((code for kind, code in _STATUS.items() if isinstance(exc, kind)), 400)
        return self.render("error.html", status, login=login, message=str(exc), status_code=status)

    def _authed(self, handler: Handler, *, post: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            login = await self.logins.get(request.cookies.get(COOKIE, ""))
            if login is None:
                if post or request.url.path.endswith("/events"):
                    return _secured(Response("sign in first", status_code=401))
                return _secured(RedirectResponse("/console/login", status_code=303))
            try:
                if post and not login.csrf_ok((await _form(request)).get("csrf", "")):
                    return self.render(
                        "error.html", 403, login=login, message="missing or wrong CSRF token", status_code=403
                    )
                return await handler(request, login)
            except MeshError as exc:
                return self.error(login, exc)

        return endpoint

    # Sign-in

    async def index(self, request: Request) -> Response:
        if await self.logins.get(request.cookies.get(COOKIE, "")) is None:
            return _secured(RedirectResponse("/console/login", status_code=303))
        return _secured(RedirectResponse("/console/queue", status_code=303))

    async def login_page(self, request: Request, *, message: str = "", status: int = 200) -> Response:
        pre = secrets.token_urlsafe(24)
        response = self.render("login.html", status, pre=pre, message=message)
        response.set_cookie(
            _PRE, pre, httponly=True, samesite="strict", path="/console", secure=self.tls or _https(request)
        )
        return response

    async def login(self, request: Request) -> Response:
        try:
            form = await _form(request)
        except InvalidArgument as exc:
            return await self.login_page(request, message=str(exc), status=413)
        pre = request.cookies.get(_PRE, "")
        if not pre or not secrets.compare_digest(pre, str(form.get("csrf", ""))):
            return await self.login_page(request, message="the sign-in form expired; try again", status=403)
        try:
            sid, _ = await self.logins.sign_in(
                str(form.get("client_id", "")),
                str(form.get("client_secret", "")),
                peer=request.client.host if request.client else "",
            )
        except ResourceExhausted as exc:
            page = await self.login_page(request, message=str(exc), status=429)
            page.headers["Retry-After"] = str(math.ceil(exc.retry_after_s or 1))
            return page
        except MeshError as exc:
            return await self.login_page(request, message=str(exc), status=401)
        response = _secured(RedirectResponse("/console/queue", status_code=303))
        secure = self.tls or _https(request)
        response.set_cookie(COOKIE, sid, httponly=True, samesite="strict", path="/console", secure=secure)
        response.delete_cookie(_PRE, path="/console")
        return response

    async def logout(self, request: Request, login: ConsoleLogin) -> Response:
        await self.logins.sign_out(request.cookies.get(COOKIE, ""))
        response = _secured(RedirectResponse("/console/login", status_code=303))
        response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict")
        return response

    # The approval queue

    async def _pending(self, login: ConsoleLogin) -> tuple[list[Any], bool]:
        """The oldest pending requests the queue shows, and whether more wait behind them."""
        page = await self.mesh.inputs.list_pending(login.caller, page_size=QUEUE_SHOWN)
        return list(page.requests), bool(page.next_cursor)

    async def queue(self, request: Request, login: ConsoleLogin, **extra: Any) -> Response:
        status = extra.pop("status", 200)
        requests, more = await self._pending(login)
        return self.render(
            "queue.html",
            status,
            login=login,
            requests=requests,
            more=more,
            now=self.mesh.clock.now(),
            **extra,
        )

    async def _queue_state(self, login: ConsoleLogin) -> frozenset[tuple[str, int]]:
        """What the queue holds now: its requests and their versions."""
        requests, _ = await self._pending(login)
        return frozenset((r.request_id, r.version) for r in requests)

    async def queue_items(self, request: Request, login: ConsoleLogin) -> Response:
        requests, more = await self._pending(login)
        return self.render(
            "queue_items.html", login=login, requests=requests, more=more, now=self.mesh.clock.now()
        )

    async def queue_events(self, request: Request, login: ConsoleLogin) -> Response:
        sid = request.cookies.get(COOKIE, "")

        # This process hears of the requests it raises and ends itself. Replicas sharing the
        # store also raise and end requests: their changes are found by looking at the queue
        # every _REPLICA_POLL_S (one query per open page), as the events do not name a tenant.
        shared = not self.mesh.ownership.sole
        wait_s = _REPLICA_POLL_S if shared else _KEEPALIVE_S

        async def stream() -> AsyncIterator[str]:
            tenant_id = login.caller.tenant_id
            try:  # a live stream like any other: it counts against max_streams_per_tenant
                self.mesh.streams.take(tenant_id)
            except ResourceExhausted as exc:
                yield _refused(exc)
                return
            try:
                async with contextlib.aclosing(follow()) as entries:
                    async for entry in entries:
                        yield entry
            finally:
                self.mesh.streams.give_back(tenant_id)

        async def follow() -> AsyncGenerator[str, None]:
            async with self.feed.subscribe(login.caller.tenant_id) as changes:
                yield "retry: 2000\n\n"
                seen = await self._queue_state(login) if shared else None
                quiet_s = 0.0
                while True:
                    try:
                        async with asyncio.timeout(wait_s):
                            change = await changes.get()
                    except TimeoutError:
                        quiet_s += wait_s
                        if seen is not None:
                            now = await self._queue_state(login)
                            if now != seen:
                                seen = now
                                quiet_s = 0.0
                                if await self.logins.get(sid) is None:
                                    return
                                yield "event: queue\ndata: changed on another replica\n\n"
                                continue
                        if quiet_s >= _KEEPALIVE_S:
                            quiet_s = 0.0
                            yield ": keepalive\n\n"
                        continue
                    quiet_s = 0.0
                    if seen is not None and change is not None:
                        seen = await self._queue_state(login)
                    if change is None:
                        return  # the server is stopping; the browser reconnects to the next one
                    if await self.logins.get(sid) is None:
                        return  # signed out (or expired) meanwhile: nothing more for this cookie
                    yield f"event: queue\ndata: {change}\n\n"

        return _sse(stream())

    async def resolve(self, request: Request, login: ConsoleLogin) -> Response:
        request_id = _id_in_path(request, "request_id")
        current = await self.mesh.inputs.get(login.caller.tenant_id, request_id)
        form = await _form(request)
        try:
            resolution = resolution_from_form(current, form)
            resolved = await self.mesh.inputs.resolve_as(
                login.caller, request_id, resolution, surface=Surface.CONSOLE
            )
        except AlreadyResolved as exc:
            return await self.queue(request, login, notice=str(exc), notice_kind="lost", status=409)
        except (InvalidArgument, PermissionDenied) as exc:
            status = 403 if isinstance(exc, PermissionDenied) else 400
            return await self.queue(request, login, notice=str(exc), notice_kind="error", status=status)
        what = (
            resolved.resolution.decision.value
            if resolved.resolution and resolved.resolution.decision
            else "answered"
        )
        return await self.queue(request, login, notice=f"{request_id}: {what}", notice_kind="ok")

    # Sessions

    async def sessions(self, request: Request, login: ConsoleLogin) -> Response:
        status = request.query_params.get("status", "")
        try:
            statuses = (SessionStatus(status),) if status else ()
        except ValueError:
            raise InvalidArgument("status", f"{status!r} is not a session status") from None
        page = await self.mesh.sessions.list_sessions(
            login.caller, statuses=statuses, page_size=25, page_token=request.query_params.get("page", "")
        )
        return self.render(
            "sessions.html",
            login=login,
            page=page,
            status_filter=status,
            statuses=[s.value for s in SessionStatus],
        )

    async def session(self, request: Request, login: ConsoleLogin, notice: str = "") -> Response:
        session_id = _id_in_path(request, "session_id")
        session = await self.mesh.sessions.get(login.caller, session_id)
        messages = await self.mesh.messages.list_messages(
            login.caller,
            session_id=session_id,
            page_size=100,
            page_token=request.query_params.get("page", ""),
        )
        pending = await self.mesh.inputs.list_pending(login.caller, session_id=session_id)
        return self.render(
            "session.html",
            login=login,
            session=session,
            messages=messages.messages,
            next_messages=messages.next_cursor,
            paged=bool(request.query_params.get("page")),
            pending=pending.requests,
            more_pending=bool(pending.next_cursor),
            notice=notice,
        )

    async def session_events(self, request: Request, login: ConsoleLogin) -> Response:
        sid = request.cookies.get(COOKIE, "")
        session_id = _id_in_path(request, "session_id")
        after = request.headers.get("last-event-id") or request.query_params.get("after", "0")
        try:
            after_sequence = int(after)
        except ValueError:
            raise InvalidArgument("after", "must be an event sequence number") from None
        events = await self.mesh.sessions.watch(login.caller, session_id, after_sequence=after_sequence)

        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            try:
                async for event in events:
                    if await self.logins.get(sid) is None:
                        return  # signed out (or expired) meanwhile
                    yield _timeline_entry(event)
            except ResourceExhausted as exc:
                if exc.reason == "TOO_MANY_STREAMS":
                    yield _refused(exc)  # said on the page, not reopened every two seconds in silence
                return  # or this page fell behind: the browser resumes later
            except Unavailable:
                return  # the server is stopping: the browser resumes on the next one
            except MeshError:
                pass  # nothing to follow from there (events no longer kept, say): as at the end
            # The session closed (or cannot be followed): the page's script stops following, where
            # a stream that just ended would be opened again by the browser every two seconds.
            yield "event: end\ndata: \n\n"

        return _sse(stream())

    async def close_session(self, request: Request, login: ConsoleLogin) -> Response:
        session_id = _id_in_path(request, "session_id")
        await self.mesh.sessions.close(
            login.caller, session_id, reason=f"closed from the console by {login.caller.subject}"
        )
        return _secured(RedirectResponse(f"/console/sessions/{path_segment(session_id)}", status_code=303))

    # Agents

    async def agents(self, request: Request, login: ConsoleLogin, notice: str = "") -> Response:
        registry = self.mesh.registry
        agents = await registry.list_agents(login.caller)
        rows = [(a, registry.effective_status(a).value) for a in agents]
        return self.render("agents.html", login=login, rows=rows, notice=notice)

    async def deregister(self, request: Request, login: ConsoleLogin) -> Response:
        instance_id = _id_in_path(request, "instance_id")
        await self.mesh.registry.deregister(login.caller, instance_id)
        return await self.agents(request, login, notice=f"deregistered {instance_id}")


def path_segment(value: str) -> str:
    """An id as one path segment of a console URL, quoted twice.

    Ids may hold ``/`` (and so ``..``): quoted once, the server would see the slash again
    after it decodes the path, and a route would cut the id there; unquoted, a browser would
    resolve ``a/../b`` to another row's id. Quoted twice, the decoded path holds ``%2F``,
    and ``_id_in_path`` unquotes it back.
    """
    return urllib.parse.quote(urllib.parse.quote(value, safe=""), safe="")


def _id_in_path(request: Request, name: str) -> str:
    return urllib.parse.unquote(request.path_params[name])


def _json_text(value: Any) -> str:
    """A JSON value as indented text, exactly as written: the template's autoescape makes it safe
    in HTML (Jinja's ``tojson`` writes ``<`` as ``\\u003c``, which an operator cannot read)."""
    return json.dumps(value, indent=2, ensure_ascii=False)


_LINE_BREAKS = str.maketrans({"\r": " ", "\n": " ", "\u2028": " ", "\u2029": " "})


def _timeline_entry(event: Event) -> str:
    """One server-sent event of the timeline; its id is the sequence a reconnect resumes after."""
    line = (
        f"{_when(event.time)} #{event.sequence} {type(event.payload).__name__} {_event_line(event.payload)}"
    )
    # A server-sent event's fields end at CR, LF or CRLF: text an agent or client wrote (a reason)
    # must not end the line and add fields of its own.
    return f"id: {event.sequence}\nevent: timeline\ndata: {line.translate(_LINE_BREAKS)}\n\n"


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the console's only kind), last value wins."""
    body = await request.body()
    if len(body) > _MAX_FORM:
        raise InvalidArgument("form", f"is larger than {_MAX_FORM} bytes")
    return dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _event_line(payload: EventPayload) -> str:
    """One line for the timeline; never form values (they may be sensitive)."""
    if isinstance(payload, AgentJoined):
        return f"{payload.agent.agent_type} {payload.agent.instance_id} ({payload.agent.join_reason.value})"
    if isinstance(payload, AgentLeft):
        return f"{payload.agent_type} {payload.instance_id} ({payload.reason})"
    if isinstance(payload, StatusChanged):
        return f"{payload.from_status.value} -> {payload.to_status.value} {payload.reason}".strip()
    if isinstance(payload, MessageStateChanged):
        before = payload.from_state.value if payload.from_state else "new"
        return f"{payload.message_id} {before} -> {payload.to_state.value} {payload.reason}".strip()
    if isinstance(payload, InputRaised | InputEnded):
        request = payload.request
        line = f"{request.request_id} {request.kind.value} {request.state.value}"
        if request.resolution is not None:
            line += f" by {request.resolution.resolved_by} via {request.resolution.surface.value}"
        return line
    return payload.message_id


def _sse(stream: AsyncIterator[str]) -> Response:
    response = StreamingResponse(stream, media_type="text/event-stream")
    response.headers["Cache-Control"] = "no-store"
    return _secured(response)


def _https(request: Request) -> bool:
    """Cookies are ``Secure`` whenever the console is reached over TLS."""
    return request.url.scheme == "https"


def _secured(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _refused(error: ResourceExhausted) -> str:
    """A stream refused for the tenant's allowance, told to the page (whose script shows it and
    stops following) instead of a silent end the browser would reopen every two seconds."""
    text = " ".join(error.message.split())
    return f"event: refused\ndata: {text}\n\n"
