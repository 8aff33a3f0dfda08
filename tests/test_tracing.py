"""Traces: the client's trace continues through the mesh's RPC span and the dispatch to a hosted
agent (which receives the ``traceparent``); streaming RPCs and health ``Watch`` still work traced.
Spans are collected in memory with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import os
import pickle
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from a2a.client import ClientCallContext
from a2a.helpers import new_data_part
from a2a.types import Message, Part, Role, SendMessageRequest, TaskState
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

from svantic_grpc._span_export import ChildExporter, Rebuilder
from svantic_grpc._spans import TupleTracerProvider
from svantic_grpc.config import parse_settings
from svantic_grpc.connected_agent import Dispatch, Reply
from svantic_grpc.pb import message_service_pb2, message_types_pb2, session_service_pb2
from svantic_grpc.server import MeshServer
from svantic_grpc.tracing import provider_from_env
from tests._support import SIGNING_ENV, Client, running_server, tenant_settings
from tests.a2a_ingress_support import a2a_client
from tests.agents_a2a import HostedAgent, hosted_agents
from tests.agents_connected import WAIT, data, running_agent, wait_for_state
from tests.agents_connected import new_session as connected_session
from tests.agents_connected import send as connected_send
from tests.agents_inputs import HostedInputAgent, artifact_texts, hosted_input_agents, pending, resolution
from tests.api.test_messages_hosted import new_session, register, target, text

COMPLETED = message_types_pb2.MESSAGE_STATE_COMPLETED
INPUT_REQUIRED = message_types_pb2.MESSAGE_STATE_INPUT_REQUIRED
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class _Collected(ChildExporter):
    """The server's own provider's batches rebuilt in memory, as its exporting child rebuilds them."""

    def __init__(self) -> None:
        super().__init__()
        self.provider: TupleTracerProvider | None = None
        self._rebuilder = Rebuilder()
        self._spans: list[ReadableSpan] = []

    def send(self, new: list[tuple[int, str, Any]], spans: list[tuple[Any, ...]]) -> bool:
        self._spans += self._rebuilder.spans(new, pickle.loads(pickle.dumps(spans)))
        return True

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True

    def shutdown(self) -> None:
        pass

    def get_finished_spans(self) -> tuple[ReadableSpan, ...]:
        assert self.provider is not None
        self.provider.force_flush()
        return tuple(self._spans)


@pytest.fixture(params=["sdk", "own"])
def provider_kind(request: pytest.FixtureRequest) -> str:
    """Each test twice: with an SDK provider handed to the server (its in-memory exporter), and with
    the provider the server makes itself when ``OTEL_*`` asks (``_spans``), its batches collected."""
    return str(request.param)


@asynccontextmanager
async def traced_server(kind: str = "sdk") -> AsyncIterator[tuple[Client, InMemorySpanExporter | _Collected]]:
    exporter: InMemorySpanExporter | _Collected
    provider: TracerProvider | TupleTracerProvider
    if kind == "sdk":
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        exporter = _Collected()
        provider = exporter.provider = TupleTracerProvider(Resource.create({}), {}, exporter)
    settings = parse_settings(
        {
            "grpc_address": "127.0.0.1:0",
            "http_address": "127.0.0.1:0",
            "tenants": tenant_settings(),
            "shutdown_grace_s": 0,
        }
    )
    server = MeshServer(settings, env=SIGNING_ENV, tracer_provider=provider)
    async with server, aio.insecure_channel(server.target) as channel:
        yield Client(server, channel), exporter
    provider.shutdown()


async def test_one_trace_spans_the_clients_call_the_mesh_and_the_hosted_agent(provider_kind: str) -> None:
    async with (
        traced_server(provider_kind) as (client, exporter),
        hosted_agents(client.channel, HostedAgent("echo", "echo-1")) as agents,
    ):
        echo = agents["echo-1"]
        await register(client, echo)
        session_id = await new_session(client)
        traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
        request = message_service_pb2.SendMessageRequest(
            session_id=session_id,
            message=message_service_pb2.OutgoingMessage(parts=[text("hi"), target("echo-agent")]),
        )
        metadata = (*await client.md(), ("traceparent", traceparent))
        await client.messages.SendMessage(request, metadata=metadata, timeout=WAIT)

    spans = exporter.get_finished_spans()
    [rpc] = [s for s in spans if s.name == "/svantic.v1.MessageService/SendMessage"]
    assert rpc.kind is SpanKind.SERVER
    assert format(rpc.context.trace_id, "032x") == TRACE_ID
    assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == CLIENT_SPAN
    assert rpc.attributes is not None and rpc.attributes["rpc.grpc.status_code"] == "OK"
    [dispatch] = [s for s in spans if s.name == "dispatch echo-agent"]
    assert dispatch.kind is SpanKind.CLIENT
    assert dispatch.context.trace_id == rpc.context.trace_id
    assert dispatch.parent is not None and dispatch.parent.span_id == rpc.context.span_id
    [seen] = echo.seen
    assert seen.traceparent == f"00-{TRACE_ID}-{format(dispatch.context.span_id, '016x')}-01"


async def test_a_failed_call_s_span_carries_its_status_code(provider_kind: str) -> None:
    async with traced_server(provider_kind) as (client, exporter):
        with pytest.raises(aio.AioRpcError) as failed:
            await client.sessions.GetSession(
                session_service_pb2.GetSessionRequest(session_id="ses_missing"), metadata=await client.md()
            )
        assert failed.value.code() is grpc.StatusCode.NOT_FOUND
    [rpc] = [s for s in exporter.get_finished_spans() if s.name == "/svantic.v1.SessionService/GetSession"]
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.grpc.status_code"] == "NOT_FOUND"
    assert rpc.attributes["rpc.method"] == "svantic.v1.SessionService/GetSession"
    assert rpc.status.status_code is StatusCode.ERROR


async def test_a_connected_agents_handler_continues_the_trace_of_its_dispatch(provider_kind: str) -> None:
    seen: list[SpanContext] = []

    async def handler(dispatch: Dispatch, reply: Reply) -> None:
        seen.append(trace.get_current_span().get_span_context())
        await reply.complete()

    async with traced_server(provider_kind) as (client, exporter), running_agent(client, handler):
        session_id = await connected_session(client)
        metadata = (*await client.md(), ("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        await connected_send(client, session_id, "hi", data({"target_agent": "echo"}), md=metadata)

    [dispatch] = [s for s in exporter.get_finished_spans() if s.name == "dispatch echo"]
    assert format(dispatch.context.trace_id, "032x") == TRACE_ID
    [context] = seen
    assert (context.trace_id, context.span_id) == (dispatch.context.trace_id, dispatch.context.span_id)


async def test_streaming_rpcs_and_health_watch_work_with_tracing_on(provider_kind: str) -> None:
    async with traced_server(provider_kind) as (client, exporter):
        health = health_pb2_grpc.HealthStub(client.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await asyncio.wait_for(watch.read(), WAIT)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()

        session_id = await new_session(client)
        events = client.sessions.WatchSession(
            session_service_pb2.WatchSessionRequest(session_id=session_id), metadata=await client.md()
        )
        await client.sessions.CloseSession(
            session_service_pb2.CloseSessionRequest(session_id=session_id), metadata=await client.md()
        )
        got = [event async for event in events]
        assert got, "WatchSession yielded nothing"
    names = {s.name for s in exporter.get_finished_spans()}
    assert {"/grpc.health.v1.Health/Watch", "/svantic.v1.SessionService/WatchSession"} <= names


def test_tracing_is_off_unless_the_environment_asks() -> None:
    assert provider_from_env({}) is None
    assert provider_from_env({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"}) is None
    assert provider_from_env({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}) is None
    provider = provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert provider is not None
    provider.shutdown()


async def test_health_watch_works_with_metrics_on_and_tracing_off() -> None:
    # grpc's health Watch sends with context.write(): the interceptor must wrap it as a coroutine,
    # not iterate it (that made every Watch end INTERNAL).
    async with running_server() as client:
        watch = health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await asyncio.wait_for(watch.read(), WAIT)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        assert client.server.metrics is not None


HUMAN_TRACE = "0af7651916cd43dd8448eb211c80319c"
HUMAN_SPAN = "b7ad6b7169203331"


async def test_the_human_answer_reads_in_the_trace_of_the_message_it_answers(provider_kind: str) -> None:
    # client -> mesh -> hosted agent (asks) -> mesh -> human (ResolveInput, from another trace) -> agent
    async with (
        traced_server(provider_kind) as (client, exporter),
        hosted_input_agents(client.channel, HostedInputAgent("ask-h", agent_type="hosted-ask")) as hosted,
    ):
        agent = hosted["ask-h"]
        await client.registry.RegisterAgent(agent.registration(), metadata=await client.md(), timeout=WAIT)
        session_id = await connected_session(client)
        metadata = (*await client.md(), ("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        asked = await connected_send(
            client, session_id, "hello", data({"target_agent": "hosted-ask"}), md=metadata
        )
        assert asked.state == INPUT_REQUIRED, asked.state_reason
        [question] = (await pending(client, session_id)).requests
        human = (*await client.md(), ("traceparent", f"00-{HUMAN_TRACE}-{HUMAN_SPAN}-01"))
        await client.messages.ResolveInput(
            message_service_pb2.ResolveInputRequest(
                request_id=question.request_id, resolution=resolution(values={"answer": "Ada"})
            ),
            metadata=human,
            timeout=WAIT,
        )
        done = await wait_for_state(client, session_id, asked.message_id, COMPLETED)
        assert artifact_texts(done) == ["Nice to meet you, Ada"]

    spans = exporter.get_finished_spans()
    [dispatch] = [s for s in spans if s.name == "dispatch hosted-ask"]
    [raised] = [s for s in spans if s.name == "input form"]
    [answered] = [s for s in spans if s.name == "resolve grpc"]
    [rpc] = [s for s in spans if s.name == "/svantic.v1.MessageService/ResolveInput"]
    assert format(dispatch.context.trace_id, "032x") == TRACE_ID
    # The request is the dispatch's child, open from the question until the answer.
    assert raised.context.trace_id == dispatch.context.trace_id
    assert raised.parent is not None and raised.parent.span_id == dispatch.context.span_id
    assert raised.attributes is not None
    assert raised.attributes["svantic.request_id"] == question.request_id
    assert (raised.attributes["svantic.outcome"], raised.attributes["svantic.surface"]) == (
        "resolved",
        "grpc",
    )
    # The answer is the request's child, linked to the human's own call (another trace).
    assert answered.context.trace_id == dispatch.context.trace_id
    assert answered.parent is not None and answered.parent.span_id == raised.context.span_id
    assert [link.context.span_id for link in answered.links] == [rpc.context.span_id]
    assert format(rpc.context.trace_id, "032x") == HUMAN_TRACE
    # Both turns reached the agent inside the dispatch's span: the answer too.
    expected = f"00-{TRACE_ID}-{format(dispatch.context.span_id, '016x')}-01"
    assert agent.traceparents == [expected, expected]


async def test_an_a2a_clients_traceparent_header_is_the_parent_of_the_mesh_spans(provider_kind: str) -> None:
    async def echo(dispatch: Dispatch, reply: Reply) -> None:
        await reply.artifact(f"echo: {dispatch.text}", name="echo")
        await reply.complete()

    async with traced_server(provider_kind) as (client, exporter), running_agent(client, echo):
        session_id = await connected_session(client)
        token = await client.token("acme-full")
        context = ClientCallContext(
            service_parameters={
                "Authorization": f"Bearer {token}",
                "traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01",
            },
            timeout=WAIT,
        )
        message = Message(
            message_id="m-traced",
            role=Role.ROLE_USER,
            parts=[Part(text="hi"), new_data_part({"target_agent": "echo"})],
            context_id=session_id,
        )
        async with a2a_client(client.server.http.url, streaming=False) as a2a:
            [response] = [
                e async for e in a2a.send_message(SendMessageRequest(message=message), context=context)
            ]
        assert response.task.status.state == TaskState.TASK_STATE_COMPLETED

    spans = exporter.get_finished_spans()
    [http] = [s for s in spans if s.kind is SpanKind.SERVER and s.name.startswith("POST")]
    assert format(http.context.trace_id, "032x") == TRACE_ID
    assert http.parent is not None and format(http.parent.span_id, "016x") == CLIENT_SPAN
    [dispatch] = [s for s in spans if s.name == "dispatch echo"]
    assert dispatch.context.trace_id == http.context.trace_id
    # Probes are not traced.
    async with traced_server(provider_kind) as (client, exporter):
        async with httpx.AsyncClient() as http_client:
            assert (await http_client.get(f"{client.server.http.url}/healthz")).status_code == 200
        assert exporter.get_finished_spans() == ()


@contextmanager
def otlp_sink() -> Iterator[tuple[str, list[bytes]]]:
    """An OTLP/HTTP collector on loopback that keeps each export's body."""
    bodies: list[bytes] = []

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers.get("content-length") or 0)))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children() -> set[int]:
    """This process's child processes, from /proc."""
    tasks = Path(f"/proc/{os.getpid()}/task")
    return {int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()}


async def test_spans_reach_the_otlp_endpoint_and_the_exporting_child_stops_with_the_server() -> None:
    before = _children()
    with otlp_sink() as (endpoint, bodies):
        env = {**SIGNING_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_SERVICE_NAME": "mesh-under-test"}
        async with running_server(env=env) as client:
            metadata = (*await client.md(), ("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"))
            await client.sessions.InitSession(session_service_pb2.InitSessionRequest(), metadata=metadata)
        # Stopping the server flushed the batch to the exporting child, which sent it and ended.
        assert _children() == before
    spans = []
    for body in bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}[
                "service.name"
            ]
            for scope_spans in resource_spans.scope_spans:
                spans += [(service, scope_spans.scope.name, span) for span in scope_spans.spans]
    [(service, scope, rpc)] = [s for s in spans if s[2].name == "/svantic.v1.SessionService/InitSession"]
    assert (service, scope) == ("mesh-under-test", "svantic_grpc")
    assert (rpc.trace_id.hex(), rpc.parent_span_id.hex()) == (TRACE_ID, CLIENT_SPAN)
    assert rpc.kind == rpc.SPAN_KIND_SERVER and rpc.end_time_unix_nano >= rpc.start_time_unix_nano > 0
    attributes = {a.key: a.value.string_value for a in rpc.attributes}
    assert attributes["rpc.method"] == "svantic.v1.SessionService/InitSession"


def test_a_lagging_exporting_child_costs_dropped_spans_never_a_blocked_export() -> None:
    # A child that never reads: the pipe fills, then every batch is dropped and counted at once.
    exporter = ChildExporter(command=[sys.executable, "-c", "import time; time.sleep(60)"])
    provider = TracerProvider()
    spans = []
    for n in range(200):
        with provider.get_tracer("t").start_as_current_span(
            f"span {n}", attributes={"pad": f"{n:4}" * 1000}
        ) as s:
            pass
        spans.append(s)
    try:
        sent = [exporter.export(spans) for _ in range(30)]  # ~24 MB against a pipe of ~1 MB
        assert sent[0] is SpanExportResult.SUCCESS
        assert SpanExportResult.FAILURE in sent
        assert exporter.dropped_spans == 200 * sent.count(SpanExportResult.FAILURE) > 0
    finally:
        pid = exporter.pid
        exporter.shutdown()  # the child never reads: killed after the grace
    assert pid is not None and not _alive(pid)


async def test_the_servers_own_spans_follow_the_callers_sampling_decision(provider_kind: str) -> None:
    # parentbased_always_on (the default): a caller that did not sample its call gets no span of
    # it, nor of the dispatch it starts; the agent still gets the trace, marked not sampled.
    seen: list[SpanContext] = []

    async def handler(dispatch: Dispatch, reply: Reply) -> None:
        seen.append(trace.get_current_span().get_span_context())
        await reply.complete()

    async with traced_server(provider_kind) as (client, exporter), running_agent(client, handler):
        session_id = await connected_session(client)
        metadata = (*await client.md(), ("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-00"))
        await connected_send(client, session_id, "hi", data({"target_agent": "echo"}), md=metadata)
        spans = exporter.get_finished_spans()
    assert spans and not [s for s in spans if format(s.context.trace_id, "032x") == TRACE_ID]
    [context] = seen
    assert format(context.trace_id, "032x") == TRACE_ID and not context.trace_flags.sampled


def test_a_span_whose_batch_cannot_be_handed_over_costs_that_batch_only() -> None:
    # An attribute value pickle cannot carry (a lock) loses its own batch, counted; the next one goes.
    delivered: list[int] = []

    class Pipe(ChildExporter):
        def _start(self) -> None:
            self._fd = os.open(os.devnull, os.O_WRONLY)

        def _write(self) -> None:
            delivered.append(len(self._pending))
            self._pending = memoryview(b"")

    exporter = Pipe()
    provider = TupleTracerProvider(Resource.create({}), {}, exporter)
    tracer = provider.get_tracer("t")
    tracer.start_span("bad", attributes={"lock": threading.Lock()}).end()  # type: ignore[dict-item]
    provider.force_flush()
    tracer.start_span("good").end()
    provider.force_flush()
    provider.shutdown()
    assert provider.dropped == 1 and len(delivered) == 1
