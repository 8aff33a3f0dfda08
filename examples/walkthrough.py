"""The "Managing sessions" walkthrough, done with a gRPC client.

Start the server (`svantic-grpc serve`) in one terminal, then run
`python examples/walkthrough.py [host:port]`. It authenticates with the
development credential, opens a session with a self-join, registers a remote
agent, invites it, lists the session's agents, and closes the session.

The server picks the session's id (``InitSession`` without ``session_id``), so the
walkthrough can run any number of times on one server: a session id, once used,
stays taken in its tenant, even after the session closed.
"""

from __future__ import annotations

import asyncio
import sys

from grpc import aio

from svantic_grpc.pb import agent_types_pb2 as agent_types
from svantic_grpc.pb import auth_service_pb2 as auth
from svantic_grpc.pb import registry_service_pb2 as registry
from svantic_grpc.pb import session_service_pb2 as sessions
from svantic_grpc.pb.auth_service_pb2_grpc import AuthServiceStub
from svantic_grpc.pb.registry_service_pb2_grpc import RegistryServiceStub
from svantic_grpc.pb.session_service_pb2_grpc import SessionServiceStub


async def main(target: str) -> None:
    async with aio.insecure_channel(target) as channel:
        # 1. Authenticate: exchange the tenant credential for a JWT.
        token = await AuthServiceStub(channel).GetToken(
            auth.GetTokenRequest(client_id="svantic", client_secret="your-secret", agent_type="a2ui-terminal")
        )
        md = (("authorization", f"Bearer {token.token}"),)
        session_api, registry_api = SessionServiceStub(channel), RegistryServiceStub(channel)

        # 2. Create a session and self-join as the terminal. Without session_id the server
        #    picks one (ses_...); a given one must be new to the tenant.
        created = await session_api.InitSession(
            sessions.InitSessionRequest(self_agent_type="a2ui-terminal", self_instance_id="term-001"),
            metadata=md,
        )
        session_id = created.session.session_id
        print("session", session_id, "with", len(created.session.agents), "agents")

        # 3. Register a remote agent: declares availability, joins nothing yet.
        await registry_api.RegisterAgent(
            registry.RegisterAgentRequest(
                agent_type="transcript-link", instance_id="tl-pod-1", url="http://localhost:4100"
            ),
            metadata=md,
        )

        # 4. Invite it; without instance_id the mesh would pick the least-loaded one.
        invited = await session_api.InviteAgent(
            sessions.InviteAgentRequest(session_id=session_id, agent_type="transcript-link"),
            metadata=md,
        )
        print("invited", invited.agent.instance_id)

        # 5. Who is in the session, and how they joined.
        listed = await session_api.ListSessionAgents(
            sessions.ListSessionAgentsRequest(session_id=session_id), metadata=md
        )
        for agent in listed.agents:
            reason = agent_types.JoinReason.Name(agent.join_reason).removeprefix("JOIN_REASON_").lower()
            print(f"  {agent.agent_type:22} {agent.instance_id:50} {reason}")

        # 6. Close it: internal agents shut down, tl-pod-1 is released.
        closed = await session_api.CloseSession(
            sessions.CloseSessionRequest(session_id=session_id), metadata=md
        )
        print("closed:", closed.session.close_reason)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))
