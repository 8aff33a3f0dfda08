"""MessageService: in the contract, not served yet.

Every RPC answers UNIMPLEMENTED with reason NOT_YET_SERVED (after checking the
token like every other RPC), so clients can be generated against the whole API
now.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from svantic_grpc.api._context import current_caller
from svantic_grpc.core.errors import Unimplemented
from svantic_grpc.pb import message_service_pb2_grpc as pb_grpc

__all__ = ["MessageServicer"]


def _not_yet(rpc: str) -> Unimplemented:
    current_caller()
    return Unimplemented(f"MessageService.{rpc} is not served by this version yet", reason="NOT_YET_SERVED")


class MessageServicer(pb_grpc.MessageServiceServicer):
    async def SendMessage(self, request: Any, context: aio.ServicerContext) -> Any:
        raise _not_yet("SendMessage")

    async def SendStreamingMessage(self, request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        raise _not_yet("SendStreamingMessage")
        yield  # pragma: no cover - makes this an async generator

    async def Converse(self, request_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        raise _not_yet("Converse")
        yield  # pragma: no cover - makes this an async generator

    async def GetMessage(self, request: Any, context: aio.ServicerContext) -> Any:
        raise _not_yet("GetMessage")

    async def ListMessages(self, request: Any, context: aio.ServicerContext) -> Any:
        raise _not_yet("ListMessages")

    async def CancelMessage(self, request: Any, context: aio.ServicerContext) -> Any:
        raise _not_yet("CancelMessage")

    async def ListPendingInputs(self, request: Any, context: aio.ServicerContext) -> Any:
        raise _not_yet("ListPendingInputs")

    async def ResolveInput(self, request: Any, context: aio.ServicerContext) -> Any:
        raise _not_yet("ResolveInput")
