"""A burst of calls far beyond what the server takes up at once (outside review 6, V3)."""

import asyncio
import contextlib

import grpc
import pytest
from grpc import aio

from svantic_grpc.pb import session_service_pb2, session_service_pb2_grpc
from tests._support import error_details, running_server

BURST = 3000
LIVE = 100  # max_streams_per_tenant: the rest of the burst is refused, so every refused call ends


@pytest.mark.parametrize("connections", [1, 15])
async def test_a_burst_of_streams_is_refused_with_a_reason_and_another_client_is_still_answered(
    connections: int,
) -> None:
    """3,000 WatchSession opened at once (on one connection, or spread over 15) used to reach grpc
    core's queue of calls not yet taken up by the server: past 1,000 queued, core cancelled
    arriving calls at random with status CANCELLED and no reason, another client's calls among
    them. Every call of the burst past the tenant's limit is refused with RESOURCE_EXHAUSTED
    TOO_MANY_STREAMS; a call from another client on its own connection during the burst is
    answered, and so is the burst's own client on the burst's connections once it holds the most
    streams it may."""
    async with running_server(max_streams_per_tenant=LIVE) as client, contextlib.AsyncExitStack() as stack:
        md = await client.md()
        init = session_service_pb2.InitSessionRequest()
        sid = (await client.sessions.InitSession(init, metadata=md)).session
        globex = await client.md("globex-full")

        async def connection() -> session_service_pb2_grpc.SessionServiceStub:
            # Its own connection (not the process-wide shared one), as another client's would be.
            channel = await stack.enter_async_context(
                aio.insecure_channel(client.server.target, options=[("grpc.use_local_subchannel_pool", 1)])
            )
            return session_service_pb2_grpc.SessionServiceStub(channel)

        other = await connection()
        theirs = (await other.InitSession(init, metadata=globex)).session
        burst = [client.sessions] if connections == 1 else [await connection() for _ in range(connections)]
        request = session_service_pb2.WatchSessionRequest(session_id=sid.session_id)
        calls = [burst[i % connections].WatchSession(request, metadata=md) for i in range(BURST)]
        try:
            refused_all, ended_count = asyncio.Event(), [0]

            def one_ended(_: object) -> None:
                ended_count[0] += 1
                if ended_count[0] == BURST - LIVE:
                    refused_all.set()

            ends = [asyncio.ensure_future(call.code()) for call in calls]
            for end in ends:
                end.add_done_callback(one_ended)
            get_theirs = session_service_pb2.GetSessionRequest(session_id=theirs.session_id)
            answer = await asyncio.wait_for(other.GetSession(get_theirs, metadata=globex), 25)
            assert answer.session.session_id == theirs.session_id
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(refused_all.wait(), 20)
            ended = [call for call, end in zip(calls, ends, strict=True) if end.done()]
            codes: dict[grpc.StatusCode, int] = {}
            for call in ended:
                code = await call.code()
                codes[code] = codes.get(code, 0) + 1
            assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED: BURST - LIVE}
            assert {error_details(await _error(call))[0] for call in ended} == {"TOO_MANY_STREAMS"}
            # The burst's own connections, holding their tenant's streams, still take other calls.
            get_mine = session_service_pb2.GetSessionRequest(session_id=sid.session_id)
            for stub in burst:
                mine = await asyncio.wait_for(stub.GetSession(get_mine, metadata=md), 10)
                assert mine.session.session_id == sid.session_id
        finally:
            for call in calls:
                call.cancel()


async def _error(call: aio.UnaryStreamCall) -> aio.AioRpcError:
    try:
        await call.read()
    except aio.AioRpcError as error:
        return error
    raise AssertionError("the call ended without an error")
