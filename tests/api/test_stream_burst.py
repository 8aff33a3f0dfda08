"""A burst of calls far beyond what the server takes up at once (outside review 6, V3)."""

import asyncio
import time

import grpc
from grpc import aio

from svantic_grpc.pb import session_service_pb2, session_service_pb2_grpc
from tests._support import error_details, running_server

BURST = 3000
LIVE = 100  # max_streams_per_tenant: the rest of the burst is refused, so every refused call ends


async def test_a_burst_of_streams_is_refused_with_a_reason_and_another_client_is_still_answered() -> None:
    """3,000 WatchSession opened at once on one connection used to reach grpc core's queue of calls
    not yet taken up by the server: past 1,000 queued, core cancelled arriving calls at random with
    status CANCELLED and no reason, another client's calls among them. Every call of the burst past
    the tenant's limit is refused with RESOURCE_EXHAUSTED TOO_MANY_STREAMS, and a call from another
    client on its own connection during the burst is answered."""
    async with running_server(max_streams_per_tenant=LIVE) as client:
        md = await client.md()
        sid = (await client.sessions.InitSession(session_service_pb2.InitSessionRequest(), metadata=md)).session
        globex = await client.md("globex-full")
        # Its own connection (not the process-wide shared one), as another client's would be.
        async with aio.insecure_channel(
            client.server.target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as other_channel:
            other = session_service_pb2_grpc.SessionServiceStub(other_channel)
            theirs = (await other.InitSession(session_service_pb2.InitSessionRequest(), metadata=globex)).session
            request = session_service_pb2.WatchSessionRequest(session_id=sid.session_id)
            calls = [client.sessions.WatchSession(request, metadata=md) for _ in range(BURST)]
            try:
                ends = [asyncio.ensure_future(call.code()) for call in calls]
                answer = await asyncio.wait_for(
                    other.GetSession(
                        session_service_pb2.GetSessionRequest(session_id=theirs.session_id), metadata=globex
                    ),
                    25,
                )
                assert answer.session.session_id == theirs.session_id
                deadline = time.monotonic() + 20
                while sum(end.done() for end in ends) < BURST - LIVE and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                ended = [call for call, end in zip(calls, ends, strict=True) if end.done()]
                codes: dict[grpc.StatusCode, int] = {}
                for call in ended:
                    code = await call.code()
                    codes[code] = codes.get(code, 0) + 1
                assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED: BURST - LIVE}
                assert {error_details(await _error(call))[0] for call in ended} == {"TOO_MANY_STREAMS"}
            finally:
                for call in calls:
                    call.cancel()


async def _error(call: aio.UnaryStreamCall) -> aio.AioRpcError:
    try:
        await call.read()
    except aio.AioRpcError as error:
        return error
    raise AssertionError("the call ended without an error")
