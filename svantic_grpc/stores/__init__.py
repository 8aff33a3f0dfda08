"""Stores: where the mesh keeps its state."""

from svantic_grpc.stores.base import SessionPage, Store
from svantic_grpc.stores.memory import MemoryStore

__all__ = ["MemoryStore", "SessionPage", "Store", "open_store"]


def open_store(uri: str) -> Store:
    """The store named by a settings value: ``memory`` (the default).

    Raises:
        ValueError: the value names no store this build has.
    """
    if uri in ("", "memory", "memory://"):
        return MemoryStore()
    raise ValueError(f"unknown store {uri!r}: use 'memory' (sqlite lands with the durability work)")
