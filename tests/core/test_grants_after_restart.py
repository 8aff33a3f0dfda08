"""Approvals given for a session or for always still hold after a restart on the same SQLite file.

The answers are stored with their requests; at start-up the mesh applies them again
(a session grant only while its session is open).
"""

from __future__ import annotations

from pathlib import Path

from svantic_grpc.core.auth import Caller, Scope, TokenSettings
from svantic_grpc.core.clock import ManualClock
from svantic_grpc.core.inputs.model import Decision, InputKind, Resolution, Surface, ToolCall
from svantic_grpc.core.inputs.policies import Enforcement, Policy
from svantic_grpc.core.mesh import Mesh, MeshOptions
from svantic_grpc.core.retention import Retention, RetentionSweeper
from svantic_grpc.stores.sqlite import SqliteStore

CALLER = Caller("acme", "acme-full", "terminal", (Scope.FULL,), "tok_1")
POLICIES = (
    Policy("deletes", Enforcement.REQUIRE_APPROVAL, tool="crm.delete_*"),
    Policy("exports", Enforcement.REQUIRE_APPROVAL, tool="crm.export_*"),
)


def mesh_on(path: Path, clock: ManualClock) -> Mesh:
    return Mesh(
        store=SqliteStore(path),
        tokens=TokenSettings(signing_key="k" * 32),
        credentials=(),
        options=MeshOptions(session_ttl_s=0, policies=POLICIES),
        clock=clock,
    )


async def approve(mesh: Mesh, session_id: str, tool: str, policy: str, decision: Decision) -> None:
    request = await mesh.inputs.ask(
        tenant_id="acme",
        session_id=session_id,
        message_id="m1",
        kind=InputKind.TOOL_APPROVAL,
        tool_call=ToolCall(tool, {"ids": [7]}),
        policy=policy,
    )
    await mesh.inputs.resolve(
        tenant_id="acme",
        request_id=request.request_id,
        resolution=Resolution(decision=decision),
        responder="ops",
        surface=Surface.GRPC,
    )


def verdict(mesh: Mesh, session_id: str, tool: str) -> Enforcement:
    return mesh.inputs.policies.decide_tool("acme", session_id, ToolCall(tool)).enforcement


async def test_session_and_always_approvals_hold_after_a_restart(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "mesh.db"
    before = mesh_on(path, clock)
    await before.start()
    try:
        kept = (await before.sessions.init(CALLER)).session_id
        ended = (await before.sessions.init(CALLER)).session_id
        await approve(before, kept, "crm.export_all", "exports", Decision.APPROVE_FOR_SESSION)
        await approve(before, ended, "crm.export_all", "exports", Decision.APPROVE_FOR_SESSION)
        await approve(before, kept, "crm.delete_records", "deletes", Decision.APPROVE_ALWAYS)
        await before.sessions.close(CALLER, ended)
        other = (await before.sessions.init(CALLER)).session_id
    finally:
        await before.stop()

    after = mesh_on(path, clock)
    await after.start()
    try:
        assert verdict(after, other, "crm.delete_contacts") is Enforcement.ALLOW  # always, in any session
        assert verdict(after, kept, "crm.export_all") is Enforcement.ALLOW  # for that session
        assert verdict(after, other, "crm.export_all") is Enforcement.REQUIRE_APPROVAL  # only that one
        assert verdict(after, ended, "crm.export_all") is Enforcement.REQUIRE_APPROVAL  # it closed
    finally:
        await after.stop()


async def test_a_fresh_store_has_no_grants(tmp_path: Path, clock: ManualClock) -> None:
    mesh = mesh_on(tmp_path / "mesh.db", clock)
    await mesh.start()
    try:
        session_id = (await mesh.sessions.init(CALLER)).session_id
        assert verdict(mesh, session_id, "crm.delete_records") is Enforcement.REQUIRE_APPROVAL
        await approve(mesh, session_id, "crm.delete_records", "deletes", Decision.APPROVE)  # just this once
    finally:
        await mesh.stop()
    again = mesh_on(tmp_path / "mesh.db", clock)
    await again.start()
    try:
        assert verdict(again, session_id, "crm.delete_records") is Enforcement.REQUIRE_APPROVAL
    finally:
        await again.stop()


async def test_an_always_approval_outlives_its_session_after_retention_and_a_restart(
    tmp_path: Path, clock: ManualClock
) -> None:
    # found from outside: retention deleted the answer with its session, so the next restart (the
    # first deploy a day after that session closed, on the defaults) asked again
    path = tmp_path / "mesh.db"
    before = mesh_on(path, clock)
    await before.start()
    try:
        given = (await before.sessions.init(CALLER)).session_id
        await approve(before, given, "crm.delete_records", "deletes", Decision.APPROVE_ALWAYS)
        await approve(before, given, "crm.export_all", "exports", Decision.APPROVE_FOR_SESSION)
        await before.sessions.close(CALLER, given)
        clock.advance(2)
        sweeper = RetentionSweeper(store=before.store, clock=clock, retention=Retention(closed_sessions_s=1))
        assert await sweeper.run_once() == 1
        assert await before.store.get_session(tenant_id="acme", session_id=given) is None
    finally:
        await before.stop()

    after = mesh_on(path, clock)
    await after.start()
    try:
        later = (await after.sessions.init(CALLER)).session_id
        assert verdict(after, later, "crm.delete_contacts") is Enforcement.ALLOW  # the tenant's grant
        assert (
            verdict(after, later, "crm.export_all") is Enforcement.REQUIRE_APPROVAL
        )  # went with its session
        assert [r.resolution.decision for r in await after.store.granting_inputs() if r.resolution] == [
            Decision.APPROVE_ALWAYS
        ]
    finally:
        await after.stop()
