"""The authenticated caller of the current RPC.

The auth interceptor sets it before the servicer runs, in the RPC's own task,
so servicers read it without threading it through every signature.
"""

from __future__ import annotations

import contextvars
from urllib.parse import unquote

from svantic_grpc.core.auth import Caller
from svantic_grpc.core.errors import Unauthenticated

__all__ = ["current_caller", "peer_host", "set_caller"]

_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("svantic_caller", default=None)


set_caller = _caller.set
"""Make ``caller`` (or ``None``) the caller of this RPC (the variable's own ``set``: no call between)."""


def current_caller() -> Caller:
    """The caller of this RPC; ``Unauthenticated`` if none was established."""
    caller = _caller.get()
    if caller is None:
        raise Unauthenticated("this call needs an authorization: Bearer <token> header", reason="NO_TOKEN")
    return caller


def peer_host(peer: str | None) -> str:
    """The host of a gRPC peer string: ``ipv4:127.0.0.1:5000`` -> ``127.0.0.1``,
    ``ipv6:%5B::1%5D:5000`` -> ``::1``; other kinds (``unix:``) as they are; ``""`` when unknown."""
    if not peer:
        return ""
    kind, _, address = unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rpartition(":")[0].strip("[]")
    return peer
