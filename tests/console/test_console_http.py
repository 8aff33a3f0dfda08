"""The console without a browser: sign-in, CSRF, tenants, scopes, escaping, answers (httpx, real server)."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest

from svantic_grpc.pb import message_types_pb2, session_service_pb2
from tests._support import SECRET, Client, code_of, running_server
from tests.agents_connected import WAIT, data, new_session, running_agent, send, wait_for_state
from tests.agents_inputs import ConfirmAgent, FormAgent, ToolAgent, pending_ids, resolve
from tests.console._console import DELETES, csrf_of, sign_in_on, signed_in, tool_call_parts

pb = message_types_pb2
INPUT_REQUIRED = pb.MESSAGE_STATE_INPUT_REQUIRED
COMPLETED = pb.MESSAGE_STATE_COMPLETED


async def _asked(client: Client, arguments: dict[str, Any] | None = None) -> tuple[str, pb.Message]:
    session_id = await new_session(client)
    message = await send(
        client, session_id, *tool_call_parts("crm.delete_records", arguments or {"ids": ["r1"]})
    )
    assert message.state == INPUT_REQUIRED, message.state_reason
    return session_id, message


async def test_sign_in_sets_a_strict_httponly_cookie_and_a_wrong_secret_is_refused() -> None:
    async with (
        running_server() as client,
        httpx.AsyncClient(base_url=client.server.http.url, timeout=WAIT) as http,
    ):
        entry = await http.get("/console", follow_redirects=True)
        assert entry.url.path == "/console/login" and "Client secret" in entry.text
        refused = await sign_in_on(http, "acme-full", secret="wrong")
        assert refused.status_code == 401
        assert "unknown client_id or wrong client_secret" in refused.text
        ok = await sign_in_on(http, "acme-full")
        assert ok.status_code == 303 and ok.headers["location"] == "/console/queue"
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        queue = await http.get("/console/queue")
        assert "acme-full · acme" in queue.text
        csp = queue.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp


async def test_cookies_are_secure_when_the_public_url_is_https_behind_a_tls_proxy() -> None:
    # found from outside: behind a proxy that ends TLS the server sees http, and set its cookies
    # without Secure
    async with (
        running_server(http_public_url="https://mesh.example.com") as client,
        httpx.AsyncClient(base_url=client.server.http.url, timeout=WAIT) as http,
    ):
        page = await http.get("/console/login")
        pre = page.headers["set-cookie"]
        assert "secure" in pre.lower()  # the sign-in form's cookie
        # (an http client keeps a Secure cookie to itself: it is sent here as the browser behind
        # the proxy would)
        ok = await http.post(
            "/console/login",
            data={"csrf": csrf_of(page.text), "client_id": "acme-full", "client_secret": SECRET},
            headers={"cookie": pre.split(";")[0]},
        )
        assert ok.status_code == 303 and "secure" in ok.headers["set-cookie"].lower()


async def test_a_request_only_others_may_answer_shows_who_instead_of_buttons() -> None:
    only_boss = {**DELETES, "approvers": ["slack:UBOSS"]}
    async with (
        running_server(policies=[only_boss]) as client,
        running_agent(client, ToolAgent(), agent_type="crm", instance_id="crm-1"),
        signed_in(client) as web,
    ):
        _, message = await _asked(client)
        items = (await web.http.get("/console/queue/items")).text
        assert message.input_request_ids[0] in items
        assert "Only slack:UBOSS may answer this request." in items
        assert 'class="resolve"' not in items and "Approve" not in items


async def test_an_oversized_sign_in_form_is_refused_413_on_the_sign_in_page() -> None:
    async with (
        running_server() as client,
        httpx.AsyncClient(base_url=client.server.http.url, timeout=WAIT) as http,
    ):
        await http.get("/console/login")
        refused = await http.post("/console/login", data={"client_id": "acme-full", "pad": "x" * 300_000})
        assert refused.status_code == 413
        assert "is larger than 262144 bytes" in refused.text and "Client secret" in refused.text
        assert (await sign_in_on(http, "acme-full")).status_code == 303  # and the next one is served


async def test_a_post_without_the_csrf_token_is_refused_and_nothing_is_answered() -> None:
    tool = ToolAgent()
    async with (
        running_server(policies=[DELETES]) as client,
        running_agent(client, tool, agent_type="crm", instance_id="crm-1"),
        signed_in(client) as web,
    ):
        _, message = await _asked(client)
        [request_id] = message.input_request_ids
        for form in ({}, {"csrf": "forged"}):
            response = await web.http.post(
                f"/console/inputs/{request_id}/resolve", data={"action": "approve", **form}
            )
            assert response.status_code == 403
            assert "CSRF" in response.text
        assert await pending_ids(client) == [request_id]
        assert tool.answers == []


async def test_another_tenants_ids_are_not_found_and_its_requests_not_listed() -> None:
    tool = ToolAgent()
    async with (
        running_server(policies=[DELETES]) as client,
        running_agent(client, tool, agent_type="crm", instance_id="crm-1"),
        signed_in(client, "globex-full") as web,
    ):
        session_id, message = await _asked(client)
        [request_id] = message.input_request_ids
        queue = await web.http.get("/console/queue")
        assert request_id not in queue.text and "Nothing waits" in queue.text
        assert (await web.http.get(f"/console/sessions/{session_id}")).status_code == 404
        answered = await web.resolve(request_id, action="approve")
        assert answered.status_code == 404
        assert (
            await web.http.post(f"/console/sessions/{session_id}/close", data={"csrf": web.csrf})
        ).status_code == 404
        assert (
            await web.http.post("/console/agents/crm-1/deregister", data={"csrf": web.csrf})
        ).status_code == 404
        assert await pending_ids(client) == [request_id]


async def test_a_read_credential_sees_the_queue_but_cannot_resolve() -> None:
    tool = ToolAgent()
    async with (
        running_server(policies=[DELETES]) as client,
        running_agent(client, tool, agent_type="crm", instance_id="crm-1"),
        signed_in(client, "acme-read") as web,
    ):
        _, message = await _asked(client)
        [request_id] = message.input_request_ids
        queue = (await web.http.get("/console/queue")).text
        assert request_id in queue
        # no buttons that can only answer 403 (found from outside), and the page says why
        assert 'value="approve"' not in queue and "needs one with the <code>full</code> scope" in queue
        refused = await web.resolve(request_id, action="approve")
        assert refused.status_code == 403
        assert "needs the &#39;full&#39; scope" in refused.text
        assert await pending_ids(client) == [request_id]


async def test_a_script_in_a_tool_argument_is_shown_escaped_and_inert() -> None:
    tool = ToolAgent()
    script = "<script>alert('pwned')</script><img src=x onerror=alert(1)>"
    async with (
        running_server(policies=[DELETES]) as client,
        running_agent(client, tool, agent_type="crm", instance_id="crm-1"),
        signed_in(client) as web,
    ):
        session_id, _ = await _asked(client, {"note": script})
        await send(client, session_id, script)  # a message's text, shown on the session's page
        page = await web.http.get(f"/console/sessions/{session_id}")
        assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in page.text
        assert "<script>alert" not in page.text and "<img src=x" not in page.text
        queue = await web.http.get("/console/queue")
        assert "<script>alert" not in queue.text and "<img src=x" not in queue.text
        assert "&lt;script&gt;alert(&#39;pwned&#39;)" in queue.text  # the arguments as written, escaped
        # Every script the page loads is the console's own file.
        assert queue.text.count("<script") == 1
        assert '<script src="/console/static/console.js" defer></script>' in queue.text


async def test_tool_arguments_read_as_the_agent_wrote_them() -> None:
    # found from outside: Jinja's tojson showed <, >, & and ' as \u003c, \u003e, \u0026, \u0027
    async with (
        running_server(policies=[DELETES]) as client,
        running_agent(client, ToolAgent(), agent_type="crm", instance_id="crm-1"),
        signed_in(client) as web,
    ):
        await _asked(client, {"where": "x <> 1 && y > 2", "note": "a <b> & 'c' ü"})
        items = (await web.http.get("/console/queue/items")).text
        assert "x &lt;&gt; 1 &amp;&amp; y &gt; 2" in items and "a &lt;b&gt; &amp; &#39;c&#39; ü" in items
        assert "\\u00" not in items


async def test_approving_from_the_console_reaches_the_agent_as_surface_console() -> None:
    tool = ToolAgent()
    async with (
        running_server(policies=[DELETES]) as client,
        running_agent(client, tool, agent_type="crm", instance_id="crm-1"),
        signed_in(client) as web,
    ):
        session_id, message = await _asked(client)
        [request_id] = message.input_request_ids
        answered = await web.resolve(request_id, action="approve")
        assert answered.status_code == 200 and f"{request_id}: approve" in answered.text
        done = await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert tool.approved == [True]
        assert tool.answers[-1].resolved_by == "acme-full"
        assert done.state == COMPLETED


async def test_a_denial_needs_a_reason_and_the_agent_gets_it() -> None:
    tool = ToolAgent()
    async with (
        running_server(policies=[DELETES]) as client,
        running_agent(client, tool, agent_type="crm", instance_id="crm-1"),
        signed_in(client) as web,
    ):
        session_id, message = await _asked(client)
        [request_id] = message.input_request_ids
        bare = await web.resolve(request_id, action="deny")
        assert bare.status_code == 400 and "a denial needs a reason" in bare.text
        denied = await web.resolve(request_id, action="deny", reason="not on a Friday")
        assert denied.status_code == 200
        await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert tool.approved == [False] and tool.answers[-1].reason == "not on a Friday"


async def test_the_losing_answer_is_told_who_answered_how_and_when() -> None:
    tool = ToolAgent()
    async with (
        running_server(policies=[DELETES]) as client,
        running_agent(client, tool, agent_type="crm", instance_id="crm-1"),
        signed_in(client) as web,
    ):
        _, message = await _asked(client)
        [request_id] = message.input_request_ids
        await resolve(client, request_id, client_id="acme-admin", decision=pb.DECISION_APPROVE)
        lost = await web.resolve(request_id, action="deny", reason="too late")
        assert lost.status_code == 409
        assert "already answered by acme-admin via grpc at" in lost.text


async def test_a_sensitive_form_field_is_entered_here_and_never_shown_back() -> None:
    fields = [
        pb.FormField(name="api_key", type="password", label="API key", required=True),
        pb.FormField(name="rows", type="number", label="Rows"),
        pb.FormField(name="dry_run", type="checkbox", label="Dry run"),
    ]
    form = FormAgent("Connect the CRM", fields)
    secret = "sk-live-0123456789"
    async with (
        running_server() as client,
        running_agent(client, form, agent_type="exporter", instance_id="exp-1"),
        signed_in(client) as web,
    ):
        session_id = await new_session(client)
        message = await send(client, session_id, "connect", data({"target_agent": "exporter"}))
        [request_id] = message.input_request_ids
        answered = await web.resolve(
            request_id,
            action="submit",
            **{"field.api_key": secret, "field.rows": "12", "field.dry_run": "on"},
        )
        assert answered.status_code == 200, answered.text
        await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert form.values == [{"api_key": secret, "rows": 12, "dry_run": True}]
        for page in (answered, await web.http.get(f"/console/sessions/{session_id}")):
            assert secret not in page.text


async def test_a_number_is_taken_exactly_as_typed_or_refused_naming_the_field() -> None:
    form = FormAgent("Export", [pb.FormField(name="rows", type="number", label="Rows", required=True)])
    async with (
        running_server() as client,
        running_agent(client, form, agent_type="exporter", instance_id="exp-1"),
        signed_in(client) as web,
    ):
        session_id = await new_session(client)
        message = await send(client, session_id, "export", data({"target_agent": "exporter"}))
        [request_id] = message.input_request_ids
        for typed in ("1e400", "inf", "12abc", "99999999999999999999"):
            refused = await web.resolve(request_id, action="submit", **{"field.rows": typed})
            assert refused.status_code == 400, (typed, refused.status_code)
            assert "resolution.values.rows" in refused.text
        assert await pending_ids(client) == [request_id]
        answered = await web.resolve(request_id, action="submit", **{"field.rows": "9007199254740993"})
        assert answered.status_code == 200, answered.text
        await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert form.values == [{"rows": 9007199254740993}]  # past 2**53, not rounded to a double


async def test_sign_out_ends_the_session_even_for_a_copied_cookie() -> None:
    async with running_server() as client, signed_in(client) as web:
        cookie = web.http.cookies.get("svantic_console")
        out = await web.http.post("/console/logout", data={"csrf": web.csrf})
        assert out.status_code == 303 and out.headers["location"] == "/console/login"
        async with httpx.AsyncClient(
            base_url=client.server.http.url, timeout=WAIT, cookies={"svantic_console": cookie or ""}
        ) as copied:
            again = await copied.get("/console/queue")
            assert again.status_code == 303 and again.headers["location"] == "/console/login"
            post = await copied.post("/console/logout", data={"csrf": web.csrf})
            assert post.status_code == 401


async def test_sessions_filter_by_status_and_a_session_can_be_closed() -> None:
    async with running_server() as client, signed_in(client) as web:
        open_id = await new_session(client)
        closing_id = await new_session(client)
        closed = await web.http.post(f"/console/sessions/{closing_id}/close", data={"csrf": web.csrf})
        assert closed.status_code == 303
        page = await web.http.get(f"/console/sessions/{closing_id}")
        assert 'id="session-status">closed<' in page.text
        only_closed = (await web.http.get("/console/sessions?status=closed")).text
        assert closing_id in only_closed and open_id not in only_closed
        bad = await web.http.get("/console/sessions?status=nope")
        assert bad.status_code == 400 and "status" in bad.text


async def test_a_confirmation_is_confirmed_from_the_console() -> None:
    confirm = ConfirmAgent("payments.refund", {"order": "o-7"})
    async with (
        running_server() as client,
        running_agent(client, confirm, agent_type="payments", instance_id="pay-1"),
        signed_in(client) as web,
    ):
        session_id = await new_session(client)
        message = await send(client, session_id, "refund", data({"target_agent": "payments"}))
        [request_id] = message.input_request_ids
        queue = (await web.http.get("/console/queue")).text
        assert "confirmation" in queue and "payments.refund" in queue
        assert 'value="approve_always"' not in queue  # only the decisions the request allows
        answered = await web.resolve(request_id, action="approve")
        assert answered.status_code == 200, answered.text
        await wait_for_state(client, session_id, message.message_id, COMPLETED)
        assert confirm.answers[-1].confirmed


async def test_approve_for_session_lets_the_next_call_through_without_asking() -> None:
    tool = ToolAgent()
    async with (
        running_server(policies=[DELETES]) as client,
        running_agent(client, tool, agent_type="crm", instance_id="crm-1"),
        signed_in(client) as web,
    ):
        session_id, message = await _asked(client)
        [request_id] = message.input_request_ids
        assert (await web.resolve(request_id, action="approve_for_session")).status_code == 200
        await wait_for_state(client, session_id, message.message_id, COMPLETED)
        again = await send(client, session_id, *tool_call_parts("crm.delete_records", {"ids": ["r9"]}))
        again = await wait_for_state(client, session_id, again.message_id, COMPLETED)
        assert tool.approved == [True, True]
        assert "Nothing waits" in (await web.http.get("/console/queue")).text


async def test_the_console_cookie_is_no_token_for_the_grpc_api() -> None:
    async with running_server() as client, signed_in(client) as web:
        cookie = web.http.cookies.get("svantic_console") or ""
        assert cookie
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.sessions.InitSession(
                session_service_pb2.InitSessionRequest(), metadata=(("authorization", f"Bearer {cookie}"),)
            )
        assert code_of(refused) == grpc.StatusCode.UNAUTHENTICATED


async def test_the_queue_says_when_more_requests_wait_than_it_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("svantic_grpc.console.app.QUEUE_SHOWN", 2)
    tool = ToolAgent()
    async with (
        running_server(policies=[DELETES]) as client,
        running_agent(client, tool, agent_type="crm", instance_id="crm-1"),
        signed_in(client) as web,
    ):
        asked = [(await _asked(client, {"ids": [f"r{n}"]}))[1].input_request_ids[0] for n in range(3)]
        page = (await web.http.get("/console/queue")).text
        assert [r for r in asked if f'id="req-{r}"' in page] == asked[:2]  # the oldest first
        assert 'id="queue-more"' in page and "The oldest 2 pending requests are shown" in page
        await resolve(client, asked[0], decision=pb.DECISION_APPROVE)
        items = (await web.http.get("/console/queue/items")).text
        assert [r for r in asked if f'id="req-{r}"' in items] == asked[1:]
        assert 'id="queue-more"' not in items  # everything pending is shown now
