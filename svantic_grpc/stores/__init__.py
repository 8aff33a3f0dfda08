"""Stores: implementations of the core's store seam (``svantic_grpc.core.store.Store``)."""

from svantic_grpc.core.store import Store
from svantic_grpc.stores.memory import MemoryStore

__all__ = ["MemoryStore", "open_store"]


def open_store(uri: str, *, postgres_schema: str = "svantic", pool_size: int = 10) -> Store:
    """The store named by a settings value, not yet connected (``await store.connect()``).

    ``memory`` (the default), ``sqlite:///absolute/path.db`` (``sqlite://relative.db``) or
    ``postgresql://user@host:port/db`` (tables in ``postgres_schema``, pool of ``pool_size``).

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
    if uri.startswith(("postgresql://", "postgres://")):
        from svantic_grpc.stores.postgres import PostgresStore  # asyncpg only when asked for

        return PostgresStore(uri, schema=postgres_schema, pool_size=pool_size)
    raise ValueError(
        f"unknown store {uri!r}: use 'memory', 'sqlite:///path/to/mesh.db' or 'postgresql://user@host/db'"
    )
