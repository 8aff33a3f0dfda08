"""Hosted agents over A2A, with the ``a2a-sdk`` client.

The agent's card (fetched once per URL) says whether to speak JSON-RPC or gRPC.
An agent that needs a human answers ``input-required``; a data part
``{"input_request": {...}}`` in its status message says what it needs (see
``core.inputs.asks``; without one it is a free-text question). The human's answer
goes back on the same task as ``{"input_resolution": {...}}``; an agent that lost that task
(it restarted with its tasks in memory: "task not found") gets the request and the answers
again as a new task in the same context, so an answer the mesh acknowledged is never dropped.
Each dispatch streams (``message/stream``), so progress, turns and artifacts
reach the session as they happen. The A2A context id is the session id, so an
agent shared by many sessions keeps their conversations apart. The dispatch
token travels as ``Authorization: Bearer <token>``, signed afresh for each call (the
answer to a human's question may come long after the first token expired).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, NamedTuple, cast

import aiohttp
import grpc
import httpx
from a2a.client import (
    A2ACardResolver,
    A2AClientError,
    A2AClientTimeoutError,
    AgentCardResolutionError,
    Client,
    ClientCallContext,
    ClientConfig,
    ClientFactory,
)
from a2a.client.card_resolver import parse_agent_card
from a2a.types import AgentCard, CancelTaskRequest, SendMessageRequest, StreamResponse
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH, TransportProtocol
from a2a.utils.errors import A2AError, TaskNotFoundError
from google.protobuf import json_format

from svantic_grpc.core.dispatch import (
    DispatchFailed,
    DispatchJob,
    DispatchUpdate,
    NotDelivered,
    fold,
    input_outcome,
)
from svantic_grpc.core.inputs.asks import parse_ask, resolution_json
from svantic_grpc.core.inputs.model import InputRequest
from svantic_grpc.core.messages.model import MessageState, Part, Role
from svantic_grpc.core.models import AgentRegistration
from svantic_grpc.dispatch._aiohttp import AgentHttpClient
from svantic_grpc.dispatch._events import Seen, seen_in, seen_in_json
from svantic_grpc.dispatch._jsonrpc import JsonRpcProducer, StreamingJsonRpcTransport, close_left
from svantic_grpc.dispatch._protojson import parse

__all__ = ["A2ATransport"]

_log = logging.getLogger(__name__)

_PROGRESS = (None, MessageState.SUBMITTED, MessageState.WORKING)
_ENDS = {MessageState.COMPLETED, MessageState.FAILED, MessageState.CANCELED, MessageState.REJECTED}
_BINDINGS: dict[str, str] = {
    TransportProtocol.JSONRPC: "a2a-jsonrpc",
    TransportProtocol.GRPC: "a2a-grpc",
    TransportProtocol.HTTP_JSON: "a2a-rest",
}
"""The A2A bindings the mesh speaks, in its order of preference, and their names in GetAgent."""
_DRAIN_S = 0.5
"""How long the end of a stream read through a2a-sdk's ``Client`` may take to come after the
agent's final update."""


class A2ATransport:
    """Dispatches to hosted agents; one HTTP connection pool and one client per agent URL.

    Args:
        connect_timeout_s: How long to wait for a connection (a refused or
            silent agent is then "not delivered" and may fail over).
        read_timeout_s: Longest silence on a stream before giving up.
        probe_timeout_s: How long a liveness probe (``probe``) may take in all.
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 300.0,
        probe_timeout_s: float = 5.0,
    ) -> None:
        self._probe_timeout = httpx.Timeout(probe_timeout_s)
        # aiohttp carries the bytes: far less CPU per call than httpx's own stack.
        self._http = AgentHttpClient(
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            # An idle connection goes after 2 s, before the agent's server closes it (uvicorn: 5 s,
            # httpx's own default too): a call reusing one just as the agent closed it failed with
            # "Server disconnected" as a failed dispatch.
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=2.0),
        )
        self._factory = ClientFactory(
            ClientConfig(
                streaming=True,
                httpx_client=self._http,
                supported_protocol_bindings=list(_BINDINGS),
                grpc_channel_factory=grpc.aio.insecure_channel,
            )
        )
        # The streaming call of JSON-RPC agents (every hosted message) over aiohttp directly.
        stream_timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._jsonrpc = JsonRpcProducer(self._http, self._http.session, stream_timeout)
        self._factory.register(TransportProtocol.JSONRPC, self._jsonrpc)
        self._clients: dict[str, _Agent] = {}
        self._protocols: dict[str, str] = {}
        """Per agent URL: the binding of its client (kept when the client is dropped, until the next)."""
        self._lock = asyncio.Lock()
        self._stopping = False
        """The server is stopping (``begin_stop``): a task left here is left to the restart."""

    def protocol_for(self, agent: AgentRegistration) -> str:
        """``a2a-jsonrpc`` or ``a2a-grpc``: what the mesh speaks with the card read from the agent's URL,
        or, before it has read it, what the card given at registration prefers; '' when neither says."""
        protocol = self._protocols.get(agent.url)
        if protocol is None and agent.agent_card:
            try:
                protocol = _protocol_of(parse_agent_card(json.loads(json.dumps(agent.agent_card))))
            except Exception:  # a registered card is the caller's JSON: GetAgent answers whatever it holds
                protocol = None  # the card served at the URL decides at the first call
        return protocol or ""

    async def _client(self, url: str) -> _Agent:
        agent = self._clients.get(url)
        if agent is not None:
            return agent
        async with self._lock:
            agent = self._clients.get(url)
            if agent is None:
                try:
                    card = await A2ACardResolver(self._http, url).get_agent_card()
                    self._jsonrpc.take()
                    client = self._factory.create(card)
                except (AgentCardResolutionError, A2AClientError, httpx.HTTPError) as exc:
                    # What failed stays in the log: told to whoever registered the URL, "refused",
                    # "HTTP 500" or "not JSON" would map the mesh's network for them.
                    _log.warning("cannot read the agent card at %s: %s", url, exc)
                    raise NotDelivered(f"cannot read an A2A agent card at {url}") from exc
                except ValueError as exc:  # the card offers no binding the mesh speaks
                    raise NotDelivered(f"cannot use the agent card at {url}: {exc}") from exc
                agent = self._clients[url] = _Agent(client, self._jsonrpc.take())
                self._protocols[url] = _protocol_of(card) or ""
            return agent

    async def dispatch(self, job: DispatchJob) -> AsyncGenerator[DispatchUpdate, InputRequest | None]:
        client, direct = await self._client(job.agent.url)
        message = _to_a2a_message(job)
        task_id = ""
        if job.resume_task_id and job.answer is not None:
            task_id = job.resume_task_id  # the agent still waits on its task: answer it there
            message = _answer_message(job, task_id, job.answer)
        answers: list[InputRequest] = []
        """The human answers given on the agent's task in this dispatch (``job.answer`` is in
        ``job.message`` already): a fresh task carries them if the agent lost that one."""
        delivered = False
        ended = False
        try:
            while True:  # one A2A call per turn: the first, then one per human answer
                answer: InputRequest | None = None
                # A fresh token per call: an answer may come long after the first token expired.
                headers = _headers(job)
                params = {"message": message, "configuration": _NO_HISTORY}
                call: AsyncIterator[Any]
                if direct is not None:  # the JSON-RPC streaming call without the Client around it
                    call = direct.results(params, headers=headers)
                else:
                    context = ClientCallContext(service_parameters=headers)
                    call = client.send_message(parse(params, SendMessageRequest), context=context)
                first = True
                asked = False
                try:
                    async with contextlib.aclosing(cast("AsyncGenerator[Any, None]", call)) as stream:
                        async for read in stream:  # the mesh's own call: a list per read; else one event
                            delivered = True
                            updates: list[DispatchUpdate] = []
                            for event in read if direct is not None else (read,):
                                seen = _seen(event) if direct is not None else seen_in(event)
                                if first and "taskId" in message and _still_asking(seen):
                                    first = False
                                    continue  # the task as it stood when the answer went out: no new question
                                first = False
                                update, task_id = _update_from(seen, task_id)
                                if update is None:
                                    continue
                                # Updates read together are written together where they fold.
                                folded = fold(updates[-1], update) if updates else None
                                if folded is not None:
                                    updates[-1] = folded
                                else:
                                    updates.append(update)
                                if update.state not in _PROGRESS:
                                    break  # the caller stops reading here (a final state, a question)
                            for update in updates:
                                if update.state is MessageState.INPUT_REQUIRED:
                                    asked = True
                                    answer = yield update
                                    break
                                # Mark the end before yielding: the caller stops reading after a final update.
                                ended = update.state in _ENDS
                                if ended and direct is None:
                                    await _drain(stream)
                                # The mesh's own call does not wait for the stream's end: closed here, it
                                # leaves the rest to arrive and the connection goes back to the pool then.
                                yield update
                                if ended:
                                    return
                            if asked:
                                break
                except TaskNotFoundError:
                    if not ("taskId" in message and first):
                        raise
                    # The agent no longer has the task that asked (it restarted with its tasks in
                    # memory): the human's answer must still reach it, so the request and the
                    # answers go again as a new task in the same context.
                    _log.warning(
                        "%s instance %r lost its task %s: sending the request and the answer as a new task",
                        job.agent.agent_type,
                        job.agent.instance_id,
                        message["taskId"],
                        extra={"dispatch_id": job.dispatch_id, "instance_id": job.agent.instance_id},
                    )
                    task_id = ""
                    message = _afresh(job, answers)
                    continue
                if answer is None:
                    break
                answers.append(answer)
                message = _answer_message(job, task_id, answer)
        except A2AClientTimeoutError as exc:
            if not delivered and _never_sent(exc.__cause__):  # it timed out connecting
                self._clients.pop(job.agent.url, None)
                _log.warning("cannot reach the agent at %s: %s", job.agent.url, exc)
                raise NotDelivered("cannot reach the agent") from exc
            raise DispatchFailed(f"the agent went silent: {exc}") from exc
        except A2AClientError as exc:
            if not delivered and _never_sent(exc.__cause__):
                self._clients.pop(job.agent.url, None)  # the agent may come back elsewhere
                _log.warning("cannot reach the agent at %s: %s", job.agent.url, exc)
                raise NotDelivered("cannot reach the agent") from exc
            cause = exc.__cause__
            if isinstance(cause, grpc.aio.AioRpcError):
                raise DispatchFailed(f"the agent answered with an error: {cause.details()}") from exc
            raise DispatchFailed(str(exc)) from exc
        except A2AError as exc:
            detail = getattr(exc, "message", "") or exc
            raise DispatchFailed(f"the agent answered with an error: {detail}") from exc
        except (ValueError, json_format.ParseError) as exc:  # what a2a-sdk's parse of the agent's JSON raises
            said = str(exc).encode("utf-8", "backslashreplace").decode()  # (it may quote a lone surrogate)
            raise DispatchFailed(f"the agent sent a response the mesh cannot read: {said}") from exc
        finally:
            if task_id and not ended and not self._stopping:
                context = ClientCallContext(service_parameters=_headers(job))
                await _cancel_quietly(client, task_id, context)
        if not ended:
            raise DispatchFailed("the agent closed the stream without a final state")

    async def probe(self, agent: AgentRegistration) -> None:
        """GET the agent's card: a light sign of life from an agent that cannot heartbeat.

        Raises:
            httpx.HTTPError: the agent did not answer, or not with its card.
        """
        url = f"{agent.url.rstrip('/')}/{AGENT_CARD_WELL_KNOWN_PATH.lstrip('/')}"
        response = await self._http.get(url, timeout=self._probe_timeout)
        response.raise_for_status()

    def begin_stop(self) -> None:
        self._stopping = True

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for agent in clients.values():
            with contextlib.suppress(Exception):
                await agent.client.close()
        close_left()  # streams still ending by themselves: their connections go with the pool
        await self._http.aclose()


class _Agent(NamedTuple):
    """What the mesh calls an agent URL with."""

    client: Client
    direct: StreamingJsonRpcTransport | None
    """The client's own JSON-RPC transport when the mesh may call its streaming call directly."""


_NO_HISTORY = {"historyLength": 0}
"""The mesh keeps the conversation itself: the agent need not send the task's history back."""


def _headers(job: DispatchJob) -> dict[str, str]:
    """The headers of one call: a dispatch token signed now, so it is valid when the call goes
    out, and the dispatch's W3C trace headers (``traceparent``) when traced."""
    return {**job.trace_context, "Authorization": f"Bearer {job.sign()}"}


def _protocol_of(card: AgentCard) -> str | None:
    """The binding ``ClientFactory`` picks for ``card``: its first listed interface the mesh speaks."""
    for interface in card.supported_interfaces:
        protocol = _BINDINGS.get(interface.protocol_binding)
        if protocol is not None:
            return protocol
    return None


def _never_sent(cause: BaseException | None) -> bool:
    """Whether a failed call cannot have reached the agent, so another instance may take the work.

    Only a connection that was never made counts: once a request may have gone out (an error
    status, a read failing half-way), the agent may have started, and failing over could do
    the work twice.
    """
    if isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True
    if isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return True  # the streaming call over aiohttp (``_jsonrpc``): refused, unreachable, timed out
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() == grpc.StatusCode.UNAVAILABLE


async def _drain(stream: AsyncGenerator[Any, None]) -> None:
    """Read what follows a final update up to the stream's end (an A2A server ends it there), so
    the HTTP response is read whole and its connection goes back to the pool for the next call
    instead of being closed; an agent that keeps the stream open past ``_DRAIN_S`` loses it."""
    with contextlib.suppress(Exception, TimeoutError):
        async with asyncio.timeout(_DRAIN_S):
            async for _ in stream:
                pass


async def _cancel_quietly(client: Client, task_id: str, context: ClientCallContext) -> None:
    """Best effort: tell the agent to stop a task the mesh no longer follows."""
    try:
        async with asyncio.timeout(2.0):
            await client.cancel_task(CancelTaskRequest(id=task_id), context=context)
    except (Exception, TimeoutError) as exc:  # the message is already ending; this is courtesy
        _log.debug("cancel of A2A task %s failed: %s", task_id, exc)


def _still_asking(seen: Seen) -> bool:
    """Whether the first event of a turn that answers the agent is the task as it stood before the
    answer: an A2A 1.0 server begins every stream with the task (``@a2a-js/sdk`` insists on it),
    and until the agent has read the answer that task still says input-required. Taken as a new
    question, the mesh would ask the human the same thing again, for ever."""
    return seen.kind == "task" and seen.state is MessageState.INPUT_REQUIRED


def _seen(result: Any) -> Seen:
    """What the mesh's own streaming call's ``result`` says: read straight from its JSON, or,
    when it is unusual, through a2a-sdk's parser (which raises what a2a-sdk raises)."""
    seen = seen_in_json(result)
    return seen if seen is not None else seen_in(parse(result, StreamResponse))


def _update_from(seen: Seen, task_id: str) -> tuple[DispatchUpdate | None, str]:
    """The update an A2A event says (its ``task_ref`` the agent's task id), and that task id."""
    kind = seen.kind
    if task_id and seen.task_id and seen.task_id != task_id:
        return (
            None,
            task_id,
        )  # about another task of the agent's: not this dispatch's (as A2A clients drop it)
    if kind == "message":  # a direct reply: the whole answer
        return DispatchUpdate(MessageState.COMPLETED, seen.said, task_ref=task_id), task_id
    if kind == "task" or kind == "status":
        state, said = seen.state, seen.said
        ask = parse_ask(said) if state is MessageState.INPUT_REQUIRED else None
        task_id = seen.task_id if kind == "task" else seen.task_id or task_id
        return DispatchUpdate(state, said, seen.artifacts, _reason(state, said), ask, task_id), task_id
    if kind == "artifact":
        return DispatchUpdate(artifacts=seen.artifacts, task_ref=task_id), task_id
    return None, task_id


def _reason(state: MessageState | None, said: tuple[Part, ...]) -> str:
    if state in (
        MessageState.FAILED,
        MessageState.REJECTED,
        MessageState.CANCELED,
        MessageState.INPUT_REQUIRED,
    ):
        return " ".join(p.text for p in said if p.text) or f"the agent reported {state.value}"
    return ""


def _to_a2a_message(job: DispatchJob) -> dict[str, Any]:
    """The A2A message for the job, as ProtoJSON: what the agent receives, built as JSON."""
    message = job.message
    return {
        "messageId": job.dispatch_id,
        "contextId": job.session_id,
        "role": "ROLE_USER" if message.role is Role.USER else "ROLE_AGENT",
        "parts": [_to_a2a_part(p) for p in message.parts],
        "metadata": {"svantic": {"session_id": job.session_id, "message_id": message.message_id}},
    }


def _answer_message(job: DispatchJob, task_id: str, request: InputRequest) -> dict[str, Any]:
    """The human's answer, sent on the agent's task: a text line and ``{"input_resolution": ...}``."""
    resolution = request.resolution
    answer = resolution_json(request)
    text = f"{request.summary}: {input_outcome(request).verdict}"
    if resolution is not None:
        if resolution.reason:
            text += f" ({resolution.reason})"
        if isinstance(resolution.values.get("answer"), str):
            text = resolution.values["answer"]  # the human's reply to the agent's question, as is
    message = {
        "messageId": f"{job.dispatch_id}-{request.request_id}",
        "contextId": job.session_id,
        "role": "ROLE_USER",
        "parts": [{"text": text}, {"data": {"input_resolution": answer}}],
    }
    if task_id:
        message["taskId"] = task_id
    return message


def _afresh(job: DispatchJob, answers: list[InputRequest]) -> dict[str, Any]:
    """The dispatch's request as a new task, for an agent that lost the one it asked on: the
    message as first sent, then each answer given since as ``_answer_message`` words it."""
    message = _to_a2a_message(job)
    message["messageId"] = f"{job.dispatch_id}-afresh-{len(answers)}"
    for answer in answers:
        message["parts"] += _answer_message(job, "", answer)["parts"]
    return message


def _to_a2a_part(part: Part) -> dict[str, Any]:
    """A part as A2A ProtoJSON (``Part``): text, data (any JSON value), file bytes (base64) or URL."""
    if part.text is not None:
        return {"text": part.text}
    if part.data is not None:
        return {"data": part.data}
    file = part.file
    assert file is not None
    if file.data is not None:
        json_part = {"raw": base64.b64encode(file.data).decode("ascii")}
    else:
        json_part = {"url": file.uri or ""}
    if file.media_type:
        json_part["mediaType"] = file.media_type
    if file.name:
        json_part["filename"] = file.name
    return json_part
