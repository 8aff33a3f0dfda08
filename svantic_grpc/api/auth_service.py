"""AuthService: credentials for tokens."""

from __future__ import annotations

from grpc import aio

from svantic_grpc.api import _wkt
from svantic_grpc.api._context import peer_host
from svantic_grpc.core.mesh import Mesh
from svantic_grpc.pb import auth_service_pb2 as pb
from svantic_grpc.pb import auth_service_pb2_grpc as pb_grpc

__all__ = ["AuthServicer"]


class AuthServicer(pb_grpc.AuthServiceServicer):
    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    async def GetToken(
        self, request: pb.GetTokenRequest, context: aio.ServicerContext
    ) -> pb.GetTokenResponse:
        issued = await self._mesh.tokens.issue(
            client_id=request.client_id,
            client_secret=request.client_secret,
            agent_type=request.agent_type,
            expires_in=request.expires_in,
            scopes=request.scopes,
            peer=peer_host(context.peer()),
        )
        return pb.GetTokenResponse(
            token=issued.token,
            token_type="Bearer",
            expires_at=_wkt.timestamp(issued.expires_at),
            tenant_id=issued.tenant_id,
            scopes=[s.value for s in issued.scopes],
            token_id=issued.token_id,
        )

    async def GetDispatchKeys(
        self, request: pb.GetDispatchKeysRequest, context: aio.ServicerContext
    ) -> pb.GetDispatchKeysResponse:
        keys = self._mesh.dispatch_tokens
        return pb.GetDispatchKeysResponse(issuer=keys.issuer, jwks=_wkt.struct(keys.jwks()))
