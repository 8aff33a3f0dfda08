"""GET /metrics: a scripted run moves each counter and histogram by exactly what was done.

A real server (SQLite store, so commits are measured) with a connected agent that asks
for approval: one message is approved over gRPC and completes, one waits until its
request expires and fails. The scrape is parsed with the Prometheus client's own parser.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
import pytest
from grpc import aio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from svantic_grpc.core.events import AgentLeft
from svantic_grpc.metrics import AGENT_TYPES, PrometheusMetrics
from svantic_grpc.pb import session_service_pb2
from tests import _postgres
from tests._support import SIGNING_ENV, Client, running_server
from tests.agents_connected import WAIT, new_session, wait_for_state
from tests.agents_inputs import pending_ids, resolve
from tests.api.test_inputs import (
    APPROVE,
    COMPLETED,
    DELETE_RECORDS,
    DELETES,
    FAILED,
    ask_tools,
    crm_agent,
    real_time_clock,
)
from tests.test_tracing import otlp_sink

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: Client) -> Samples:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{client.server.http.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpcs(samples: Samples, method: str, status: str = "OK") -> float:
    return value(samples, "grpc_server_call_duration_seconds_count", grpc_method=method, grpc_status=status)


async def test_a_scripted_run_moves_the_metrics_by_exactly_what_was_done(tmp_path: Path) -> None:
    clock = real_time_clock()
    store = f"sqlite:///{tmp_path / 'mesh.db'}"
    async with (
        running_server(policies=[DELETES], clock=clock, input_request_ttl_ms=60_000, store=store) as client,
        crm_agent(client),
    ):
        before = await scrape(client)
        assert value(before, "svantic_connected_agents") == 1
        session_id = await new_session(client)
        with pytest.raises(aio.AioRpcError) as missing:
            await client.sessions.GetSession(
                session_service_pb2.GetSessionRequest(session_id="ses_nope"), metadata=await client.md()
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        # One approval answered over gRPC: the message completes.
        approved = await ask_tools(client, session_id, DELETE_RECORDS)
        [approved_request] = approved.input_request_ids
        waiting = await scrape(client)
        assert value(waiting, "svantic_input_requests_pending") == 1
        assert value(waiting, "svantic_sessions", status="paused") == 1
        assert value(waiting, "svantic_messages", state="input-required") == 1
        await resolve(client, approved_request, decision=APPROVE)
        await wait_for_state(client, session_id, approved.message_id, COMPLETED)

        # One nobody answers: it expires and its message fails.
        expiring = await ask_tools(client, session_id, DELETE_RECORDS)
        clock.advance(61)
        assert await client.server.mesh.inputs.expiry.run_once() == 1
        await wait_for_state(client, session_id, expiring.message_id, FAILED)
        assert await pending_ids(client) == []

        watch = client.sessions.WatchSession(
            session_service_pb2.WatchSessionRequest(session_id=session_id), metadata=await client.md()
        )
        # The server subscribes before it replays the log: a replayed event means it is subscribed.
        assert await asyncio.wait_for(watch.read(), WAIT) is not aio.EOF
        after = await scrape(client)
        watch.cancel()
        assert value(after, "svantic_event_subscribers") == 1

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("svantic_sessions", status="active") == 1
    assert value(after, "svantic_sessions", status="paused") == 0
    assert value(after, "svantic_input_requests_pending") == 0
    assert value(after, "svantic_messages", state="input-required") == 0
    assert value(after, "svantic_connected_agents") == 1

    assert rpcs(after, "/svantic.v1.SessionService/InitSession") == 1
    assert rpcs(after, "/svantic.v1.SessionService/GetSession", "NOT_FOUND") == 1
    assert rpcs(after, "/svantic.v1.MessageService/ResolveInput") == 1
    assert rpcs(after, "/svantic.v1.MessageService/SendMessage") == 2
    assert value(after, "grpc_server_call_duration_seconds_sum", grpc_method="x", grpc_status="OK") == 0

    dispatch = "svantic_dispatch_duration_seconds_count"
    assert moved(dispatch, agent_type="crm", transport="connect-stream", outcome="completed") == 1
    assert moved(dispatch, agent_type="crm", transport="connect-stream", outcome="failed") == 1

    assert moved("svantic_message_duration_seconds_count", state="completed") == 1
    assert moved("svantic_message_duration_seconds_count", state="failed") == 1

    inputs = "svantic_input_request_duration_seconds"
    assert moved(f"{inputs}_count", surface="grpc", outcome="resolved") == 1
    assert moved(f"{inputs}_count", surface="mesh", outcome="expired") == 1
    assert moved(f"{inputs}_sum", surface="mesh", outcome="expired") == pytest.approx(61, abs=1)

    commits = moved("svantic_store_commit_duration_seconds_count")
    assert commits > 0
    assert moved("svantic_store_commit_batch_size_sum") >= commits
    # No label carries an id: every label value is one of a bounded set.
    for name, labels in after:
        for _, label_value in labels:
            assert session_id not in label_value and "msg_" not in label_value, (name, labels)


async def test_metrics_can_be_turned_off() -> None:
    async with running_server(metrics={"enabled": False}) as client:
        assert client.server.metrics is None
        await new_session(client)
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{client.server.http.url}/metrics")
        assert response.status_code == 404


async def test_the_slowest_subscribers_lag_is_a_gauge() -> None:
    async with running_server() as client:
        session_id = await new_session(client)
        tenant = "acme"
        # A subscriber that reads nothing while three events are written, beside one that keeps up.
        slow = client.server.mesh.bus.subscribe(tenant, session_id)
        quick = client.server.mesh.bus.subscribe(tenant, session_id)
        try:
            for instance in ("a-1", "a-2", "a-3"):
                await client.server.mesh.bus.publish(
                    tenant, session_id, AgentLeft(f"x-{instance}", instance, "test")
                )
            for _ in range(3):
                await asyncio.wait_for(quick.next(), WAIT)
            assert value(await scrape(client), "svantic_event_subscriber_lag_events") == 3
            await asyncio.wait_for(slow.next(), WAIT)
            assert value(await scrape(client), "svantic_event_subscriber_lag_events") == 2
        finally:
            slow.close()
            quick.close()
        assert value(await scrape(client), "svantic_event_subscriber_lag_events") == 0


async def test_events_from_another_replica_are_timed_on_arrival() -> None:
    _postgres.require_postgres()
    schema = _postgres.new_schema()
    settings = {"store": _postgres.POSTGRES_DSN, "postgres": {"schema_name": schema, "pool_size": 2}}
    try:
        async with running_server(**settings) as writer, running_server(**settings) as reader:
            session_id = await new_session(writer)
            # Before subscribing: once the reader's bell listens, it reads what the log already holds.
            before = await scrape(reader)
            subscription = reader.server.mesh.bus.subscribe("acme", session_id)
            try:
                await writer.sessions.CloseSession(
                    session_service_pb2.CloseSessionRequest(session_id=session_id), metadata=await writer.md()
                )
                seen = [await asyncio.wait_for(subscription.next(), WAIT)]
                while not seen[-1].closes_session:
                    seen.append(await asyncio.wait_for(subscription.next(), WAIT))
            finally:
                subscription.close()
            after = await scrape(reader)
            delays = "svantic_event_replica_delay_seconds"
            arrived = value(after, f"{delays}_count") - value(before, f"{delays}_count")
            assert arrived == len(seen)
            assert 0 <= value(after, f"{delays}_sum") - value(before, f"{delays}_sum") < WAIT * len(seen)
            # The writer heard nothing from elsewhere: its own events are not counted.
            assert value(await scrape(writer), f"{delays}_count") == 0
    finally:
        await _postgres.drop_schema(schema)


async def test_spans_dropped_on_the_way_to_the_exporter_are_counted() -> None:
    # A span queue of one, never handed over before the server stops: every span after the first is
    # dropped, and the scrape says how many.
    with otlp_sink() as (endpoint, _):
        env = {
            **SIGNING_ENV,
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_MAX_QUEUE_SIZE": "1",
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
        }
        async with running_server(env=env) as client:
            metadata = await client.md()
            init = session_service_pb2.InitSessionRequest()
            await client.sessions.InitSession(init, metadata=metadata)  # the queue is full from here on
            before = value(await scrape(client), "svantic_trace_spans_dropped_total")
            for _ in range(5):
                await client.sessions.InitSession(init, metadata=metadata)
            after = value(await scrape(client), "svantic_trace_spans_dropped_total")
    assert after - before == 5


async def test_agent_types_past_the_first_hundred_are_labelled_other() -> None:
    # Agent types are whatever agents register as: the label's values stay bounded all the same.
    metrics = PrometheusMetrics()
    for n in range(AGENT_TYPES + 20):
        metrics.dispatch_done(
            agent_type=f"type-{n}", transport="connected", outcome="completed", latency_s=0.01
        )
    metrics.dispatch_done(agent_type="type-0", transport="connected", outcome="completed", latency_s=0.01)
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            if sample.name == "svantic_dispatch_duration_seconds_count":
                counts[sample.labels["agent_type"]] = sample.value
    assert len(counts) == AGENT_TYPES + 1
    assert counts["type-0"] == 2 and counts[f"type-{AGENT_TYPES - 1}"] == 1 and counts["other"] == 20


def test_the_hot_paths_observations_scrape_as_prometheus_clients_own() -> None:
    # The RPC, dispatch and message histograms are observed through a shorter path than
    # Histogram.observe: the same observations (on a bound, between two, past the last, zero,
    # negative, NaN) must scrape to the same text.
    amounts = [0.001, 0.0025, 0.003, 0.0, -1.0, 0.07, 60, 61, 1e9, float("inf"), float("nan"), 1e-9]
    fast, plain = PrometheusMetrics(), PrometheusMetrics()
    for amount in amounts:
        fast.rpc_done("/svantic.v1.MessageService/SendMessage", "OK", amount)
        fast.dispatch_done(agent_type="echo", transport="connected", outcome="completed", latency_s=amount)
        fast.message_done(state="completed", latency_s=amount)
        plain._rpc.labels("/svantic.v1.MessageService/SendMessage", "OK").observe(amount)
        plain._dispatch.labels("echo", "connected", "completed").observe(amount)
        plain._message.labels("completed").observe(amount)

    def text(metrics: PrometheusMetrics) -> list[str]:
        return [
            line
            for line in generate_latest(metrics.registry).decode().splitlines()
            if "_created" not in line  # when each was made: differs by a few microseconds
        ]

    assert text(fast) == text(plain)
    assert 'svantic_message_duration_seconds_bucket{le="0.001",state="completed"} 4.0' in text(fast)
