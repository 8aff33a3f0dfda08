"""A hosted agent's liveness comes from what the mesh sees of it (issue 9, item 15).

An off-the-shelf A2A agent cannot heartbeat: its successful dispatches keep it
routable, and when idle a probe of its agent card does. The clock is injected
(the heartbeat timeout is the default 90 s); probes are driven by
``mesh.liveness.run_once`` as the background task would at those times.
"""

from __future__ import annotations

import socket
import time
from contextlib import AsyncExitStack
from pathlib import Path
from urllib.parse import urlparse

from aiohttp import web

from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.liveness import HostedLiveness
from svantic_grpc.pb import agent_types_pb2, message_types_pb2, registry_service_pb2
from tests._support import Client, running_server
from tests.agents_a2a import HostedAgent
from tests.agents_connected import WAIT, data, eventually, get_agent, new_session, send
from tests.agents_on_clock import hosted_on_clock

COMPLETED = message_types_pb2.MESSAGE_STATE_COMPLETED
FAILED = message_types_pb2.MESSAGE_STATE_FAILED
UNHEALTHY = agent_types_pb2.AGENT_STATUS_UNHEALTHY
ROUTABLE = (agent_types_pb2.AGENT_STATUS_AVAILABLE, agent_types_pb2.AGENT_STATUS_UNKNOWN)
TIMEOUT_S = 90  # the default heartbeat timeout


def liveness(client: Client) -> HostedLiveness:
    probes = client.server.mesh.liveness
    assert probes is not None
    return probes


async def echo_in_new_session(client: Client, words: str) -> message_types_pb2.Message:
    session_id = await new_session(client)
    return await send(client, session_id, words, data({"target_agent": "echo-agent"}))


async def test_a_hosted_agent_serving_traffic_stays_routable_past_the_heartbeat_timeout() -> None:
    clock = ManualClock(start=time.time())
    async with (
        running_server(clock=clock) as client,
        hosted_on_clock(client.channel, clock, HostedAgent("echo", "echo-h")) as hosted,
    ):
        agent = hosted.echo("echo-h")
        await client.registry.RegisterAgent(agent.registration(), metadata=await client.md(), timeout=WAIT)
        for minute in range(1, 5):  # four new sessions, 45 s apart: 180 s, twice the timeout
            clock.advance(TIMEOUT_S / 2)
            message = await echo_in_new_session(client, f"tick {minute}")
            assert message.state == COMPLETED, message.state_reason
            assert message.instance_id == "echo-h"
            # It was seen serving: no probe is spent on it.
            assert await liveness(client).run_once() == 0
        assert (await get_agent(client, "echo-h")).status in ROUTABLE
        assert [s.text for s in agent.accepted] == [f"tick {m}" for m in range(1, 5)]


async def test_an_idle_hosted_agent_with_a_reachable_card_stays_available() -> None:
    clock = ManualClock(start=time.time())
    async with (
        running_server(clock=clock) as client,
        hosted_on_clock(client.channel, clock, HostedAgent("echo", "echo-h")) as hosted,
    ):
        agent = hosted.echo("echo-h")
        await client.registry.RegisterAgent(agent.registration(), metadata=await client.md(), timeout=WAIT)
        for _ in range(4):  # 124 s of silence, probed every 31 s
            clock.advance(TIMEOUT_S / 3 + 1)
            assert await liveness(client).run_once() == 1
        shown = await get_agent(client, "echo-h")
        assert shown.status in ROUTABLE
        assert shown.last_seen_at.seconds == int(clock.now())
        assert agent.seen == []  # a probe reads the card; it sends the agent no work

        message = await echo_in_new_session(client, "still there?")
        assert message.state == COMPLETED, message.state_reason
        assert message.instance_id == "echo-h"


async def test_a_hosted_agent_whose_server_is_gone_becomes_unhealthy() -> None:
    clock = ManualClock(start=time.time())
    async with running_server(clock=clock) as client:
        async with hosted_on_clock(client.channel, clock, HostedAgent("echo", "echo-h")) as hosted:
            registration = hosted.echo("echo-h").registration()
            await client.registry.RegisterAgent(registration, metadata=await client.md(), timeout=WAIT)
        # Its server is gone: the probes fail and nothing else is seen of it.
        for _ in range(3):
            clock.advance(TIMEOUT_S / 3 + 1)
            assert await liveness(client).run_once() == 1
        shown = await get_agent(client, "echo-h")
        assert shown.status == UNHEALTHY
        assert shown.connection.last_error.startswith("probe: ")

        message = await echo_in_new_session(client, "anyone?")
        assert message.state == FAILED
        assert "no available instance" in message.state_reason and "1 unhealthy" in message.state_reason


async def test_after_a_restart_idle_hosted_agents_are_probed_and_stay_routable(tmp_path: Path) -> None:
    clock = ManualClock(start=time.time())
    store = f"sqlite:///{tmp_path / 'mesh.db'}"
    async with (
        running_server(clock=clock, store=store) as client,
        hosted_on_clock(client.channel, clock, HostedAgent("echo", "echo-h")) as hosted,
    ):
        registration = hosted.echo("echo-h").registration()
        await client.registry.RegisterAgent(registration, metadata=await client.md(), timeout=WAIT)
    clock.advance(TIMEOUT_S - 10)  # the server was down a while; the agent kept running
    async with (
        running_server(clock=clock, store=store) as client,
        hosted_on_clock(
            client.channel, clock, HostedAgent("echo", "echo-h"), port=urlparse(registration.url).port or 0
        ),
    ):
        # Found in the store at start-up, and probed at once (it was idle long enough).
        async def probed_once() -> bool:  # whether it answered depends on who started first
            answered = client.server.mesh.registry.seen_at("acme", "echo-h") > 0
            failed = (await get_agent(client, "echo-h")).connection.last_error.startswith("probe: ")
            return (answered or failed) and len(liveness(client)) == 1

        await eventually(probed_once)
        clock.advance(TIMEOUT_S / 3 + 1)  # now past the timeout counted from its registration
        assert await liveness(client).run_once() == 1
        message = await echo_in_new_session(client, "back?")
        assert message.state == COMPLETED, message.state_reason


async def test_what_failed_at_a_hosted_agents_url_is_not_told_to_the_registrant() -> None:
    # found from outside: the failure reason and GetAgent's last_error said "refused", "HTTP 500"
    # or "not JSON": registering URLs mapped the mesh's network for any full-scope client
    async def status_500(request: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    async def not_a_card(request: web.Request) -> web.Response:
        return web.Response(text="<html>an intranet page</html>", content_type="text/html")

    clock = ManualClock(start=time.time())
    async with AsyncExitStack() as stack:
        urls = {"closed": f"http://127.0.0.1:{_closed_port()}"}
        for name, handler in (("http500", status_500), ("html", not_a_card)):
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            urls[name] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        client = await stack.enter_async_context(running_server(clock=clock))
        md = await client.md()
        reasons, errors = set(), set()
        for name, url in urls.items():
            registration = registry_service_pb2.RegisterAgentRequest(
                agent_type=f"t-{name}",
                instance_id=f"i-{name}",
                url=url,
                deployment_mode=agent_types_pb2.DEPLOYMENT_MODE_HOSTED,
            )
            await client.registry.RegisterAgent(registration, metadata=md, timeout=WAIT)
            session_id = await new_session(client)
            message = await send(client, session_id, "hello", data({"target_agent": f"t-{name}"}))
            assert message.state == FAILED
            reasons.add(message.state_reason.replace(url, "URL").replace(name, "NAME"))
        clock.advance(TIMEOUT_S / 3 + 1)
        await liveness(client).run_once()
        for name, url in urls.items():
            shown = (await get_agent(client, f"i-{name}")).connection.last_error
            errors.add(shown.replace(url, "URL"))
    assert len(reasons) == 1, reasons  # the same words for a closed port, an error page, a web page
    # whichever came last, a dispatch or a probe, its words are the same for the three
    assert errors <= {
        "not delivered: cannot read an A2A agent card at URL",
        "probe: the agent did not serve its agent card",
    }, errors


def _closed_port() -> int:
    with socket.socket() as probe:  # nobody listens on it once the probe closes
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
