"""A fast ``dataclasses.replace`` for the frozen records on the message hot path.

``replace`` rebuilds a record through its ``__init__`` (every field looked up,
passed and set again): about a quarter of the mesh's own CPU per message went
there. ``evolve`` copies the instance's attributes and sets the changes, which
gives the same record for classes whose ``__init__`` only assigns fields, i.e.
frozen dataclasses without ``__post_init__`` (checked; others go to ``replace``).
A slotted record has no ``__dict__``: its slots are set through their descriptors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["evolve"]

T = TypeVar("T")

_FIELDS: dict[type, frozenset[str] | None] = {}
"""Per class: its init fields when ``evolve`` may copy it, ``None`` when it must use ``replace``."""
_SLOTS: dict[type, tuple[tuple[str, Any], ...]] = {}
"""Per slotted class: each field's name and slot descriptor."""


def evolve(record: T, **changes: Any) -> T:
    """``dataclasses.replace(record, **changes)``, without running ``__init__`` when it only assigns.

    Raises:
        TypeError: a name in ``changes`` is not a field of the record (as ``replace`` does).
    """
    cls = type(record)
    names = _FIELDS.get(cls)
    if names is None and cls not in _FIELDS:
        names = _FIELDS[cls] = _copyable_fields(cls)
    if names is None:
        return dataclasses.replace(record, **changes)  # type: ignore[type-var]
    if not names.issuperset(changes):  # no set built on the way that succeeds
        unknown = changes.keys() - names
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    copy = object.__new__(cls)
    slots = _SLOTS.get(cls)
    if slots is not None:
        for name, slot in slots:
            slot.__set__(copy, changes[name] if name in changes else slot.__get__(record))
        return copy
    attributes = copy.__dict__
    attributes.update(record.__dict__)
    attributes.update(changes)
    return copy


def _copyable_fields(cls: type) -> frozenset[str] | None:
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or hasattr(cls, "__post_init__"):
        return None
    fields = dataclasses.fields(cls)
    if any(not f.init for f in fields):
        return None
    if "__slots__" in cls.__dict__:
        if any(base.__dict__.get("__slots__") for base in cls.__mro__[1:]):
            return None  # slots inherited from a base: leave it to ``replace``
        _SLOTS[cls] = tuple((f.name, cls.__dict__[f.name]) for f in fields)
    elif hasattr(cls, "__slots__"):
        return None
    return frozenset(f.name for f in fields)
