"""Bad input at the A2A ingress: A2A's own errors, never a 500, never a change of state."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import jwt
import pytest
from a2a.compat.v0_3 import a2a_v0_3_pb2 as v03
from grpc import aio
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from svantic_grpc.a2a.ingress import JSONRPC_PATHS
from svantic_grpc.pb import message_service_pb2, session_service_pb2
from tests._support import SIGNING_ENV, Client, error_details, running_server
from tests.a2a_ingress_support import ingress_http
from tests.agents_connected import new_session, send

V1 = {"A2A-Version": "1.0"}


class Http:
    def __init__(self, client: Client, base: str, http: httpx.AsyncClient) -> None:
        self.client = client
        self.base = base
        self.http = http

    async def post(
        self, body: Any, *, token: str | None = "", path: str = "/send", headers: dict[str, str] | None = None
    ) -> httpx.Response:
        sent = dict(headers or {})
        if token == "":
            token = await self.client.token()
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if isinstance(body, bytes):
            return await self.http.post(f"{self.base}{path}", content=body, headers=sent)
        return await self.http.post(f"{self.base}{path}", json=body, headers=sent)

    async def rpc_error(self, body: Any, **kwargs: Any) -> dict[str, Any]:
        response = await self.post(body, **kwargs)
        assert response.status_code == 200, response.text
        error = response.json()["error"]
        assert isinstance(error, dict)
        return error

    async def messages(self) -> int:
        listed = await self.client.messages.ListMessages(
            message_service_pb2.ListMessagesRequest(), metadata=await self.client.md()
        )
        return len(listed.messages)

    async def sessions(self) -> int:
        listed = await self.client.sessions.ListSessions(
            session_service_pb2.ListSessionsRequest(), metadata=await self.client.md()
        )
        return len(listed.sessions)


@pytest.fixture
async def http() -> AsyncIterator[Http]:
    async with running_server() as client, ingress_http(client) as base, httpx.AsyncClient(timeout=5) as h:
        yield Http(client, base, h)


def send_v03(session_id: str = "", **message: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "message": {
            "kind": "message",
            "messageId": "m-1",
            "role": "user",
            "parts": [{"kind": "text", "text": "hi"}],
        }
        | message
    }
    if session_id:
        params["configuration"] = {"sessionId": session_id}
    return {"jsonrpc": "2.0", "id": 7, "method": "message/send", "params": params}


def send_v1(session_id: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 8,
        "method": "SendMessage",
        "params": {
            "message": {"messageId": "m-2", "role": "ROLE_USER", "parts": parts},
            "configuration": {"sessionId": session_id},
        },
    }


def field_of(error: dict[str, Any]) -> str:
    """The offending field an A2A error names (0.3: in ``data``; 1.0: in its ErrorInfo details)."""
    data = error.get("data")
    if isinstance(data, dict):
        return str(data.get("field", ""))
    for detail in data or ():
        if "metadata" in detail:
            return str(detail["metadata"].get("field", ""))
    return ""


def forged_token() -> str:
    now = int(time.time())
    claims = {
        "tenant_id": "acme",
        "sub": "acme-full",
        "scopes": ["full"],
        "iat": now,
        "exp": now + 600,
        "jti": "x",
    }
    return jwt.encode(claims, "not-the-mesh-key-0123456789abcdef0123456789", algorithm="HS256")


@pytest.mark.parametrize("token", [None, "not-a-jwt", "forged"])
async def test_missing_or_bad_tokens_get_401_and_change_nothing(http: Http, token: str | None) -> None:
    sent = forged_token() if token == "forged" else token
    for path in ("/send", "/a2a/jsonrpc"):
        response = await http.post(send_v03(), token=sent, path=path)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"].startswith("Bearer")
    response = await http.post(
        {"message": {"messageId": "r", "role": "ROLE_USER", "parts": [{"text": "x"}]}},
        token=sent,
        path="/a2a/rest/message:send",
        headers=V1,
    )
    assert response.status_code == 401
    assert await http.sessions() == 0 and await http.messages() == 0


async def test_malformed_json_rpc_gets_the_protocols_errors(http: Http) -> None:
    assert (await http.rpc_error(b"{not json"))["code"] == -32700
    assert (await http.rpc_error({"jsonrpc": "2.0", "id": 1}))["code"] == -32600
    assert (await http.rpc_error({"jsonrpc": "1.0", "id": 1, "method": "message/send"}))["code"] == -32600
    assert (await http.rpc_error({"jsonrpc": "2.0", "id": 1, "method": "tasks/nope", "params": {}}))[
        "code"
    ] == -32601
    assert (await http.rpc_error(send_v03(parts="not a list")))["code"] in (-32600, -32602)
    assert await http.sessions() == 0 and await http.messages() == 0


async def test_invalid_params_name_the_field_and_accept_nothing(http: Http) -> None:
    session_id = await new_session(http.client)
    error = await http.rpc_error(send_v1(session_id, [{"text": "ok"}, {}]), headers=V1)
    assert error["code"] == -32602 and field_of(error) == "message.parts[1]", error
    error = await http.rpc_error(send_v03("no-such-session"))
    assert error["code"] == -32602 and field_of(error) == "configuration.sessionId", error
    error = await http.rpc_error(send_v03(contextId="no-such-context"))
    assert error["code"] == -32602 and field_of(error) == "message.context_id", error
    error = await http.rpc_error(send_v03("bad session id"))
    assert error["code"] == -32602 and field_of(error) == "configuration.sessionId", error
    error = await http.rpc_error(send_v03(session_id, messageId="bad id with spaces"))
    assert error["code"] == -32602 and "message_id" in error["message"], error
    assert await http.messages() == 0


async def test_bodies_the_sdk_cannot_read_get_the_protocols_errors_never_a_500(http: Http) -> None:
    deep = (
        b'{"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": ' + b"[" * 100_000 + b"]" * 100_000
    )
    not_utf8 = b'{"jsonrpc": "2.0", "id": "\xff\xfe", "method": "tasks/get", "params": {"id": "x"}}'
    for body in (deep, not_utf8):
        for path in ("/send", "/a2a/jsonrpc"):
            error = await http.rpc_error(body, path=path)
            assert error["code"] == -32700, error
        rest = await http.post(body, path="/a2a/rest/message:send", headers=V1)
        assert rest.status_code == 400 and rest.json()["error"]["status"] == "INVALID_ARGUMENT", rest.text
    session_id = await new_session(http.client)
    huge = send_v03(session_id)
    huge["params"]["message"]["parts"] = [{"kind": "data", "data": {"n": 10**30}}]
    error = await http.rpc_error(huge)
    assert error["code"] == -32602 and "64 bits" in error["message"], error
    # found from outside: a lone surrogate escape answered -32603 with Python's codec error
    lone = send_v03(session_id)
    lone["params"]["message"]["parts"] = [{"kind": "text", "text": "LONE"}]
    error = await http.rpc_error(json.dumps(lone).replace("LONE", "\\ud800").encode())
    assert error["code"] == -32602 and "lone surrogate" in error["message"], error
    bad_file = send_v03(session_id)
    bad_file["params"]["message"]["parts"] = [{"kind": "file", "file": {"bytes": "!!!notb64", "name": "f"}}]
    error = await http.rpc_error(bad_file)
    assert error["code"] == -32602 and field_of(error) == "message.parts[0].file.bytes", error
    raw = send_v1(session_id, [{"raw": "%%%", "mediaType": "text/plain"}])
    error = await http.rpc_error(raw, headers=V1)
    assert error["code"] == -32602 and field_of(error) == "message.parts[0].raw", error
    assert await http.messages() == 0
    # an int32 of A2A's protobuf given more than 32 bits: named, with the request's id
    get = {"jsonrpc": "2.0", "id": 41, "method": "tasks/get", "params": {"id": "x", "historyLength": 2**40}}
    response = (await http.post(get)).json()
    assert response["id"] == 41 and response["error"]["code"] == -32602, response
    assert field_of(response["error"]) == "historyLength"
    long_history = send_v03(session_id)
    long_history["params"]["configuration"]["historyLength"] = 2**40
    error = await http.rpc_error(long_history)
    assert error["code"] == -32602 and field_of(error) == "configuration.historyLength", error
    assert await http.messages() == 0
    # and the connection is still good for a request that is fine
    get = {"jsonrpc": "2.0", "id": 2, "method": "tasks/get", "params": {"id": "nope"}}
    assert (await http.rpc_error(get))["code"] == -32001


async def test_list_tasks_by_a_state_no_message_is_in_lists_none(http: Http) -> None:
    session_id = await new_session(http.client)
    assert "result" in (await http.post(send_v03(session_id))).json()
    listed = {"jsonrpc": "2.0", "id": 9, "method": "ListTasks", "params": {"status": "TASK_STATE_COMPLETED"}}
    assert len((await http.post(listed, headers=V1)).json()["result"]["tasks"]) == 1
    listed["params"] = {"status": "TASK_STATE_AUTH_REQUIRED"}
    assert (await http.post(listed, headers=V1)).json()["result"].get("tasks", []) == []
    listed["params"] = {"status": 3}  # protobuf's JSON takes an enum's number too
    assert len((await http.post(listed, headers=V1)).json()["result"]["tasks"]) == 1


async def test_list_tasks_by_a_state_a2a_does_not_have_is_refused_naming_it(http: Http) -> None:
    # read as no filter at all, a misspelt state used to list every task
    session_id = await new_session(http.client)
    assert "result" in (await http.post(send_v03(session_id))).json()
    for status in ("COMPLETED", "done", 42, None, True):
        listed = {"jsonrpc": "2.0", "id": 9, "method": "ListTasks", "params": {"status": status}}
        response = (await http.post(listed, headers=V1)).json()
        assert response["id"] == 9 and response["error"]["code"] == -32602, response
        assert field_of(response["error"]) == "status"
        assert "TASK_STATE_COMPLETED" in response["error"]["message"]  # what it could have been
    token = await http.client.token()
    rest = f"{http.base}/a2a/rest/tasks"
    auth = {"Authorization": f"Bearer {token}", **V1}
    refused = await http.http.get(rest, params={"status": "completed"}, headers=auth)
    assert refused.status_code == 400 and "status" in refused.json()["error"]["message"], refused.text
    listed_rest = await http.http.get(rest, params={"status": "TASK_STATE_COMPLETED"}, headers=auth)
    assert listed_rest.status_code == 200 and len(listed_rest.json()["tasks"]) == 1, listed_rest.text


async def test_a_0_3_method_with_the_1_0_header_is_named_not_an_internal_error(http: Http) -> None:
    # found from outside: -32603 "A2A version '1.0' is not supported by this handler"
    for method in ("tasks/get", "message/send"):
        body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": {"id": "x"}}
        response = (await http.post(body, path="/a2a/jsonrpc", headers=V1)).json()
        assert response["id"] == 7 and response["error"]["code"] == -32601, response
        assert field_of(response["error"]) == "method" and "GetTask" in response["error"]["message"]
    get = {"jsonrpc": "2.0", "id": 8, "method": "tasks/get", "params": {"id": "x"}}
    assert (await http.rpc_error(get, path="/a2a/jsonrpc"))["code"] == -32001  # 0.3 without the header


async def test_unknown_tasks_and_push_configuration(http: Http) -> None:
    get = {"jsonrpc": "2.0", "id": 2, "method": "tasks/get", "params": {"id": "nope"}}
    assert (await http.rpc_error(get))["code"] == -32001
    cancel = {"jsonrpc": "2.0", "id": 3, "method": "tasks/cancel", "params": {"id": "nope"}}
    assert (await http.rpc_error(cancel))["code"] == -32001
    push = {
        "jsonrpc": "2.0",
        "id": 4,
        "method": "tasks/pushNotificationConfig/set",
        "params": {"taskId": "nope", "pushNotificationConfig": {"url": "https://example.com/hook"}},
    }
    assert (await http.rpc_error(push))["code"] == -32004
    response = await http.post({}, path="/a2a/rest/tasks/nope", headers=V1)
    assert response.status_code in (404, 405)


async def test_rest_reaches_a_task_whose_id_holds_a_slash(http: Http) -> None:
    # found from outside: a gRPC client's message id "batch/7" could be listed over REST but not read
    session_id = await new_session(http.client)
    await send(http.client, session_id, "hello", message_id="batch/7")
    bearer = {"Authorization": f"Bearer {await http.client.token()}"}
    auth = {**bearer, **V1}
    for path, headers in (
        ("/a2a/rest/tasks/batch%2F7", auth),
        ("/a2a/rest/tasks/batch/7", auth),
        ("/a2a/rest/v1/tasks/batch%2F7", bearer),  # A2A 0.3
    ):
        got = await http.http.get(f"{http.base}{path}", headers=headers)
        assert got.status_code == 200, (path, got.text)
        assert got.json()["id"] == "batch/7" and got.json()["contextId"] == session_id, got.text
    cancel = await http.http.post(f"{http.base}/a2a/rest/tasks/batch%2F7:cancel", headers=auth)
    assert cancel.status_code == 400 and "TASK_NOT_CANCELABLE" in cancel.text, cancel.text  # it has ended
    missing = await http.http.get(f"{http.base}/a2a/rest/tasks/batch%2F8", headers=auth)
    assert missing.status_code == 404, missing.text
    listed = await http.http.get(f"{http.base}/a2a/rest/tasks", headers=auth)  # the list is still the list
    assert [t["id"] for t in listed.json()["tasks"]] == ["batch/7"], listed.text
    push = await http.http.get(f"{http.base}/a2a/rest/tasks/batch7/pushNotificationConfigs", headers=auth)
    assert push.status_code == 400 and "UNSUPPORTED" in push.text.upper(), push.text


async def test_a_refused_rest_stream_is_an_error_with_its_status_on_both_versions(http: Http) -> None:
    # found from outside: A2A 0.3's REST streams answered 200 text/event-stream and then cut the
    # connection for an unknown task or a body it could not read (the 1.0 binding answered errors)
    bearer = {"Authorization": f"Bearer {await http.client.token()}", "content-type": "application/json"}
    for path, body, headers, status in (
        ("/a2a/rest/v1/tasks/nope:subscribe", "", bearer, 404),
        ("/a2a/rest/v1/message:stream", "{}", bearer, 400),
        ("/a2a/rest/v1/message:stream", '{"message": true}', bearer, 400),
        ("/a2a/rest/tasks/nope:subscribe", "", {**bearer, **V1}, 404),
        ("/a2a/rest/message:stream", '{"message": true}', {**bearer, **V1}, 400),
    ):
        response = await http.http.post(f"{http.base}{path}", content=body, headers=headers)
        assert response.status_code == status, (path, body, response.status_code, response.text)
        assert "event-stream" not in response.headers.get("content-type", ""), path
        assert response.json(), path  # a whole JSON error, not a cut-off stream
    # and a stream that has events still streams them (the 0.3 REST body is the 0.3 protobuf's JSON)
    session_id = await new_session(http.client)
    ok = {
        "message": {"messageId": "m-ok", "role": "ROLE_USER", "content": [{"text": "hi"}]},
        "metadata": {"sessionId": session_id},
    }
    path = f"{http.base}/a2a/rest/v1/message:stream"
    async with http.http.stream("POST", path, json=ok, headers=bearer) as streamed:
        got = [line async for line in streamed.aiter_lines() if line.startswith("data:")]
        assert streamed.status_code == 200 and "event-stream" in streamed.headers["content-type"], got
    assert got and "COMPLETED" in got[-1].upper(), got


async def test_a_read_only_token_cannot_send(http: Http) -> None:
    session_id = await new_session(http.client)
    read = await http.client.token("acme-read")
    error = await http.rpc_error(send_v03(session_id), token=read)
    assert error["code"] == -32600 and "full" in error["message"]  # JSON-RPC has no "forbidden"
    assert error["data"]["reason"] == "MISSING_SCOPE", error
    # found from outside: REST said 400 INVALID_ARGUMENT and the A2A gRPC bindings INVALID_ARGUMENT,
    # as if the request were malformed; the mesh's own services say PERMISSION_DENIED
    body = {"message": {"messageId": "r-1", "role": "ROLE_USER", "parts": [{"text": "x"}]}}
    for path, headers in (
        ("/a2a/rest/message:send", V1),
        ("/a2a/rest/message:stream", V1),
        ("/a2a/rest/tasks/x:cancel", V1),
        ("/a2a/rest/v1/message:send", {}),
    ):
        response = await http.post(body, token=read, path=path, headers=headers)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"]["status"] == "PERMISSION_DENIED", response.text
    from a2a.compat.v0_3 import a2a_v0_3_pb2_grpc
    from a2a.types import Message, Part, Role, SendMessageRequest, a2a_pb2_grpc

    md = (("authorization", f"Bearer {read}"),)
    message = Message(message_id="r-2", role=Role.ROLE_USER, parts=[Part(text="x")], context_id=session_id)
    v1 = a2a_pb2_grpc.A2AServiceStub(http.client.channel)  # type: ignore[no-untyped-call]
    with pytest.raises(aio.AioRpcError) as raised:
        await v1.SendMessage(SendMessageRequest(message=message), metadata=md)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, raised.value.details()
    old = a2a_v0_3_pb2_grpc.A2AServiceStub(http.client.channel)  # type: ignore[no-untyped-call]
    request = v03.SendMessageRequest(
        request=v03.Message(message_id="r-3", role=v03.ROLE_USER, content=[v03.Part(text="x")])
    )
    with pytest.raises(aio.AioRpcError) as raised:
        await old.SendMessage(request, metadata=md)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, raised.value.details()
    assert await http.messages() == 0


async def test_grpc_bindings_need_a_token_and_show_in_reflection() -> None:
    async with running_server() as client:
        stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for response in stub.ServerReflectionInfo(requests()):
            names = {s.name for s in response.list_services_response.service}
            break
        assert {"lf.a2a.v1.A2AService", "a2a.v1.A2AService"} <= names
        from a2a.types import GetTaskRequest, a2a_pb2_grpc

        a2a = a2a_pb2_grpc.A2AServiceStub(client.channel)  # type: ignore[no-untyped-call]
        with pytest.raises(aio.AioRpcError) as raised:
            await a2a.GetTask(GetTaskRequest(id="x"))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(aio.AioRpcError) as raised:
            await a2a.GetTask(GetTaskRequest(id="x"), metadata=await client.md())
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


_ = SIGNING_ENV


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ("nan", "request.content[1].data.data.n"),
        ("inf", "request.content[1].data.data.n"),
        ("file bytes not base64", "request.content[1].file.file_with_bytes"),  # found by a fuzzer
    ],
)
async def test_a2a_0_3_grpc_refuses_what_its_conversion_cannot_take_naming_the_field(
    bad: str, field: str
) -> None:
    async with running_server() as client:
        request = v03.SendMessageRequest(
            request=v03.Message(message_id="m-1", role=v03.ROLE_USER, content=[v03.Part(text="hi")])
        )
        if bad == "file bytes not base64":
            request.request.content.add().file.file_with_bytes = bytes([0x12, 0x40, 0x93, 0xBA, 0x0C])
        else:
            request.request.content.add().data.data["n"] = float(bad)
        md = await client.md()
        unary = client.channel.unary_unary(
            "/a2a.v1.A2AService/SendMessage",
            request_serializer=v03.SendMessageRequest.SerializeToString,
            response_deserializer=v03.SendMessageResponse.FromString,
        )
        streaming = client.channel.unary_stream(
            "/a2a.v1.A2AService/SendStreamingMessage",
            request_serializer=v03.SendMessageRequest.SerializeToString,
            response_deserializer=v03.StreamResponse.FromString,
        )
        with pytest.raises(aio.AioRpcError) as refused:
            await unary(request, metadata=md, timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(refused)[1] == field
        with pytest.raises(aio.AioRpcError) as refused_stream:
            async for _ in streaming(request, metadata=md, timeout=5):
                pass
        assert refused_stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        listed = await client.messages.ListMessages(message_service_pb2.ListMessagesRequest(), metadata=md)
        assert len(listed.messages) == 0


async def test_bodies_a_client_got_wrong_are_not_logged_as_server_errors(
    http: Http, caplog: pytest.LogCaptureFixture
) -> None:
    # found from outside: each such request logged an ERROR with a 10-30 line traceback from a2a-sdk
    # (and a WARNING with the client's data), unthrottled, for any caller with a token
    caplog.set_level(logging.INFO)
    bodies: list[Any] = [
        [],
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "2.0", "id": 1, "method": "tasks/get", "params": [1]},
        {"jsonrpc": "2.0", "id": {"x": 1}, "method": "tasks/get", "params": {"id": "t"}},
        send_v03(parts=[{"kind": "nonsense"}]),
    ]
    for body in bodies:
        for path in JSONRPC_PATHS:
            error = await http.rpc_error(body, path=path)
            assert error["code"] in (-32600, -32601, -32602), error
    noisy = [r for r in caplog.records if r.name.startswith("a2a.") and r.levelno >= logging.WARNING]
    assert noisy == [], [(r.name, r.levelname, r.getMessage()[:80]) for r in noisy]
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("a2a."))
