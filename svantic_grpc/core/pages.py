"""Page tokens: a store's cursor bound to the list that gave it.

A store's cursor says where a page ends (a time and a key); on its own it would be taken as a
position by any list, of any tenant, with any filters. A client that keeps a token and changes its
request (another session, other states, another list) would then get a page that silently starts
at the wrong place. The token a list hands out carries a digest of what it lists (the list, the
tenant, the filters) beside the cursor, and a token given with another request is refused naming
``page_token``, as AIP-158 asks. No data could cross either way (every read is filtered by the
caller's tenant); what the binding adds is an error where a client would otherwise be misled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from svantic_grpc.core.errors import InvalidArgument

__all__ = ["PageScope"]

_SEPARATOR = "."
_DIGEST_CHARS = 16


@dataclass(frozen=True, slots=True)
class PageScope:
    """What one list request lists: the list, the caller's tenant and the request's filters."""

    list_name: str
    tenant_id: str
    filters: tuple[str, ...] = ()
    _digest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        scope = json.dumps([self.list_name, self.tenant_id, *self.filters], separators=(",", ":"))
        digest = hashlib.blake2s(scope.encode(), digest_size=_DIGEST_CHARS // 2).hexdigest()
        object.__setattr__(self, "_digest", digest)

    def token(self, cursor: str) -> str:
        """The token handed to the client for the store's ``cursor`` (empty stays empty: the last
        page)."""
        return self._digest + _SEPARATOR + cursor if cursor else ""

    def cursor(self, token: str) -> str:
        """The store's cursor in ``token``; ``InvalidArgument`` on ``page_token`` for a token this
        list did not give for the same tenant and filters."""
        if not token:
            return ""
        digest, separator, cursor = token.partition(_SEPARATOR)
        if not separator or len(digest) != _DIGEST_CHARS or not cursor:
            raise InvalidArgument("page_token", "is not a page token this server issued")
        if digest != self._digest:
            raise InvalidArgument(
                "page_token",
                f"was given by another list or with other filters than this {self.list_name} "
                "request: send the same filters, or start again without a page token",
            )
        return cursor
