"""Write a connected-mode agent in a few lines.

A connected agent dials the mesh (it works behind NAT, on a laptop, in CI) and
keeps ``RegistryService.Connect`` open; the mesh sends it dispatches on that
stream. This helper registers the instance, keeps the stream and its heartbeats
going, verifies each dispatch's signed token, runs your handler per dispatch and
sends its replies::

    async def handle(dispatch: Dispatch, reply: Reply) -> None:
        await reply.artifact(f"echo: {dispatch.text}")
        await reply.complete()

    agent = ConnectedAgent("127.0.0.1:50051", client_id="svantic", client_secret="your-secret",
                           agent_type="echo", instance_id="echo-1", handler=handle)
    await agent.run()

The helper acknowledges each dispatch (state ``working``) before calling the
handler, so the mesh knows it was delivered. A handler that returns without a
final state completes the message; one that raises fails it with the error.

JSON values keep their types both ways: the helper sends tool arguments and data
parts as exact JSON text beside their Structs and reads the mesh's ``*_json`` text
back (``Dispatch.data``, ``ask_form``, ``exact_json`` for ``request_input`` answers),
so ``{"ids": [1, 2]}`` stays integers and never becomes ``[1.0, 2.0]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import jwt
from google.protobuf import json_format
from grpc import aio
from opentelemetry import context as otel_context

from svantic_grpc import _json
from svantic_grpc._w3c import extracted
from svantic_grpc.core._mailbox import Mailbox
from svantic_grpc.pb import agent_types_pb2, auth_service_pb2, message_types_pb2, registry_service_pb2
from svantic_grpc.pb.auth_service_pb2_grpc import AuthServiceStub
from svantic_grpc.pb.registry_service_pb2_grpc import RegistryServiceStub

__all__ = ["ConnectedAgent", "Dispatch", "Handler", "Reply", "exact_json"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dispatch:
    """One piece of work from the mesh."""

    dispatch_id: str
    session_id: str
    message: message_types_pb2.Message
    claims: dict[str, Any]
    """The verified dispatch token's claims (tenant_id, agent_type, session_id, ...); empty
    unless the agent was made with ``verify_dispatches``."""

    @property
    def text(self) -> str:
        """The message's text parts, joined by newlines."""
        return "\n".join(p.text for p in self.message.parts if p.WhichOneof("content") == "text")

    @property
    def data(self) -> list[dict[str, Any]]:
        """The message's data parts as dicts, integers as ints."""
        return [
            exact_json(p.data, p.data_json)
            for p in self.message.parts
            if p.data_json or p.WhichOneof("content") == "data"
        ]


exact_json = _json.exact_object
"""``exact_json(struct, text)``: a JSON object from the mesh, integers as ints; its exact
``*_json`` text when set (``resolution.values_json``...), else the Struct."""


PartLike = str | dict[str, Any] | message_types_pb2.Part


_ONE_PART = (str, dict, message_types_pb2.Part)

_MAX_BACKOFF_S = 60.0
"""The longest wait between two tries to reach the mesh after failing again and again."""


def _parts(content: PartLike | Iterable[PartLike]) -> list[message_types_pb2.Part]:
    if isinstance(content, str):  # the common reply: one text
        return [message_types_pb2.Part(text=content)]
    items = [content] if isinstance(content, _ONE_PART) else list(content)
    parts = []
    for item in items:
        if isinstance(item, message_types_pb2.Part):
            parts.append(item)
        elif isinstance(item, str):
            parts.append(message_types_pb2.Part(text=item))
        else:
            part = message_types_pb2.Part(data_json=_json.dumps(item))
            part.data.update(item)
            parts.append(part)
    return parts


@dataclass
class Reply:
    """How a handler answers one dispatch. Each call sends one update to the mesh."""

    dispatch_id: str
    _send: Callable[[registry_service_pb2.DispatchUpdate], Awaitable[None]]
    done: bool = field(default=False, init=False)
    _answers: asyncio.Queue[message_types_pb2.InputRequest] | None = field(default=None, init=False)
    """Answers from the mesh to what this handler asked (made when first needed: most never ask)."""
    prefilled: list[message_types_pb2.InputRequest] = field(default_factory=list)
    """Answers that came with the dispatch: given before a mesh restart to a question this
    handler asked then. ``request_input`` uses a matching one instead of asking again."""
    message_id: str = ""
    _sequels: _Sequels | None = None
    _sequel: _Sequel | None = field(default=None, init=False)
    """What this handler sent since its last answer, kept in case that answer comes again."""
    _asking: message_types_pb2.InputRequest | None = field(default=None, init=False)
    """What the handler asked and waits for the answer to (``request_input``)."""

    async def _update(
        self, state: int = 0, *, say: Any = None, artifacts: Any = None, reason: str = ""
    ) -> None:
        if self.done:
            raise RuntimeError(f"dispatch {self.dispatch_id} already ended")
        update = registry_service_pb2.DispatchUpdate(dispatch_id=self.dispatch_id, state=state, reason=reason)  # type: ignore[arg-type]
        if say is not None:
            _say(update, say)
        if artifacts:
            update.artifacts.extend(artifacts)
        if state not in _PROGRESS_STATES:
            self.done = True
        await self._sent(update)

    async def _sent(self, update: registry_service_pb2.DispatchUpdate) -> None:
        if self._sequel is not None:
            self._sequel.updates.append(update)
        await self._send(update)

    async def say(self, content: PartLike | Iterable[PartLike]) -> None:
        """Add a turn to the message's history (progress the user sees)."""
        await self._update(message_types_pb2.MESSAGE_STATE_WORKING, say=content)

    async def artifact(
        self, content: PartLike | Iterable[PartLike], *, name: str = "", artifact_id: str = ""
    ) -> None:
        """Send an output."""
        artifact = message_types_pb2.Artifact(artifact_id=artifact_id, name=name, parts=_parts(content))
        await self._update(artifacts=[artifact])

    async def complete(self, content: PartLike | Iterable[PartLike] | None = None) -> None:
        """Finish successfully, optionally with a last turn."""
        await self._update(message_types_pb2.MESSAGE_STATE_COMPLETED, say=content)

    async def fail(self, reason: str) -> None:
        """Finish with an error a person can act on."""
        await self._update(message_types_pb2.MESSAGE_STATE_FAILED, reason=reason)

    async def reject(self, reason: str) -> None:
        """Refuse the work."""
        await self._update(message_types_pb2.MESSAGE_STATE_REJECTED, reason=reason)

    async def input_required(self, question: str) -> str | None:
        """Ask the human a free-text question and wait: the answer, or ``None`` if nobody gave one."""
        field = message_types_pb2.FormField(name="answer", type="textarea", label=question, required=True)
        request = message_types_pb2.InputRequest(
            kind=message_types_pb2.INPUT_KIND_FORM,
            form=message_types_pb2.Form(title=question, fields=[field]),
        )
        answer = await self.request_input(request, say=question)
        if answer.state != message_types_pb2.INPUT_STATE_RESOLVED:
            return None
        return str(exact_json(answer.resolution.values, answer.resolution.values_json).get("answer", ""))

    async def request_input(
        self, request: message_types_pb2.InputRequest, *, say: PartLike | Iterable[PartLike] | None = None
    ) -> message_types_pb2.InputRequest:
        """Ask for input and wait for the answer: the request as it ended (state and resolution).

        Tool approvals are first checked against the mesh's policies, so the answer
        may come at once (allowed or blocked by policy) or after a human decides.
        """
        for index, answer in enumerate(self.prefilled):
            if _answers(answer, request):
                return self._took(self.prefilled.pop(index))
        update = registry_service_pb2.DispatchUpdate(
            dispatch_id=self.dispatch_id,
            state=message_types_pb2.MESSAGE_STATE_INPUT_REQUIRED,
            input_request=request,
        )
        if say is not None:
            _say(update, say)
        await self._sent(update)
        self._asking = request
        try:
            return self._took(await self._answer_queue().get())
        finally:
            self._asking = None

    def _took(self, answer: message_types_pb2.InputRequest) -> message_types_pb2.InputRequest:
        """From an answer on, what the handler sends is kept (``_Sequels``)."""
        if self._sequels is not None and answer.request_id and self.message_id:
            self._sequel = self._sequels.begin(self.message_id, answer.request_id, self)
        return answer

    def _answer_queue(self) -> asyncio.Queue[message_types_pb2.InputRequest]:
        if self._answers is None:
            self._answers = asyncio.Queue()
        return self._answers

    def _answer(self, request: message_types_pb2.InputRequest) -> None:
        self._answer_queue().put_nowait(request)

    async def ask_approval(self, tool_name: str, arguments: dict[str, Any] | None = None) -> bool:
        """Ask whether the agent may call a tool; ``True`` when approved (by policy or a human)."""
        request = message_types_pb2.InputRequest(
            kind=message_types_pb2.INPUT_KIND_TOOL_APPROVAL,
            tool_call=message_types_pb2.ToolCall(tool_name=tool_name),
        )
        request.tool_call.arguments.update(arguments or {})
        request.tool_call.arguments_json = _json.dumps(arguments or {})  # the Struct alone loses ints
        answer = await self.request_input(request)
        return _approved(answer)

    async def ask_form(
        self, title: str, fields: Iterable[message_types_pb2.FormField]
    ) -> dict[str, Any] | None:
        """Ask a human to fill in a form; the values, or ``None`` when it expired or was withdrawn."""
        request = message_types_pb2.InputRequest(
            kind=message_types_pb2.INPUT_KIND_FORM,
            form=message_types_pb2.Form(title=title, fields=list(fields)),
        )
        answer = await self.request_input(request)
        if answer.state != message_types_pb2.INPUT_STATE_RESOLVED:
            return None
        return exact_json(answer.resolution.values, answer.resolution.values_json)


def _say(update: registry_service_pb2.DispatchUpdate, say: PartLike | Iterable[PartLike]) -> None:
    """The agent's turn, written into ``update`` (no Turn built and copied in)."""
    parts = _parts(say)
    turn = update.turn
    turn.role = message_types_pb2.ROLE_AGENT
    turn.parts.extend(parts)


def _approved(answer: message_types_pb2.InputRequest) -> bool:
    if answer.state != message_types_pb2.INPUT_STATE_RESOLVED:
        return False
    resolution = answer.resolution
    if resolution.decision != message_types_pb2.DECISION_UNSPECIFIED:
        return resolution.decision != message_types_pb2.DECISION_DENY
    return resolution.confirmed


Handler = Callable[[Dispatch, Reply], Awaitable[None]]


class _Renewal:
    """Whether a stream was closed here to renew its token (``ConnectedAgent._renew_when_idle``)."""

    closed = False


class ConnectedAgent:
    """A connected-mode agent process: register, connect, serve dispatches until stopped.

    Args:
        target: The mesh's ``host:port``.
        handler: ``async def handler(dispatch, reply)``, run once per dispatch.
        skills: Declared skills, for routing by skill.
        max_concurrent_sessions: Capacity declared to the mesh (0 = unlimited).
        reconnect_delay_s: Pause before reconnecting after the stream drops.
        verify_dispatches: Ask the mesh to sign every dispatch and refuse any whose token
            does not verify (issuer, audience this instance, expiry, dispatch id). Off by
            default: the agent dialed the mesh, so the stream already says who sends the
            work, and a signature check per dispatch costs CPU.
    """

    def __init__(
        self,
        target: str,
        *,
        client_id: str,
        client_secret: str,
        agent_type: str,
        instance_id: str,
        handler: Handler,
        skills: Iterable[agent_types_pb2.AgentSkill] = (),
        max_concurrent_sessions: int = 0,
        reconnect_delay_s: float = 1.0,
        verify_dispatches: bool = False,
        keep_answered_s: float = 120.0,
    ) -> None:
        self.target = target
        self.instance_id = instance_id
        self._credential = (client_id, client_secret)
        self._agent_type = agent_type
        self._handler = handler
        self._skills = list(skills)
        self._max_sessions = max_concurrent_sessions
        self._reconnect_delay_s = reconnect_delay_s
        self._verify_dispatches = verify_dispatches
        self._keep_answered_s = keep_answered_s
        """How long a handler at work on an answer outlives the stream it came on: the mesh that
        delivered it delivers it again once it is back (a restart), and the handler carries on for
        that dispatch instead of running again; not claimed by then, it is cancelled."""
        self._batch_updates = False
        """Whether the mesh said (in its welcome) that it reads update batches."""
        self._running: dict[str, asyncio.Task[None]] = {}
        self._idle = asyncio.Event()
        """Set when the last running handler ended (``_renew_when_idle`` waits for it)."""
        self._replies: dict[str, Reply] = {}
        self._sequels = _Sequels()
        self._outbox: Mailbox[_Outgoing] = Mailbox()
        """Requests for the stream, and updates (framed together by ``_requests``); ``None`` ends it."""
        self._keys: dict[str, Any] = {}
        self._issuer = ""
        self.connected = asyncio.Event()
        """Set while the stream is open and welcomed."""
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Serve until ``stop``; reconnects (and re-registers) when the stream drops or the mesh restarts."""
        async with aio.insecure_channel(self.target) as channel:
            auth, registry = AuthServiceStub(channel), RegistryServiceStub(channel)
            failures = 0
            while not self._stopping.is_set():
                delay_s = self._reconnect_delay_s
                try:
                    # Every (re)connection starts afresh: a restarted mesh may have forgotten the
                    # registration, rotated its dispatch key, and the old token may have expired.
                    metadata, life_s = await self._register(auth, registry)
                    if await self._serve_stream(registry, metadata, life_s):
                        continue  # renewed before the token expired: a new token and stream now
                except aio.AioRpcError as error:
                    if not self._stopping.is_set():  # else: the call we cancelled to stop
                        _log.warning(
                            "connection to the mesh failed: %s %s", error.code().name, error.details()
                        )
                    # Failing again and again (the mesh away, or refusing): wait longer each time,
                    # up to a minute, spread so a fleet does not come back in step.
                    failures = 0 if self.connected.is_set() else failures + 1
                    backoff_s = min(_MAX_BACKOFF_S, self._reconnect_delay_s * 2 ** max(failures - 1, 0))
                    delay_s = max(delay_s, _pushback_s(error), backoff_s * random.uniform(0.5, 1.0))
                self.connected.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay_s):  # (not wait_for: it can drop a cancel on 3.11)
                        await self._stopping.wait()

    async def _register(
        self, auth: AuthServiceStub, registry: RegistryServiceStub
    ) -> tuple[tuple[tuple[str, str], ...], float]:
        """Sign in and register; the call metadata and the token's life in seconds."""
        client_id, client_secret = self._credential
        token = await auth.GetToken(
            auth_service_pb2.GetTokenRequest(
                client_id=client_id, client_secret=client_secret, agent_type=self._agent_type
            )
        )
        life_s = token.expires_at.ToSeconds() - time.time() if token.HasField("expires_at") else math.inf
        if life_s <= 0:
            life_s = math.inf  # the clocks disagree: the mesh's end of the stream is the renewal then
        metadata = (("authorization", f"Bearer {token.token}"),)
        keys = await auth.GetDispatchKeys(auth_service_pb2.GetDispatchKeysRequest())
        self._issuer = keys.issuer
        jwks = json_format.MessageToDict(keys.jwks)
        self._keys = {k["kid"]: jwt.PyJWK(k).key for k in jwks["keys"]}
        await registry.RegisterAgent(
            registry_service_pb2.RegisterAgentRequest(
                agent_type=self._agent_type,
                instance_id=self.instance_id,
                deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_CONNECTED,
                skills=self._skills,
                max_concurrent_sessions=self._max_sessions,
            ),
            metadata=metadata,
        )
        return metadata, life_s

    async def stop(self) -> None:
        """Stop serving: running handlers are cancelled and the stream closes."""
        self._stopping.set()
        for task in list(self._running.values()):
            task.cancel()

    async def _serve_stream(
        self, registry: RegistryServiceStub, metadata: tuple[tuple[str, str], ...], life_s: float = math.inf
    ) -> bool:
        """Serve one stream until it ends; ``True`` when it was closed here to renew the token
        (the mesh ends a stream when its token expires: renewing while idle loses no work)."""
        hello = registry_service_pb2.ConnectRequest(
            hello=registry_service_pb2.ConnectHello(
                instance_id=self.instance_id,
                dispatch_tokens=self._verify_dispatches,
                dispatch_batches=True,
            )
        )
        self._outbox = Mailbox()  # (lighter than an asyncio.Queue: one reader, ``_requests``)
        self._outbox.put_nowait(hello)
        call = registry.Connect(self._requests(), metadata=metadata)
        stopping = asyncio.create_task(self._cancel_when_stopping(call))
        renewing = _Renewal()
        renewal = asyncio.create_task(self._renew_when_idle(call, life_s, renewing))
        heartbeat: asyncio.Task[None] | None = None
        try:
            # One reader for the stream's life: no task and no wait per frame.
            async for response in call:
                kind = response.WhichOneof("payload")
                if kind == "dispatch":
                    self._start(response.dispatch)
                elif kind == "dispatch_batch":
                    for dispatch in response.dispatch_batch.dispatches:
                        self._start(dispatch)
                elif kind == "welcome":
                    interval = max(response.welcome.heartbeat_interval_ms / 1000, 0.05)
                    heartbeat = asyncio.create_task(self._heartbeats(interval))
                    self._batch_updates = response.welcome.update_batches
                    self.connected.set()
                elif kind == "cancel":
                    task = self._running.get(response.cancel.dispatch_id)
                    if task is not None:
                        task.cancel()
                elif kind == "input_answer":
                    reply = self._replies.get(response.input_answer.dispatch_id)
                    if reply is not None:
                        reply._answer(response.input_answer.request)
        except asyncio.CancelledError:
            # grpc raises this from a call we cancelled (``stop``, or to renew the token); a
            # cancellation of this task itself goes on up.
            current = asyncio.current_task()
            ours = self._stopping.is_set() or renewing.closed
            if not (ours and current is not None and not current.cancelling()):
                raise
        finally:
            self._outbox.put_nowait(None)  # ends the request stream of this connection
            stopping.cancel()
            renewal.cancel()
            if heartbeat is not None:
                heartbeat.cancel()
            self._stream_ended()
        return renewing.closed

    async def _renew_when_idle(self, call: Any, life_s: float, renewing: _Renewal) -> None:
        """From 80% of the token's life on, close the stream at the first moment no handler runs
        (``run`` then connects again with a new token); past its end the mesh closes it anyway."""
        if life_s == math.inf:
            return
        await asyncio.sleep(life_s * 0.8)
        while self._running:
            self._idle.clear()
            await self._idle.wait()
        renewing.closed = True
        call.cancel()

    def _stream_ended(self) -> None:
        """The stream dropped: its handlers are cancelled, except those at work on an answer the
        mesh will deliver again once it is back (``keep_answered_s``; ``_Sequels``) and those
        waiting for an answer the mesh will send with the message (``_answered``)."""
        loop = asyncio.get_running_loop()
        keep = self._keep_answered_s > 0 and not self._stopping.is_set()
        for dispatch_id, task in list(self._running.items()):
            reply = self._replies.get(dispatch_id)
            at_work = reply is not None and (
                self._sequels.running_of(reply) is not None or reply._asking is not None
            )
            if not keep or not at_work:
                task.cancel()
                continue
            assert reply is not None
            loop.call_later(self._keep_answered_s, _cancel_unclaimed, task, reply, dispatch_id)

    async def _cancel_when_stopping(self, call: Any) -> None:
        await self._stopping.wait()
        call.cancel()

    async def _requests(self) -> AsyncIterator[registry_service_pb2.ConnectRequest]:
        """The outbox as frames: updates queued together travel in one frame (a frame costs
        far more than an update in it), other requests each in their own, in order."""
        outbox = self._outbox
        while True:
            queued = [await outbox.get()]
            while not outbox.empty():
                queued.append(outbox.get_nowait())
            updates: list[registry_service_pb2.DispatchUpdate] = []
            last: dict[str, int] = {}  # per dispatch, where its latest update in ``updates`` is
            made: set[int] = set()  # where ``updates`` holds a fold made here (not a handler's own)
            size = 0
            for item in queued:
                if isinstance(item, registry_service_pb2.ConnectRequest) and item.HasField("update"):
                    item = item.update  # an update queued as a request: framed like the others
                if isinstance(item, registry_service_pb2.DispatchUpdate):
                    item_size = item.ByteSize()
                    size += item_size
                    at = last.get(item.dispatch_id)
                    if at is not None and size <= _BATCH_MAX_BYTES:
                        folded = _folded(updates[at], item, at in made)
                        if folded is not None:
                            updates[at] = folded
                            made.add(at)
                            continue
                    full = len(updates) >= _BATCH_MAX or size > _BATCH_MAX_BYTES
                    if updates and (full or not self._batch_updates):
                        yield _update_frame(updates)  # a frame stays well under gRPC's 4 MiB
                        updates, size = [], item_size
                        last.clear()
                        made.clear()
                    last[item.dispatch_id] = len(updates)
                    updates.append(item)
                    continue
                if updates:
                    yield _update_frame(updates)
                    updates, size = [], 0
                    last.clear()
                    made.clear()
                if item is None:
                    return
                yield item
            if updates:
                yield _update_frame(updates)

    async def _heartbeats(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            beat = registry_service_pb2.HeartbeatRequest(
                instance_id=self.instance_id,
                status=agent_types_pb2.AGENT_STATUS_AVAILABLE,
                current_sessions=len(self._running),
            )
            self._outbox.put_nowait(registry_service_pb2.ConnectRequest(heartbeat=beat))

    def _start(self, dispatch: registry_service_pb2.Dispatch) -> None:

        async def send(update: registry_service_pb2.DispatchUpdate) -> None:
            # The stream of the moment: a handler kept across a reconnect sends on the new one.
            self._outbox.put_nowait(update)  # copied once, into its frame

        prefilled = _answers_in(dispatch.message)
        message_id = dispatch.message.message_id
        sequel = self._sequels.find(message_id, prefilled)
        if sequel is not None:
            self._again(dispatch, sequel)
            return
        if prefilled and (asked := self._asked(message_id, prefilled)) is not None:
            self._answered(dispatch, *asked)
            return
        reply = Reply(
            dispatch.dispatch_id, send, prefilled=prefilled, message_id=message_id, _sequels=self._sequels
        )
        task = asyncio.create_task(self._handle(dispatch, reply), name=f"dispatch-{dispatch.dispatch_id}")
        self._running[dispatch.dispatch_id] = task
        self._replies[dispatch.dispatch_id] = reply

        def finished(_: object) -> None:
            self._forget(dispatch.dispatch_id)
            self._sequels.ended(reply, completed=not task.cancelled() and reply.done)

        task.add_done_callback(finished)

    def _forget(self, dispatch_id: str) -> None:
        self._running.pop(dispatch_id, None)
        self._replies.pop(dispatch_id, None)
        if not self._running:
            self._idle.set()

    def _again(self, dispatch: registry_service_pb2.Dispatch, sequel: _Sequel) -> None:
        """An answer the agent already acted on, delivered again (the mesh restarted, or the
        replica running the session died, before it stored what the handler said next): what the
        handler said after it is said again for this dispatch, and a handler still at work goes on
        for it. The work is not done twice."""
        dispatch_id = dispatch.dispatch_id
        if not self._taken(dispatch):
            return
        self._state(dispatch_id, message_types_pb2.MESSAGE_STATE_WORKING)  # acknowledged: delivered
        updates = [_readdressed(update, dispatch_id) for update in sequel.updates]
        if sequel.running is not None:  # still at work: from now on, for this dispatch
            reply, task = sequel.running
            self._forget(reply.dispatch_id)  # a late cancel of the dispatch it replaces is not for it
            reply.dispatch_id = dispatch_id
            sequel.updates[:] = updates
            self._running[dispatch_id] = task
            self._replies[dispatch_id] = reply
            task.add_done_callback(lambda _: self._forget(dispatch_id))
        else:
            _log.info(
                "dispatch %s brings an answer this agent already acted on: its outcome again", dispatch_id
            )
        for update in updates:
            self._outbox.put_nowait(update)

    def _taken(self, dispatch: registry_service_pb2.Dispatch) -> bool:
        """Whether a dispatch that carries an answer again may be taken: its token checked, if
        dispatches are verified (one that fails it is rejected, saying why)."""
        if self._verify_dispatches:
            try:
                self._verify(dispatch)
            except jwt.InvalidTokenError as error:
                reason = f"dispatch token rejected: {error}"
                self._state(dispatch.dispatch_id, message_types_pb2.MESSAGE_STATE_REJECTED, reason)
                return False
        return True

    def _asked(
        self, message_id: str, answers: list[message_types_pb2.InputRequest]
    ) -> tuple[Reply, message_types_pb2.InputRequest] | None:
        """A handler of this message still waiting where it asked what one of ``answers`` answers."""
        for reply in self._replies.values():
            asking = reply._asking
            if reply.message_id != message_id or asking is None:
                continue
            for answer in reversed(answers):  # the latest: what it asked last
                if _answers(answer, asking):
                    return reply, answer
        return None

    def _answered(
        self, dispatch: registry_service_pb2.Dispatch, reply: Reply, answer: message_types_pb2.InputRequest
    ) -> None:
        """The answer to what a handler asked, sent again with its message (the mesh restarted, or
        the replica running the session died, while a human decided): the handler that asked takes
        it where it waits and goes on for this dispatch. What it did before asking is not done twice."""
        dispatch_id = dispatch.dispatch_id
        if not self._taken(dispatch):
            return
        task = self._running.get(reply.dispatch_id)
        if task is None:
            return
        self._state(dispatch_id, message_types_pb2.MESSAGE_STATE_WORKING)  # acknowledged: delivered
        self._forget(reply.dispatch_id)  # a late cancel of the dispatch it replaces is not for it
        reply.dispatch_id = dispatch_id
        self._running[dispatch_id] = task
        self._replies[dispatch_id] = reply
        task.add_done_callback(lambda _: self._forget(dispatch_id))
        reply._answer(answer)

    def _state(self, dispatch_id: str, state: int, reason: str = "") -> None:
        self._outbox.put_nowait(
            registry_service_pb2.DispatchUpdate(dispatch_id=dispatch_id, state=state, reason=reason)  # type: ignore[arg-type]
        )

    async def _handle(self, dispatch: registry_service_pb2.Dispatch, reply: Reply) -> None:
        claims: dict[str, Any] = {}
        if self._verify_dispatches:
            try:
                claims = self._verify(dispatch)
            except jwt.InvalidTokenError as error:
                await reply.reject(f"dispatch token rejected: {error}")
                return
        await reply._update(message_types_pb2.MESSAGE_STATE_WORKING)  # acknowledge: delivered
        if dispatch.trace_context:  # the mesh traces: the handler's spans continue its trace
            otel_context.attach(extracted(dispatch.trace_context))  # this task's only
        try:
            await self._handler(
                Dispatch(dispatch.dispatch_id, dispatch.session_id, dispatch.message, claims), reply
            )
        except asyncio.CancelledError:
            return  # the mesh withdrew it, or we are stopping
        except Exception as error:
            _log.exception("handler failed on dispatch %s", dispatch.dispatch_id)
            if not reply.done:
                await reply.fail(f"{type(error).__name__}: {error}")
            return
        if not reply.done:
            await reply.complete()

    def _verify(self, dispatch: registry_service_pb2.Dispatch) -> dict[str, Any]:
        header = jwt.get_unverified_header(dispatch.dispatch_token)
        key = self._keys.get(header.get("kid", ""))
        if key is None:  # an InvalidTokenError, so the dispatch is rejected, not left unanswered
            raise jwt.InvalidTokenError(
                f"signed with a key this agent does not know ({header.get('kid', '')!r})"
            )
        claims: dict[str, Any] = jwt.decode(
            dispatch.dispatch_token, key, algorithms=["EdDSA"], audience=self.instance_id, issuer=self._issuer
        )
        if claims.get("dispatch_id") != dispatch.dispatch_id:
            raise jwt.InvalidTokenError("token is for another dispatch")
        if claims.get("session_id") != dispatch.session_id:
            raise jwt.InvalidTokenError("token is for another session")
        return claims


@dataclass
class _Sequel:
    """What one handler sent after it got the answer to one request."""

    updates: list[registry_service_pb2.DispatchUpdate] = field(default_factory=list)
    running: tuple[Reply, asyncio.Task[None]] | None = None
    """The handler, while it runs."""
    completed: bool = False
    """It ended with a final state sent (not cancelled half way)."""


class _Sequels:
    """What handlers sent after each answer they got, by (message, request), for the last 256.

    The mesh keeps a message waiting for its human until the agent reports after the answer, so
    a mesh that restarts (or a replica that dies) after delivering an answer but before storing
    what the agent said next delivers the answer again with the message. An agent that already
    acted on it sends what it said then instead of acting twice: the handler that is still at
    work carries on for the new dispatch, and one that finished has its outcome sent again. An
    agent process that itself restarted has nothing kept, and its handler runs again.
    """

    SIZE = 256

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[str, str], _Sequel] = OrderedDict()
        self._by_reply: dict[int, _Sequel] = {}

    def begin(self, message_id: str, request_id: str, reply: Reply) -> _Sequel:
        task = asyncio.current_task()
        sequel = _Sequel(running=(reply, task) if task is not None else None)
        previous = self._by_reply.pop(id(reply), None)
        if previous is not None:
            previous.running = None  # it asked again: that answer's sequel ends with the question
        self._kept[(message_id, request_id)] = sequel
        self._by_reply[id(reply)] = sequel
        while len(self._kept) > self.SIZE:
            self._kept.popitem(last=False)
        return sequel

    def find(self, message_id: str, answers: list[message_types_pb2.InputRequest]) -> _Sequel | None:
        """The sequel of one of ``answers`` that can stand in for running the handler again."""
        for answer in answers:
            sequel = self._kept.get((message_id, answer.request_id))
            if sequel is None:
                continue
            if sequel.running is not None or (sequel.completed and not _asks(sequel.updates)):
                return sequel
        return None

    def running_of(self, reply: Reply) -> _Sequel | None:
        """The sequel ``reply``'s handler is at work on, if any."""
        sequel = self._by_reply.get(id(reply))
        return sequel if sequel is not None and sequel.running is not None else None

    def ended(self, reply: Reply, *, completed: bool) -> None:
        sequel = self._by_reply.pop(id(reply), None)
        if sequel is not None:
            sequel.running = None
            sequel.completed = completed


def _cancel_unclaimed(task: asyncio.Task[None], reply: Reply, dispatch_id: str) -> None:
    """A handler kept across a dropped stream that no dispatch took over meanwhile ends."""
    if reply.dispatch_id == dispatch_id and not task.done():
        task.cancel()


def _answers(answer: message_types_pb2.InputRequest, asked: message_types_pb2.InputRequest) -> bool:
    """Whether ``answer`` (an ended request) answers what was ``asked``."""
    return answer.kind == asked.kind and answer.tool_call.tool_name == asked.tool_call.tool_name


def _asks(updates: list[registry_service_pb2.DispatchUpdate]) -> bool:
    return any(u.state == message_types_pb2.MESSAGE_STATE_INPUT_REQUIRED for u in updates)


def _readdressed(
    update: registry_service_pb2.DispatchUpdate, dispatch_id: str
) -> registry_service_pb2.DispatchUpdate:
    copy = registry_service_pb2.DispatchUpdate()
    copy.CopyFrom(update)
    copy.dispatch_id = dispatch_id
    return copy


_BATCH_MAX = 64
_BATCH_MAX_BYTES = 1 << 20


_PROGRESS_STATES = (
    message_types_pb2.MESSAGE_STATE_UNSPECIFIED,
    message_types_pb2.MESSAGE_STATE_SUBMITTED,
    message_types_pb2.MESSAGE_STATE_WORKING,
)


def _folded(
    previous: registry_service_pb2.DispatchUpdate, update: registry_service_pb2.DispatchUpdate, own: bool
) -> registry_service_pb2.DispatchUpdate | None:
    """``previous`` and ``update`` (the next of the same dispatch, in the same frame) as one update,
    when the mesh would fold them itself (``core.dispatch._connected._merged``): ``previous`` only
    says "working" and carries nothing, or carries only outputs before a bare change of state. The
    mesh then reads one update instead of two (the acknowledgement, the artifact and the completion
    of an echo are one); the same records and events. ``None`` when they stay apart.

    ``own``: ``previous`` is a fold made here, changed in place (a handler's own update, which a
    ``_Sequel`` may keep, is copied first)."""
    if (
        previous.state not in _PROGRESS_STATES
        or previous.HasField("input_request")
        or previous.HasField("turn")
        or (
            previous.artifacts
            and (update.HasField("turn") or update.artifacts or update.HasField("input_request"))
        )
    ):
        return None
    if own:
        folded = previous
    else:
        folded = registry_service_pb2.DispatchUpdate()
        folded.CopyFrom(previous)
    # ``previous`` has no turn and no question: what stays of it is its outputs (and the id).
    folded.ClearField("state")
    folded.ClearField("reason")
    folded.MergeFrom(update)  # its state, turn, reason and question; its outputs after those before
    return folded


def _update_frame(updates: list[registry_service_pb2.DispatchUpdate]) -> registry_service_pb2.ConnectRequest:
    frame = registry_service_pb2.ConnectRequest()
    if len(updates) == 1:
        frame.update.CopyFrom(updates[0])
    else:
        frame.update_batch.updates.extend(updates)
    return frame


_Outgoing: TypeAlias = registry_service_pb2.ConnectRequest | registry_service_pb2.DispatchUpdate | None


_KINDS = {
    "tool_approval": message_types_pb2.INPUT_KIND_TOOL_APPROVAL,
    "form": message_types_pb2.INPUT_KIND_FORM,
    "confirmation": message_types_pb2.INPUT_KIND_CONFIRMATION,
    "plan_approval": message_types_pb2.INPUT_KIND_PLAN_APPROVAL,
}
_STATES = {
    "resolved": message_types_pb2.INPUT_STATE_RESOLVED,
    "expired": message_types_pb2.INPUT_STATE_EXPIRED,
    "canceled": message_types_pb2.INPUT_STATE_CANCELED,
}
_DECISIONS = {
    "approve": message_types_pb2.DECISION_APPROVE,
    "approve_for_session": message_types_pb2.DECISION_APPROVE_FOR_SESSION,
    "approve_always": message_types_pb2.DECISION_APPROVE_ALWAYS,
    "deny": message_types_pb2.DECISION_DENY,
}


def _answers_in(message: message_types_pb2.Message) -> list[message_types_pb2.InputRequest]:
    """The ``{"input_resolution": ...}`` data parts of a resumed dispatch, as InputRequests."""
    answers = []
    for part in message.parts:
        if part.WhichOneof("content") != "data" or "input_resolution" not in part.data:
            continue
        raw = exact_json(part.data, part.data_json)["input_resolution"]
        answer = message_types_pb2.InputRequest(
            request_id=str(raw.get("request_id", "")),
            kind=_KINDS.get(raw.get("kind", ""), message_types_pb2.INPUT_KIND_UNSPECIFIED),
            state=_STATES.get(raw.get("state", ""), message_types_pb2.INPUT_STATE_UNSPECIFIED),
            tool_call=message_types_pb2.ToolCall(tool_name=str(raw.get("tool_name", ""))),
        )
        resolution = answer.resolution
        resolution.decision = _DECISIONS.get(raw.get("decision", ""), message_types_pb2.DECISION_UNSPECIFIED)
        resolution.reason = str(raw.get("reason", ""))
        resolution.confirmed = bool(raw.get("confirmed", False))
        resolution.resolved_by = str(raw.get("resolved_by", ""))
        resolution.values.update(raw.get("values") or {})
        resolution.values_json = _json.dumps(raw.get("values") or {})
        resolution.payload.update(raw.get("payload") or {})
        resolution.payload_json = _json.dumps(raw.get("payload") or {})
        answers.append(answer)
    return answers


def _pushback_s(error: aio.AioRpcError) -> float:
    """The wait the mesh asked for with a refusal (``grpc-retry-pushback-ms``, sent with
    ``RESOURCE_EXHAUSTED`` when sign-ins from here failed too often); 0 when it asked none."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            with contextlib.suppress(ValueError):
                return max(int(str(value)), 0) / 1000
    return 0.0
