"""Raising, answering, expiring and cancelling input requests.

Answering is one compare-and-set on the stored request (its version), so the
first resolution wins whichever surface it comes from, even across processes
sharing a store; every later attempt gets ``AlreadyResolved`` naming the winner.
A request, its audit record, its session event and the session's paused/active
status are one store write (``Sessions.write_inputs``), so a crash leaves all of
them or none. Every outcome is then told to the adapters and wakes the message
that waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from svantic_grpc.core._locks import KeyedLock
from svantic_grpc.core._tasks import to_the_end
from svantic_grpc.core._validate import check_id, check_json_depth, json_bytes
from svantic_grpc.core.auth import Caller, Scope
from svantic_grpc.core.clock import Clock, IdGenerator
from svantic_grpc.core.errors import (
    Conflict,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    session_not_found,
)
from svantic_grpc.core.events import EventBus, EventPayload, InputEnded, InputRaised
from svantic_grpc.core.inputs.checks import (
    already_answered,
    check_answer_size,
    check_ask,
    checked_resolution,
    outcome_text,
)
from svantic_grpc.core.inputs.model import (
    APPROVAL_DECISIONS,
    Decision,
    Form,
    InputKind,
    InputRequest,
    InputState,
    PlanItem,
    Resolution,
    Surface,
    ToolCall,
    check_responder,
    speaks_for,
)
from svantic_grpc.core.inputs.policies import PolicyEngine
from svantic_grpc.core.messages.model import Message
from svantic_grpc.core.metrics import NO_METRICS, Metrics
from svantic_grpc.core.models import SessionStatus
from svantic_grpc.core.pages import PageScope
from svantic_grpc.core.reaper import IdleReaper
from svantic_grpc.core.store import AuditRecord, Change, Changed, InputPage, Store, as_stored, fitting
from svantic_grpc.core.tracing import NO_TRACING, Tracing

__all__ = ["InputListener", "Inputs", "WaitingMessage"]

_log = logging.getLogger(__name__)

_TELL_AGAIN_AT_ONCE = 16
"""Outcomes told again at once (``start_telling``, a take-over)."""

WaitingMessage = Callable[[InputRequest], tuple[Message, tuple[EventPayload, ...], Callable[[Message], None]]]
"""A message to wait on a request being raised: given the request, the message as it is to be
written, its events, and what to tell once it is stored (``MessageWriter.waiting_on``)."""


class InputListener(Protocol):
    """Told of every new pending request and every outcome (the adapters)."""

    async def on_request(self, request: InputRequest) -> None: ...

    async def on_outcome(self, request: InputRequest) -> None:
        """Returns once the outcome is delivered or given up for good; raises when it was not (the
        adapter stopped first), and the mesh tells it again later."""


class Inputs:
    """Input requests of every session in this process."""

    def __init__(
        self,
        *,
        store: Store,
        write: Callable[..., Awaitable[Changed]],
        clock: Clock,
        ids: IdGenerator,
        policies: PolicyEngine,
        default_ttl_s: float,
        metrics: Metrics = NO_METRICS,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._metrics = metrics
        self._tracing = tracing
        self._store = store
        self._write = write
        """Writes a change to requests with the session's paused/active status (``Sessions.write_inputs``:
        the change, the status's reason, and ``landed``, told what was stored)."""
        self._clock = clock
        self._ids = ids
        self.policies = policies
        self._default_ttl_s = default_ttl_s
        self._locks = KeyedLock()
        self._waiters: dict[tuple[str, str], list[asyncio.Future[InputRequest]]] = {}
        self._listeners: list[InputListener] = []
        self._notifications: set[asyncio.Task[Any]] = set()
        self._pending: dict[tuple[str, str], set[str]] = {}
        """Pending request ids per (tenant, session) in this process: spares store reads on the hot path."""
        self._recovered: list[InputRequest] = []
        """Pending requests start-up recovery kept, announced again to each listener added after it."""
        self.tells_outcomes = False
        """Set (by the adapter host, before recovery) when adapters are to be told outcomes: an
        ended request is then written untold and marked told once they returned, so that an
        outcome in flight when the process died is told again after the restart. Without adapters
        it is written told: nothing to tell again."""
        self.marks_told = True
        """Cleared (by the adapter host) when a configured adapter failed to start: outcomes told
        to the others stay untold for the next start, when it may be back."""
        self._telling = False
        self.tell_again_every_s = 600.0
        """How often outcomes still untold are looked for: one untold at two looks this far apart and
        not being told by this process was dropped (its adapter failed, or the replica telling it
        died), and is told again (at least once, without waiting for a restart)."""
        self._being_told: set[tuple[str, str]] = set()
        """Outcomes this process is telling now (tenant, request)."""
        self._looking: asyncio.Task[None] | None = None
        """Whether the adapters listen yet (``start_telling``): outcomes written before that (start-up
        recovery's withdrawals) stay untold in the store, for ``start_telling`` to find."""
        self.expiry = IdleReaper(clock=clock, close=self._expire, load=self._deadline)
        self.shared: EventBus | None = None
        """With replicas sharing the store: the bus that brings other replicas' answers (a request
        answered elsewhere wakes its waiter here through its ``input_ended`` event)."""

    def add_listener(self, listener: InputListener) -> None:
        """Tell ``listener`` of every new request and outcome from now on, and, at once, of the
        requests still pending that start-up recovery kept: their first announcement may have
        been lost with the process (a crash before an adapter delivered it), so an adapter gets
        them again and drops what it already delivered (at least once)."""
        self._listeners.append(listener)
        for request in self._recovered:
            if request.request_id in self._pending.get((request.tenant_id, request.session_id), ()):
                self._notify("on_request", request, listeners=(listener,))

    # Raising

    async def ask(
        self,
        *,
        tenant_id: str,
        session_id: str,
        message_id: str,
        kind: InputKind,
        tool_call: ToolCall | None = None,
        form: Form | None = None,
        plan: tuple[PlanItem, ...] = (),
        policy: str = "",
        allowed_responders: Iterable[str] = (),
        ttl_s: float | None = None,
        waiting: WaitingMessage | None = None,
    ) -> InputRequest:
        """Raise a pending request for a human; the session pauses until no request is pending.

        ``waiting`` is the message that waits on the request (``MessageWriter.waiting_on``): it
        becomes input-required in the same store write as the request is raised, so a crash never
        leaves a human asked by a message that is still working (recovery would fail it as
        interrupted and withdraw the question).
        """
        check_ask(kind, tool_call, form, plan)
        now = self._clock.now()
        decisions: tuple[Decision, ...] = ()
        if kind is InputKind.TOOL_APPROVAL:
            decisions = APPROVAL_DECISIONS
        elif kind in (InputKind.PLAN_APPROVAL, InputKind.CONFIRMATION):
            decisions = (Decision.APPROVE, Decision.DENY)  # grants only come from policy approvals
        draft = InputRequest(
            tenant_id=tenant_id,
            request_id=self._ids.new_id("inp_"),
            session_id=session_id,
            message_id=message_id,
            kind=kind,
            created_at=now,
            expires_at=now + (ttl_s or self._default_ttl_s),
            tool_call=tool_call,
            form=form,
            plan=plan,
            allowed_decisions=decisions,
            allowed_responders=tuple(allowed_responders),
            policy=policy,
        )
        # The request, its input_raised event, the message waiting on it and the session paused: one write.
        change = Change(
            tenant_id, session_id, inputs=(draft,), events=(InputRaised(as_stored(draft).for_watchers()),)
        )
        landed: Callable[[Changed], None] | None = None
        if waiting is not None:
            message, events, stored = waiting(draft)
            change = replace(change, messages=(message,), events=(*change.events, *events))

            def landed(written: Changed) -> None:
                stored(written.messages[0])

        written = await self._write(change, f"waiting for a human: {draft.summary}", landed=landed)
        (request,) = written.inputs
        self._pending.setdefault((tenant_id, session_id), set()).add(request.request_id)
        self.expiry.schedule(tenant_id, request.request_id, request.expires_at)
        self._tracing.input_raised(request_id=request.request_id, kind=kind.value, session_id=session_id)
        self._notify("on_request", request)
        return request

    async def decided_by_policy(
        self,
        *,
        tenant_id: str,
        session_id: str,
        message_id: str,
        tool_call: ToolCall,
        decision: Decision,
        policy: str,
        reason: str,
    ) -> InputRequest:
        """Record a tool call a policy decided without a human (allow, block, yolo, a grant)."""
        now = self._clock.now()
        decided = InputRequest(
            tenant_id=tenant_id,
            request_id=self._ids.new_id("inp_"),
            session_id=session_id,
            message_id=message_id,
            kind=InputKind.TOOL_APPROVAL,
            created_at=now,
            expires_at=now,
            tool_call=tool_call,
            policy=policy,
            state=InputState.RESOLVED,
            outcome_told=True,  # nobody is asked, so no adapter is told
            resolution=Resolution(
                decision=decision,
                reason=reason,
                resolved_by=f"policy:{policy}" if policy else "policy",
                surface=Surface.POLICY,
                resolved_at=now,
            ),
        )
        # The decision and its audit record: one write.
        change = Change(tenant_id, session_id, inputs=(decided,), audit=(self._audit_record(decided),))
        (request,) = (await self._store.write(change)).inputs
        return request

    # Answering

    async def resolve_as(
        self,
        caller: Caller,
        request_id: str,
        resolution: Resolution,
        *,
        surface: Surface = Surface.GRPC,
        session_id: str = "",
    ) -> InputRequest:
        """``resolve`` for a caller (``ResolveInput``; ``Converse`` limits it to its own session)."""
        caller.require(Scope.FULL)
        if session_id and (await self.get(caller.tenant_id, request_id)).session_id != session_id:
            raise NotFound(
                f"input request {request_id!r} not found in this session", reason="INPUT_NOT_FOUND"
            )
        return await self.resolve(
            tenant_id=caller.tenant_id,
            request_id=request_id,
            resolution=resolution,
            responder=caller.subject,
            surface=surface,
        )

    async def resolve(
        self, *, tenant_id: str, request_id: str, resolution: Resolution, responder: str, surface: Surface
    ) -> InputRequest:
        """Answer a pending request; the first answer wins (see the module docstring)."""
        with self._tracing.resolution(request_id=request_id, surface=surface.value):
            return await self._resolve(tenant_id, request_id, resolution, responder, surface)

    async def _resolve(
        self, tenant_id: str, request_id: str, resolution: Resolution, responder: str, surface: Surface
    ) -> InputRequest:
        check_id("request_id", request_id)
        check_json_depth("resolution.values", resolution.values)
        check_json_depth("resolution.payload", resolution.payload)
        check_answer_size(resolution)
        check_responder(responder)
        current = await self.get(tenant_id, request_id)
        if current.state is InputState.PENDING and self._clock.now() >= current.expires_at:
            await self._expire(tenant_id, request_id)  # too late, even if the timer has not run yet
        async with self._locks.hold((tenant_id, request_id)):
            request = await self.get(tenant_id, request_id)
            if request.state is not InputState.PENDING:
                raise already_answered(request)
            claimed = speaks_for(responder)
            if claimed is not None and claimed is not surface:
                raise PermissionDenied(
                    f"{responder!r} names a {claimed.value} user: an answer through {surface.value} "
                    f"cannot speak for one (give the responder without the '{claimed.value}:' prefix)",
                    reason="RESPONDER_NOT_ALLOWED",
                )
            if not request.may_answer(responder, surface):
                allowed = ", ".join(request.allowed_responders)
                raise PermissionDenied(
                    f"{responder} may not answer this request; allowed: {allowed}",
                    reason="RESPONDER_NOT_ALLOWED",
                )
            if request.sensitive and surface in (Surface.SLACK, Surface.WEBHOOK):
                raise InvalidArgument(
                    "resolution",
                    "this request has sensitive fields: answer it through the API or the session chat",
                )
            answer = checked_resolution(request, resolution)
            resolved = replace(
                request,
                state=InputState.RESOLVED,
                resolution=replace(
                    answer, resolved_by=responder, surface=surface, resolved_at=self._clock.now()
                ),
            )
            try:
                # Written and followed through (the grant, the waiter, the adapters) even if this
                # caller goes away meanwhile: an answer stored must reach the agent.
                saved = await to_the_end(self._ending(resolved, grant=True))
            except Conflict:
                # Another process answered first: report who won, never overwrite.
                now = await self.get(tenant_id, request_id)
                if now.state is InputState.PENDING:  # nobody did: the session kept changing
                    raise Conflict(
                        f"input request {request_id!r} is still pending: its session changed on "
                        "another replica while this answer was written; send it again",
                        reason="SESSION_CHANGED",
                        metadata={"state": now.state.value},
                    ) from None
                raise already_answered(now) from None
        return saved

    async def _ending(self, ended: InputRequest, *, grant: bool = False) -> InputRequest:
        """Write an ended request (``_end``), then do what follows in this process (``_ended``)."""
        saved = await self._end(ended)
        if grant:
            self._grant(saved)
        self._ended(saved)
        return saved

    def _grant(self, request: InputRequest) -> None:
        """Apply what a tool approval answered beyond its own call (for the session, or always)."""
        decision = request.resolution.decision if request.resolution is not None else None
        if request.kind is not InputKind.TOOL_APPROVAL or request.tool_call is None:
            return
        if decision is Decision.APPROVE_FOR_SESSION:
            self.policies.grant_for_session(
                request.tenant_id, request.session_id, request.tool_call.tool_name
            )
        if decision is Decision.APPROVE_ALWAYS and request.policy:
            self.policies.allow_always(request.tenant_id, request.policy)

    async def approved_always_elsewhere(self, tenant_id: str, policy: str) -> bool:
        """With replicas sharing the store: whether another replica took an ``approve_always`` for
        ``policy`` that this one has not heard of (it applies it from now on). A replica hears of the
        answers it takes and those of the sessions it owns; this is asked only before a human would be."""
        if self.shared is None or not policy:
            return False
        if not await self._store.approved_always(tenant_id=tenant_id, policy=policy):
            return False
        self.policies.allow_always(tenant_id, policy)
        return True

    # Ending without an answer

    async def cancel_for_message(self, tenant_id: str, session_id: str, message_id: str, reason: str) -> None:
        """Withdraw the pending requests of a message that ended (canceled, session closed)."""
        page = await self._store.list_inputs(
            tenant_id=tenant_id,
            session_id=session_id,
            message_id=message_id,
            states=(InputState.PENDING,),
            page_size=500,
        )
        for request in page.requests:
            await self._end_unanswered(tenant_id, request.request_id, InputState.CANCELED, reason)

    async def withdraw(self, tenant_id: str, request_id: str, reason: str) -> None:
        """Cancel one pending request (its message no longer waits for it)."""
        await self._end_unanswered(tenant_id, request_id, InputState.CANCELED, reason)

    async def _expire(self, tenant_id: str, request_id: str) -> None:
        await self._end_unanswered(
            tenant_id, request_id, InputState.EXPIRED, "expired: nobody answered in time"
        )

    async def _deadline(self, tenant_id: str, request_id: str) -> float | None:
        request = await self._store.get_input(tenant_id=tenant_id, request_id=request_id)
        return request.expires_at if request and request.state is InputState.PENDING else None

    async def _end_unanswered(self, tenant_id: str, request_id: str, state: InputState, reason: str) -> None:
        async with self._locks.hold((tenant_id, request_id)):
            request = await self._store.get_input(tenant_id=tenant_id, request_id=request_id)
            if request is None or request.state is not InputState.PENDING:
                return
            try:
                await to_the_end(self._ending(replace(request, state=state, outcome_reason=reason)))
            except Conflict:
                return  # answered meanwhile: that answer stands

    async def _end(self, ended: InputRequest) -> InputRequest:
        """Write an ended request with its audit record, its input_ended event and the session's
        status (active again when nothing else is pending): one store write, all or nothing."""
        ended = replace(ended, outcome_told=not self.tells_outcomes)
        stored = as_stored(ended)
        change = Change(
            ended.tenant_id,
            ended.session_id,
            inputs=(ended,),
            audit=(self._audit_record(stored),),
            events=(InputEnded(stored.for_watchers()),),
        )
        (saved,) = (await self._write(change, f"{ended.summary}: {outcome_text(ended)}")).inputs
        return saved

    def _ended(self, request: InputRequest) -> None:
        """What this process does once an ended request is stored: wake its waiters, tell the adapters."""
        resolution = request.resolution
        ended_at = resolution.resolved_at if resolution is not None else self._clock.now()
        surface = resolution.surface.value if resolution is not None else "mesh"
        self._metrics.input_ended(
            surface=surface, outcome=request.state.value, latency_s=max(ended_at - request.created_at, 0.0)
        )
        _log.info(
            "input request %s %s: %s",
            request.request_id,
            request.state.value,
            outcome_text(request),
            extra={
                "session_id": request.session_id,
                "request_id": request.request_id,
                "surface": surface,
                "outcome": request.state.value,
            },
        )
        self._tracing.input_ended(request_id=request.request_id, outcome=request.state.value, surface=surface)
        self.expiry.forget(request.tenant_id, request.request_id)
        waiting = self._pending.get((request.tenant_id, request.session_id))
        if waiting is not None:
            waiting.discard(request.request_id)
            if not waiting:
                del self._pending[(request.tenant_id, request.session_id)]
        for waiter in self._waiters.pop((request.tenant_id, request.request_id), []):
            if not waiter.done():
                waiter.set_result(request)
        self._tell(request)

    def _tell(self, request: InputRequest) -> None:
        """Tell the listeners an ended request's outcome; one written untold is marked told once
        every listener returned without raising (an adapter returns once it delivered the outcome
        or gave up on it for good), in a write of its own: if the process dies before that, or an
        adapter raised, it is told again later (``_look_for_dropped``) or at the next start (at
        least once)."""
        if request.outcome_told:
            self._notify("on_outcome", request)
        elif self._telling:
            task = asyncio.create_task(
                self._tell_and_mark(request, tuple(self._listeners)), name=f"tell-{request.request_id}"
            )
            self._notifications.add(task)
            task.add_done_callback(self._notifications.discard)
        # else: start-up, before the adapters listen: it stays untold, for ``start_telling``

    async def _tell_and_mark(
        self, request: InputRequest, listeners: Sequence[InputListener], *, again: bool = False
    ) -> None:
        key = (request.tenant_id, request.request_id)
        self._being_told.add(key)
        try:
            await self._tell_and_mark_once(request, listeners, again=again)
        finally:
            self._being_told.discard(key)

    async def _tell_and_mark_once(
        self, request: InputRequest, listeners: Sequence[InputListener], *, again: bool = False
    ) -> None:
        hooks = [
            "on_outcome_again" if again and hasattr(listener, "on_outcome_again") else "on_outcome"
            for listener in listeners
        ]
        told_all = await asyncio.gather(
            *(_call(listener, hook, request) for listener, hook in zip(listeners, hooks, strict=True))
        )
        if not all(told_all) or not self.marks_told:
            # An adapter could not tell it (stopped, failed, not started): told again later, only
            # to those not told (each listener that returned keeps that it was told).
            for listener, ok in zip(listeners, told_all, strict=True):
                if ok and hasattr(listener, "told"):
                    await _call(listener, "told", request)
            return
        told = replace(request, outcome_told=True)
        try:
            await self._store.write(Change(request.tenant_id, request.session_id, inputs=(told,)))
        except Conflict:
            pass  # written again since (deleted by retention, or told and marked by another process)
        except Exception:
            _log.warning(
                "input request %s: its outcome was told, but could not be marked told; it is told "
                "again later",
                request.request_id,
                exc_info=True,
            )

    async def start_telling(self) -> int:
        """Once the adapters listen (start-up): tell them every outcome the store has untold (one
        in flight when a process died, or a withdrawal of start-up recovery), and from now on each
        as it ends. Returns how many were told again."""
        self._telling = True
        untold = list(await self._store.untold_outcomes()) if self.tells_outcomes else []
        self._tell_again(untold)
        if self.tells_outcomes and self._looking is None:
            self._looking = asyncio.create_task(self._look_for_dropped(), name="untold-outcomes")
        return len(untold)

    async def _look_for_dropped(self) -> None:
        """Every ``tell_again_every_s``: tell again what was untold at the last look too and is not
        being told here (an adapter that failed, a replica that died while telling it, its session's
        lease gone with it). One cheap query of a partial index a period."""
        seen: set[tuple[str, str]] = set()
        while True:
            await asyncio.sleep(self.tell_again_every_s)
            try:
                untold = await self._store.untold_outcomes()
            except Exception:
                _log.warning("could not read the outcomes still untold; looking again later", exc_info=True)
                continue
            dropped = [
                r
                for r in untold
                if (r.tenant_id, r.request_id) in seen and (r.tenant_id, r.request_id) not in self._being_told
            ]
            seen = {(r.tenant_id, r.request_id) for r in untold}
            if dropped:
                _log.info("telling the adapters %d outcome(s) again that they were not told", len(dropped))
            self._tell_again(dropped)

    async def tell_untold(self, tenant_id: str, session_id: str) -> None:
        """Tell again the untold outcomes of a session taken over from a replica that died."""
        if self.tells_outcomes and self._telling:
            self._tell_again(
                list(await self._store.untold_outcomes(tenant_id=tenant_id, session_id=session_id))
            )

    def _tell_again(self, untold: list[InputRequest]) -> None:
        """Tell ``untold`` outcomes again, ``_TELL_AGAIN_AT_ONCE`` at a time: after an outage
        there may be many, and the adapters' services limit how fast they take them."""

        window = asyncio.Semaphore(_TELL_AGAIN_AT_ONCE)  # one slow target holds one place, not a batch

        async def one(request: InputRequest) -> None:
            async with window:
                await self._tell_and_mark(request, tuple(self._listeners), again=True)

        async def all_of_them() -> None:
            await asyncio.gather(*(one(request) for request in untold))

        if untold:
            task = asyncio.create_task(all_of_them(), name="tell-again")
            self._notifications.add(task)
            task.add_done_callback(self._notifications.discard)

    def _audit_record(self, request: InputRequest) -> AuditRecord:
        resolution = request.resolution
        return AuditRecord(
            tenant_id=request.tenant_id,
            request_id=request.request_id,
            session_id=request.session_id,
            message_id=request.message_id,
            kind=request.kind.value,
            outcome=outcome_text(request),
            actor=resolution.resolved_by if resolution else "mesh",
            surface=resolution.surface.value if resolution else "mesh",
            time=resolution.resolved_at if resolution else self._clock.now(),
        )

    # Reading and waiting

    def has_pending(self, tenant_id: str, session_id: str) -> bool:
        """Whether the session waits for a human on anything (as this process, its owner, knows)."""
        return bool(self._pending.get((tenant_id, session_id)))

    async def get(self, tenant_id: str, request_id: str) -> InputRequest:
        request = await self._store.get_input(tenant_id=tenant_id, request_id=request_id)
        if request is None:
            raise NotFound(f"input request {request_id!r} not found", reason="INPUT_NOT_FOUND")
        return request

    async def list_pending(
        self, caller: Caller, *, session_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> InputPage:
        """The approval queue of a session or of the whole tenant, oldest first."""
        caller.require(Scope.READ)
        check_id("session_id", session_id, required=False)
        if (
            session_id
            and await self._store.get_session(tenant_id=caller.tenant_id, session_id=session_id) is None
        ):
            raise session_not_found(session_id)
        if page_size < 0 or page_size > 500:
            raise InvalidArgument("page_size", "must be between 0 and 500")
        scope = PageScope("ListPendingInputs", caller.tenant_id, (session_id,))
        cursor = scope.cursor(page_token)
        page = await self._store.list_inputs(
            tenant_id=caller.tenant_id,
            session_id=session_id,
            states=(InputState.PENDING,),
            page_size=page_size or 50,
            cursor=cursor,
        )
        fit = fitting(page.requests, json_bytes)
        if fit != len(page.requests):
            # The page ends early (the store's cursor for the shorter page).
            page = await self._store.list_inputs(
                tenant_id=caller.tenant_id,
                session_id=session_id,
                states=(InputState.PENDING,),
                page_size=fit,
                cursor=cursor,
            )
        return replace(page, next_cursor=scope.token(page.next_cursor))

    async def wait(self, tenant_id: str, request_id: str) -> InputRequest:
        """Until the request ends (resolved, expired or canceled)."""
        future: asyncio.Future[InputRequest] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault((tenant_id, request_id), []).append(future)
        request = await self.get(tenant_id, request_id)
        if request.state is not InputState.PENDING:
            self._waiters.pop((tenant_id, request_id), None)
            return request
        if self.shared is not None:
            return await self._first_end(request, future, self.shared)
        return await future

    async def _first_end(
        self, request: InputRequest, future: asyncio.Future[InputRequest], bus: EventBus
    ) -> InputRequest:
        """The request once it ends here (``future``) or on another replica (its event)."""
        tenant_id, request_id = request.tenant_id, request.request_id
        subscription = bus.subscribe(tenant_id, request.session_id)

        async def elsewhere() -> InputRequest:
            nonlocal subscription
            while True:
                current = await self.get(tenant_id, request_id)  # read after subscribing: nothing missed
                try:
                    while current.state is InputState.PENDING:
                        payload = (await subscription.next()).payload
                        if isinstance(payload, InputEnded) and payload.request.request_id == request_id:
                            # read back: the event's request lacks what private fields were given
                            current = await self.get(tenant_id, request_id)
                    return current
                except MeshError:
                    # The subscription ended: this is no outcome of the request. The server stopping
                    # (the message is parked, the request stays pending) leaves only an answer given
                    # here, or the stop's cancellation; a subscription cut off for lagging is renewed.
                    subscription.close()
                    if bus.shut_down:
                        await asyncio.Event().wait()
                    subscription = bus.subscribe(tenant_id, request.session_id)

        heard = asyncio.ensure_future(elsewhere())
        try:
            await asyncio.wait({future, heard}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not heard.done():
                heard.cancel()  # it subscribes again only right after an error, never once cancelled
            subscription.close()
        if future.done():
            return future.result()
        ended = heard.result()
        # Ended on another replica: what this one keeps about it goes, and a grant applies here too.
        self._grant(ended)
        self.expiry.forget(tenant_id, request_id)
        waiting = self._pending.get((tenant_id, ended.session_id))
        if waiting is not None:
            waiting.discard(request_id)
            if not waiting:
                del self._pending[(tenant_id, ended.session_id)]
        for waiter in self._waiters.pop((tenant_id, request_id), []):
            if not waiter.done():
                waiter.set_result(ended)
        return ended

    async def recover(
        self,
        *,
        pending: Sequence[InputRequest] | None = None,
        granting: Sequence[InputRequest] | None = None,
        announce: bool = False,
    ) -> int:
        """At start-up (or on taking sessions over: their ``pending`` and ``granting``): withdraw the pending
        requests nothing waits for any more (their message ended, or their session closed, before
        the server stopped), re-arm the expiry of the rest, and apply again the approvals given for
        a session (still open) or for always. The requests kept are announced again (``announce``:
        now, to the listeners there are; otherwise to each listener as it is added).

        Run it after ``Messages.recover``, which ends the messages that were running."""
        kept = 0
        for request in await self._store.pending_inputs() if pending is None else pending:
            tenant_id, session_id = request.tenant_id, request.session_id
            message = await self._store.get_message(
                tenant_id=tenant_id, session_id=session_id, message_id=request.message_id
            )
            session = await self._store.get_session(tenant_id=tenant_id, session_id=session_id)
            if session is None or session.status is SessionStatus.CLOSED:
                reason = "withdrawn at start-up: the session closed"
            elif message is None or message.state.terminal:
                ended = message.state.value if message is not None else "gone"
                reason = f"withdrawn at start-up: the message is {ended}"
            else:
                self._pending.setdefault((tenant_id, session_id), set()).add(request.request_id)
                self.expiry.schedule(tenant_id, request.request_id, request.expires_at)
                kept += 1
                if announce:  # taken over from another replica: its adapters may not have told
                    self._notify("on_request", request)
                else:  # at start-up, before the adapters listen: each is told as it is added
                    self._recovered.append(request)
                continue
            await self._end_unanswered(tenant_id, request.request_id, InputState.CANCELED, reason)
        for request in await self._store.granting_inputs() if granting is None else granting:
            if request.resolution is not None and request.resolution.decision is Decision.APPROVE_FOR_SESSION:
                session = await self._store.get_session(
                    tenant_id=request.tenant_id, session_id=request.session_id
                )
                if session is None or session.status is SessionStatus.CLOSED:
                    continue
            self._grant(request)
        return kept

    async def close(self) -> None:
        await self.expiry.stop()
        if self._looking is not None:
            self._looking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._looking
            self._looking = None
        tasks = list(self._notifications)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _notify(
        self, hook: str, request: InputRequest, *, listeners: Sequence[InputListener] | None = None
    ) -> None:
        """Tell every listener, each in its own task: a slow or broken adapter never blocks the mesh."""
        for listener in self._listeners if listeners is None else listeners:
            task = asyncio.create_task(
                _call(listener, hook, request), name=f"notify-{hook}-{request.request_id}"
            )
            self._notifications.add(task)
            task.add_done_callback(self._notifications.discard)


async def _call(listener: InputListener, hook: str, request: InputRequest) -> bool:
    """One listener's hook, and whether it returned; what it raises is logged (a broken adapter
    never breaks the mesh)."""
    try:
        await getattr(listener, hook)(request)
    except Exception:
        _log.exception("adapter %r failed in %s for %s", listener, hook, request.request_id)
        return False
    return True
