"""Stores: implementations of the core's store seam (``svantic_grpc.core.store.Store``)."""

from svantic_grpc.core.store import Store
from svantic_grpc.stores.memory import MemoryStore

__all__ = ["MemoryStore", "open_store"]


def open_store(uri: str) -> Store:
    """The store named by a settings value, not yet connected (``await store.connect()``).

    ``memory`` (the default) or ``sqlite:///absolute/path.db`` (``sqlite://relative.db``).

    Raises:
        ValueError: the value names no store this build has.
    """
    if uri in ("", "memory", "memory://"):
        return MemoryStore()
    if uri.startswith("sqlite://"):
        path = uri.removeprefix("sqlite://")
        if not path or path == "/":
            raise ValueError(f"{uri!r} names no file: use sqlite:///absolute/path.db")
        from svantic_grpc.stores.sqlite import SqliteStore  # aiosqlite only when asked for

        return SqliteStore(path)
    raise ValueError(f"unknown store {uri!r}: use 'memory' or 'sqlite:///path/to/mesh.db'")
