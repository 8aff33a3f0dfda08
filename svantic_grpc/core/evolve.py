"""A fast ``dataclasses.replace`` for the frozen records on the message hot path.

``replace`` rebuilds a record through its ``__init__`` (every field looked up,
passed and set again): about a quarter of the mesh's own CPU per message went
there. ``evolve`` copies the instance's attributes and sets the changes, which
gives the same record for classes whose ``__init__`` only assigns fields, i.e.
frozen dataclasses without ``__post_init__`` (checked; others go to ``replace``).
A slotted record has no ``__dict__``: its slots are set through their descriptors, by a copier made
once per class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["evolve"]

T = TypeVar("T")

_FIELDS: dict[type, frozenset[str] | None] = {}
"""Per class: its init fields when ``evolve`` may copy it, ``None`` when it must use ``replace``."""
_COPIERS: dict[type, Callable[[Any, dict[str, Any]], Any]] = {}
"""Per slotted class: its copier (``_copier``)."""


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
    copier = _COPIERS.get(cls)
    if copier is not None:
        return copier(record, changes)  # type: ignore[no-any-return]
    copy = object.__new__(cls)
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
        _COPIERS[cls] = _copier(cls, [f.name for f in fields])
    elif hasattr(cls, "__slots__"):
        return None
    return frozenset(f.name for f in fields)


def _copier(cls: type, names: list[str]) -> Callable[[Any, dict[str, Any]], Any]:
    """``copy(record, changes)`` for a slotted class: each slot set from the record in straight-line
    code, then the changes (a loop over the fields, each looked up in ``changes``, cost twice as much:
    a session is copied three times on its way from open to close)."""
    setters = {name: cls.__dict__[name].__set__ for name in names}
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_setters": setters}
    lines = ["def copy(record, changes):", "    new = _new(_cls)"]
    for number, name in enumerate(names):
        namespace[f"_set{number}"] = setters[name]
        lines.append(f"    _set{number}(new, record.{name})")
    lines.append("    for name, value in changes.items():")
    lines.append("        _setters[name](new, value)")
    lines.append("    return new")
    exec("\n".join(lines), namespace)  # names are a dataclass's fields: identifiers
    return namespace["copy"]  # type: ignore[no-any-return]
