"""SessionService: each RPC builds the caller, calls one core method, converts the result."""

from __future__ import annotations

from grpc import aio

from svantic_grpc.api import convert
from svantic_grpc.api._context import current_caller
from svantic_grpc.api._event_bytes import SerializedEvents
from svantic_grpc.api.convert_messages import message_to_pb
from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.mesh import Mesh
from svantic_grpc.core.messages.model import Message
from svantic_grpc.core.models import Session, SessionStatus
from svantic_grpc.pb import session_service_pb2 as pb
from svantic_grpc.pb import session_service_pb2_grpc as pb_grpc
from svantic_grpc.pb import session_types_pb2

__all__ = ["HISTORY_MAX_BYTES", "HISTORY_MAX_MESSAGES", "SessionServicer"]

HISTORY_MAX_MESSAGES = 100
"""GetSession's ``history`` holds at most the session's first this many messages..."""
HISTORY_MAX_BYTES = 1 << 20
"""...and only as many as fit in this many bytes, well under gRPC's default 4 MiB message limit."""


class SessionServicer(pb_grpc.SessionServiceServicer):
    def __init__(self, mesh: Mesh) -> None:
        self._sessions = mesh.sessions
        self._messages = mesh.messages
        self._converted = SerializedEvents(
            lambda event: pb.WatchSessionResponse(event=convert.event(event)).SerializeToString()
        )

    def _session(
        self,
        record: Session,
        *,
        include_agents: bool = True,
        into: session_types_pb2.Session | None = None,
    ) -> session_types_pb2.Session:
        return convert.session(
            record, expires_at=self._sessions.expires_at(record), include_agents=include_agents, into=into
        )

    async def InitSession(
        self, request: pb.InitSessionRequest, context: aio.ServicerContext
    ) -> pb.InitSessionResponse:
        session = await self._sessions.init(
            current_caller(),
            session_id=request.session_id,
            user_id=request.user_id,
            self_agent_type=request.self_agent_type,
            self_instance_id=request.self_instance_id,
        )
        response = pb.InitSessionResponse()
        # Filled in place (no copy of the session), by ``convert.session`` itself: every session is
        # opened here and closed below, a wrapper's call less on each.
        ttl_s = self._sessions.ttl_s
        convert.session(
            session, expires_at=session.last_activity_at + ttl_s if ttl_s else None, into=response.session
        )
        return response

    async def GetSession(
        self, request: pb.GetSessionRequest, context: aio.ServicerContext
    ) -> pb.GetSessionResponse:
        caller = current_caller()
        session = await self._sessions.get(caller, request.session_id)
        response = pb.GetSessionResponse(
            session=self._session(session, include_agents=request.include_agents)
        )
        if request.include_history:
            page = await self._messages.list_messages(
                caller, session_id=session.session_id, page_size=HISTORY_MAX_MESSAGES
            )
            complete = _fill_history(response.session, page.messages)
            response.session.history_truncated = not complete or bool(page.next_cursor)
        return response

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        statuses: list[SessionStatus] = []
        for index, value in enumerate(request.statuses):
            if value == session_types_pb2.SESSION_STATUS_UNSPECIFIED:
                continue  # documented as "any status"
            status = convert.SESSION_STATUS_FROM_PB.get(value)
            if status is None:
                raise InvalidArgument(f"statuses[{index}]", f"unknown session status {value}")
            statuses.append(status)
        if len(statuses) < len(request.statuses):
            statuses = []  # "any" in the filter widens it to everything
        page = await self._sessions.list_sessions(
            current_caller(), statuses=statuses, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListSessionsResponse(
            sessions=[self._session(s, include_agents=False) for s in page.sessions],
            next_page_token=page.next_cursor,
        )

    async def InviteAgent(
        self, request: pb.InviteAgentRequest, context: aio.ServicerContext
    ) -> pb.InviteAgentResponse:
        agent = await self._sessions.invite(
            current_caller(),
            request.session_id,
            agent_type=request.agent_type,
            instance_id=request.instance_id,
        )
        return pb.InviteAgentResponse(session_id=request.session_id, agent=convert.session_agent(agent))

    async def ListSessionAgents(
        self, request: pb.ListSessionAgentsRequest, context: aio.ServicerContext
    ) -> pb.ListSessionAgentsResponse:
        agents = await self._sessions.agents(
            current_caller(), request.session_id, include_departed=request.include_departed
        )
        return pb.ListSessionAgentsResponse(
            session_id=request.session_id, agents=[convert.session_agent(a) for a in agents]
        )

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        session, closed_now = await self._sessions.close(
            current_caller(), request.session_id, reason=request.reason
        )
        response = pb.CloseSessionResponse(closed_now=closed_now)
        # Without its agents: a closed session has none present (``Session.agents``), as
        # ListSessionAgents says; GetSession with include_agents lists those that left. Closed, it
        # expires no more (``Sessions.expires_at``).
        convert.session(session, expires_at=None, include_agents=False, into=response.session)
        return response

    async def WatchSession(self, request: pb.WatchSessionRequest, context: aio.ServicerContext) -> None:
        # A coroutine writing each response, not an async generator yielding it: with a
        # thousand watchers every event passes through each stream's handler, and a
        # generator here would go through the interceptor's and telemetry's generators too
        # (three more hops per event and watcher); a coroutine is wrapped once per call.
        events = await self._sessions.watch(
            current_caller(), request.session_id, after_sequence=request.after_sequence
        )
        converted = self._converted
        async for event in events:
            await context.write(converted.response(event))


def _fill_history(session: session_types_pb2.Session, messages: tuple[Message, ...]) -> bool:
    """Add ``messages`` to ``session.history`` while they fit in HISTORY_MAX_BYTES; False if one did not."""
    size = 0
    for message in messages:
        converted = message_to_pb(message)
        size += converted.ByteSize()
        if size > HISTORY_MAX_BYTES:
            return False
        session.history.append(converted)
    return True
