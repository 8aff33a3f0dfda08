"""The console's sessions and agents pages without a browser (httpx against a real server)."""

from __future__ import annotations

import asyncio
import html
import re
import time

from svantic_grpc.pb import session_service_pb2
from tests._support import running_server
from tests.agents_connected import WAIT, new_session, running_agent, send
from tests.agents_inputs import ToolAgent, close_session
from tests.console._console import DELETES, signed_in, tool_call_parts


async def test_the_sessions_list_pages_through_every_session() -> None:
    async with running_server() as client, signed_in(client) as web:
        created = {await new_session(client) for _ in range(30)}
        seen: list[str] = []
        url = "/console/sessions"
        for _ in range(5):
            page = (await web.http.get(url)).text
            seen += re.findall(r'href="/console/sessions/(ses_[0-9a-f]+)"', page)
            found = re.search(r'id="next-page" href="([^"]+)"', page)
            if not found:
                break
            url = html.unescape(found.group(1))
        assert sorted(seen) == sorted(created)


async def test_a_session_timeline_resumes_after_the_last_event_it_saw() -> None:
    async with running_server() as client, signed_in(client) as web:
        session_id = await new_session(client)
        await close_session(client, session_id)  # a closed session's stream ends after its log

        async def ids(**headers: str) -> list[int]:
            response = await web.http.get(f"/console/sessions/{session_id}/events", headers=headers)
            assert response.headers["content-type"].startswith("text/event-stream")
            return [int(n) for n in re.findall(r"^id: (\d+)$", response.text, flags=re.M)]

        everything = await ids()
        assert everything == list(range(1, len(everything) + 1)) and len(everything) > 3
        assert await ids(**{"Last-Event-ID": "3"}) == everything[3:]


async def test_a_closed_or_unfollowable_timeline_says_it_ended() -> None:
    async with running_server() as client, signed_in(client) as web:
        session_id = await new_session(client)
        await close_session(client, session_id)
        ended = await web.http.get(f"/console/sessions/{session_id}/events")
        assert ended.text.rstrip().endswith("event: end\ndata:"), ended.text[-200:]
        past = await web.http.get(f"/console/sessions/{session_id}/events?after=999")
        assert "event: end" in past.text  # nothing to follow from there: the page stops asking


async def test_a_session_page_pages_through_its_messages() -> None:
    # found from outside: only the oldest 100 messages were shown, and nothing said so
    async with running_server() as client, signed_in(client) as web:
        session_id = await new_session(client)
        for n in range(130):
            await send(client, session_id, f"note {n}", message_id=f"note-{n:03d}")
        first = (await web.http.get(f"/console/sessions/{session_id}")).text
        shown = re.findall(r"<td>(note-\d{3})</td>", first)
        assert shown == [f"note-{n:03d}" for n in range(100)]
        later = re.search(r'id="next-messages" href="([^"]+)"', first)
        assert later, "no link to the later messages"
        rest = (await web.http.get(html.unescape(later.group(1)))).text
        assert re.findall(r"<td>(note-\d{3})</td>", rest) == [f"note-{n:03d}" for n in range(100, 130)]
        assert 'id="next-messages"' not in rest and 'id="first-messages"' in rest


async def test_the_agents_page_lists_an_instance_and_deregisters_it() -> None:
    async with (
        running_server() as client,
        running_agent(client, ToolAgent(), agent_type="crm", instance_id="crm-1"),
        signed_in(client) as web,
    ):
        page = (await web.http.get("/console/agents")).text
        row = re.search(r'<tr id="agent-crm-1">(.*?)</tr>', page, flags=re.S)
        assert row, page
        assert "crm" in row.group(1) and "connected" in row.group(1) and "0 ok / 0 failed" in row.group(1)
        gone = await web.http.post("/console/agents/crm-1/deregister", data={"csrf": web.csrf})
        assert gone.status_code == 200 and "deregistered crm-1" in gone.text
        assert 'id="agent-crm-1"' not in gone.text


async def test_open_live_pages_do_not_hold_up_a_graceful_shutdown() -> None:
    grace = 3.0
    async with running_server(shutdown_grace_s=grace) as client, signed_in(client) as web:
        session_id = await new_session(client)
        ended: list[str] = []

        async def follow(url: str, opened: asyncio.Event) -> None:
            async with web.http.stream("GET", url, timeout=grace * 3) as response:
                async for chunk in response.aiter_text():
                    if "retry:" in chunk:
                        opened.set()
            ended.append(url)

        urls = ["/console/queue/events", f"/console/sessions/{session_id}/events"]
        opened = [asyncio.Event() for _ in urls]
        readers = [asyncio.create_task(follow(url, event)) for url, event in zip(urls, opened, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), WAIT)
        started = time.monotonic()
        await client.server.stop()
        took = time.monotonic() - started
        await asyncio.wait_for(asyncio.gather(*readers), WAIT)
        assert sorted(ended) == sorted(urls)
        assert took < grace / 2, f"stopping took {took:.2f}s with the console open (grace {grace}s)"


async def test_signing_out_ends_an_open_live_queue_at_its_next_change() -> None:
    tool = ToolAgent()
    async with (
        running_server(policies=[DELETES]) as client,
        running_agent(client, tool, agent_type="crm", instance_id="crm-1"),
        signed_in(client) as web,
    ):
        received: list[str] = []
        opened = asyncio.Event()

        async def follow() -> None:
            async with web.http.stream("GET", "/console/queue/events") as response:
                async for chunk in response.aiter_text():
                    received.append(chunk)
                    opened.set()

        reader = asyncio.create_task(follow())
        await asyncio.wait_for(opened.wait(), WAIT)
        assert (await web.http.post("/console/logout", data={"csrf": web.csrf})).status_code == 303
        session_id = await new_session(client)
        await send(client, session_id, *tool_call_parts("crm.delete_records", {"ids": ["r1"]}))
        await asyncio.wait_for(reader, WAIT)  # the stream ended instead of telling of the request
        assert not any("event: queue" in chunk for chunk in received)


async def test_ids_holding_slashes_act_on_their_own_row() -> None:
    # found from outside: ids may hold "/" and "..", and put raw into the console's URLs a browser
    # resolved "y/../victim.sess" to "victim.sess": Deregister on one row removed another agent
    async with (
        running_server() as client,
        running_agent(client, ToolAgent(), agent_type="crm", instance_id="victim.sess"),
        running_agent(client, ToolAgent(), agent_type="crm", instance_id="y/../victim.sess"),
        signed_in(client) as web,
    ):
        page = (await web.http.get("/console/agents")).text
        row = re.search(r'<tr id="agent-y/../victim.sess">(.*?)</tr>', page, flags=re.S)
        assert row, page
        action = re.search(r'action="([^"]+)"', row.group(1))
        assert action and "/../" not in action.group(1)
        gone = await web.http.post(html.unescape(action.group(1)), data={"csrf": web.csrf})
        assert gone.status_code == 200 and "deregistered y/../victim.sess" in gone.text
        assert 'id="agent-victim.sess"' in gone.text and 'id="agent-y/../victim.sess"' not in gone.text
        # A session whose id holds a slash opens, streams its timeline and closes from its links.
        session_id = await new_session(client, "team/a")
        listed = (await web.http.get("/console/sessions")).text
        link = re.search(r'<a href="([^"]+)">team/a</a>', listed)
        assert link, listed
        opened = await web.http.get(html.unescape(link.group(1)))
        assert opened.status_code == 200 and "team/a" in opened.text
        live = re.search(r'data-live="([^"]+)"', opened.text)
        close = re.search(r'<form method="post" action="([^"]+)"', opened.text)
        assert live and close
        await close_session(client, session_id)
        timeline = await web.http.get(html.unescape(live.group(1)))
        assert timeline.status_code == 200 and "-> closed" in timeline.text


async def test_a_reason_with_line_breaks_stays_one_timeline_entry() -> None:
    # found from outside: a CR in an agent's or client's text ended the server-sent event's line,
    # and what followed it became fields of its own (a forged entry, a Last-Event-ID)
    async with running_server() as client, signed_in(client) as web:
        session_id = await new_session(client)
        forged = "bye\rid: 999999\revent: timeline\rdata: FORGED\r\ndata: more\u2028x"
        await client.sessions.CloseSession(
            session_service_pb2.CloseSessionRequest(session_id=session_id, reason=forged),
            metadata=await client.md(),
            timeout=WAIT,
        )
        text = (await web.http.get(f"/console/sessions/{session_id}/events")).text
        lines = re.split(r"\r\n|\r|\n", text)
        assert "id: 999999" not in lines
        assert not any(line.startswith("data: FORGED") or line.startswith("data: more") for line in lines)
        closing = [line for line in lines if "-> closed" in line]
        assert closing and "FORGED" in closing[0]  # the reason is there, on its one line
