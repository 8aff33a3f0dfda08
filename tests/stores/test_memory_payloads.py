"""The memory store keeps the event payloads it knows to be immutable without copying them: each
must be one ``detach`` shares as it is (nothing mutable inside, checked by the contract suite)."""

from __future__ import annotations

from svantic_grpc.stores import _copy, memory


def test_payloads_kept_uncopied_are_those_detach_shares() -> None:
    assert set(_copy._SHARED) >= memory._FROZEN_PAYLOADS
