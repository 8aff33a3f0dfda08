"""Operator commands for input requests: ``svantic-grpc pending`` and ``svantic-grpc resolve``.

Both talk to a running mesh over gRPC (``ListPendingInputs``, ``ResolveInput``) with
a token got from a client credential::

    svantic-grpc pending [--target 127.0.0.1:50051] [--session ID] [--json]
    svantic-grpc resolve REQUEST_ID --approve | --approve-for-session | --approve-always
                         | --deny REASON | --values JSON | --confirm | --reject

The credential comes from ``--client-id`` / ``--client-secret`` or the environment
variables ``SVANTIC_CLIENT_ID`` / ``SVANTIC_CLIENT_SECRET`` (prefer the environment:
a secret on the command line is visible to other users of the machine). When none
is given, the development credential ``svantic`` / ``your-secret`` is used, which a
mesh accepts only in development mode on loopback; a note says so on stderr.

Exit codes: 0 done, 1 the mesh refused or could not be reached (its message is
printed, e.g. who already answered the request), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import grpc
from google.rpc import error_details_pb2, status_pb2

from svantic_grpc import _json
from svantic_grpc.config import DEV_CLIENT_ID, DEV_CLIENT_SECRET
from svantic_grpc.pb import auth_service_pb2, message_service_pb2, message_types_pb2
from svantic_grpc.pb.auth_service_pb2_grpc import AuthServiceStub
from svantic_grpc.pb.message_service_pb2_grpc import MessageServiceStub

__all__ = ["COMMANDS", "add_commands", "run"]

COMMANDS = ("pending", "resolve")
DEFAULT_TARGET = "127.0.0.1:50051"
CLIENT_ID_ENV = "SVANTIC_CLIENT_ID"
CLIENT_SECRET_ENV = "SVANTIC_CLIENT_SECRET"
_AGENT_TYPE = "svantic-cli"
_MAX_PAGES = 1000  # 500 per page: far more than any real queue, and never an endless loop

_KIND = {
    message_types_pb2.INPUT_KIND_TOOL_APPROVAL: "tool_approval",
    message_types_pb2.INPUT_KIND_FORM: "form",
    message_types_pb2.INPUT_KIND_CONFIRMATION: "confirmation",
    message_types_pb2.INPUT_KIND_PLAN_APPROVAL: "plan_approval",
}
_DECISION = {
    message_types_pb2.DECISION_APPROVE: "approve",
    message_types_pb2.DECISION_APPROVE_FOR_SESSION: "approve_for_session",
    message_types_pb2.DECISION_APPROVE_ALWAYS: "approve_always",
    message_types_pb2.DECISION_DENY: "deny",
}
_SURFACE = {
    message_types_pb2.SURFACE_GRPC: "grpc",
    message_types_pb2.SURFACE_SLACK: "slack",
    message_types_pb2.SURFACE_WEBHOOK: "webhook",
    message_types_pb2.SURFACE_CHAT: "chat",
}


class _UsageError(Exception):
    """Bad command-line input, found after argparse (exit 2)."""


def add_commands(commands: Any) -> None:
    """Add ``pending`` and ``resolve`` to the ``svantic-grpc`` subcommands (an argparse subparsers object)."""
    pending = commands.add_parser(
        "pending",
        help="list pending input requests (approvals, forms, confirmations)",
        description="List the pending input requests of the tenant, or of one session, oldest first.",
    )
    _common(pending)
    pending.add_argument("--session", default="", metavar="ID", help="only this session's requests")
    pending.add_argument("--json", action="store_true", help="print a JSON array instead of a table")

    resolve = commands.add_parser(
        "resolve",
        help="answer one pending input request",
        description="Answer one pending input request. The first answer wins; a later one is refused "
        "with who answered it, how and when.",
    )
    _common(resolve)
    resolve.add_argument("request_id", metavar="REQUEST_ID", help="the request (see `svantic-grpc pending`)")
    answer = resolve.add_mutually_exclusive_group(required=True)
    answer.add_argument("--approve", action="store_true", help="allow this call")
    answer.add_argument(
        "--approve-for-session", action="store_true", help="allow this tool for the rest of the session"
    )
    answer.add_argument(
        "--approve-always", action="store_true", help="turn the policy's require_approval into allow"
    )
    answer.add_argument("--deny", metavar="REASON", help="refuse, with a reason the agent can act on")
    answer.add_argument(
        "--values", metavar="JSON", help='form values as a JSON object, e.g. \'{"region": "eu"}\''
    )
    answer.add_argument("--confirm", action="store_true", help="confirm a tool call")
    answer.add_argument("--reject", action="store_true", help="do not confirm a tool call")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"the mesh's gRPC host:port (default {DEFAULT_TARGET})"
    )
    parser.add_argument("--client-id", help=f"client credential id (default ${CLIENT_ID_ENV})")
    parser.add_argument(
        "--client-secret", help=f"client secret (default ${CLIENT_SECRET_ENV}; prefer the environment)"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="limit per call (default 10)"
    )


def run(
    args: argparse.Namespace,
    *,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run ``pending`` or ``resolve``; returns the exit code."""
    env = os.environ if env is None else env
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        resolution = _resolution(args) if args.command == "resolve" else None
        if args.timeout <= 0:
            raise _UsageError("--timeout must be > 0")
        credential = _credential(args, env, err)
    except _UsageError as exc:
        print(f"svantic-grpc {args.command}: {exc}", file=err)
        return 2
    try:
        with grpc.insecure_channel(args.target) as channel:
            metadata = _login(channel, credential, args.timeout)
            messages = MessageServiceStub(channel)
            if resolution is None:
                return _pending(messages, metadata, args, out)
            return _resolve(messages, metadata, args.request_id, resolution, args.timeout, out)
    except grpc.RpcError as exc:
        print(f"svantic-grpc {args.command}: {_describe(exc, args.target)}", file=err)
        return 1


# ---------------------------------------------------------------- input


def _credential(args: argparse.Namespace, env: Mapping[str, str], err: TextIO) -> tuple[str, str]:
    client_id = args.client_id or env.get(CLIENT_ID_ENV, "")
    secret = args.client_secret or env.get(CLIENT_SECRET_ENV, "")
    if client_id and secret:
        return client_id, secret
    if client_id or secret:
        missing = (
            f"--client-secret or ${CLIENT_SECRET_ENV}" if client_id else f"--client-id or ${CLIENT_ID_ENV}"
        )
        raise _UsageError(f"incomplete credential: also give {missing}")
    print(
        f"svantic-grpc {args.command}: no credential given (--client-id/--client-secret or "
        f"${CLIENT_ID_ENV}/${CLIENT_SECRET_ENV}); using the development credential {DEV_CLIENT_ID!r}, "
        "which only a development-mode mesh on loopback accepts",
        file=err,
    )
    return DEV_CLIENT_ID, DEV_CLIENT_SECRET


def _resolution(args: argparse.Namespace) -> message_types_pb2.Resolution:
    if args.approve:
        return message_types_pb2.Resolution(decision=message_types_pb2.DECISION_APPROVE)
    if args.approve_for_session:
        return message_types_pb2.Resolution(decision=message_types_pb2.DECISION_APPROVE_FOR_SESSION)
    if args.approve_always:
        return message_types_pb2.Resolution(decision=message_types_pb2.DECISION_APPROVE_ALWAYS)
    if args.deny is not None:
        if not args.deny.strip():
            raise _UsageError("--deny needs a reason the agent can act on")
        return message_types_pb2.Resolution(decision=message_types_pb2.DECISION_DENY, reason=args.deny)
    if args.values is not None:
        try:
            values = _json.loads(args.values)
        except _json.JsonTextError as exc:
            raise _UsageError(f'--values {exc}; give an object like \'{{"name": "value"}}\'') from None
        if not isinstance(values, dict):
            raise _UsageError(
                f"--values must be a JSON object of field name to value, not {type(values).__name__}"
            )
        # The exact text keeps integers integers; the Struct is for meshes that predate it.
        resolution = message_types_pb2.Resolution(values_json=_json.dumps(values))
        try:
            resolution.values.update(values)
        except (ValueError, TypeError) as exc:
            raise _UsageError(f"--values cannot be sent: {exc}") from None
        return resolution
    return message_types_pb2.Resolution(confirmed=bool(args.confirm))


# ---------------------------------------------------------------- calls


def _login(channel: grpc.Channel, credential: tuple[str, str], timeout: float) -> tuple[tuple[str, str], ...]:
    client_id, secret = credential
    response = AuthServiceStub(channel).GetToken(
        auth_service_pb2.GetTokenRequest(client_id=client_id, client_secret=secret, agent_type=_AGENT_TYPE),
        timeout=timeout,
    )
    return (("authorization", f"Bearer {response.token}"),)


def _pending(
    messages: MessageServiceStub,
    metadata: tuple[tuple[str, str], ...],
    args: argparse.Namespace,
    out: TextIO,
) -> int:
    requests: list[message_types_pb2.InputRequest] = []
    token = ""
    for _ in range(_MAX_PAGES):
        page = messages.ListPendingInputs(
            message_service_pb2.ListPendingInputsRequest(
                session_id=args.session, page_size=500, page_token=token
            ),
            metadata=metadata,
            timeout=args.timeout,
        )
        requests.extend(page.requests)
        token = page.next_page_token
        if not token:
            break
    now = time.time()
    rows = [_row(r, now) for r in requests]
    if args.json:
        print(json.dumps(rows, indent=2), file=out)
    else:
        _table(rows, out)
    return 0


def _resolve(
    messages: MessageServiceStub,
    metadata: tuple[tuple[str, str], ...],
    request_id: str,
    resolution: message_types_pb2.Resolution,
    timeout: float,
    out: TextIO,
) -> int:
    response = messages.ResolveInput(
        message_service_pb2.ResolveInputRequest(request_id=request_id, resolution=resolution),
        metadata=metadata,
        timeout=timeout,
    )
    request = response.request
    answer = request.resolution
    when = _iso(answer.resolved_at.ToSeconds()) if answer.HasField("resolved_at") else "now"
    print(
        f"resolved {request.request_id} ({request.summary}): {_outcome(request)} "
        f"by {answer.resolved_by} via {_SURFACE.get(answer.surface, 'grpc')} at {when}",
        file=out,
    )
    return 0


# ---------------------------------------------------------------- output


@dataclass(frozen=True)
class _Column:
    title: str
    key: str


_COLUMNS = (
    _Column("REQUEST", "id"),
    _Column("SESSION", "session_id"),
    _Column("MESSAGE", "message_id"),
    _Column("KIND", "kind"),
    _Column("SUMMARY", "summary"),
    _Column("POLICY", "policy"),
    _Column("EXPIRES IN", "expires_in"),
)


def _row(request: message_types_pb2.InputRequest, now: float) -> dict[str, Any]:
    expires_at = request.expires_at.ToSeconds() if request.HasField("expires_at") else 0
    row: dict[str, Any] = {
        "id": request.request_id,
        "session_id": request.session_id,
        "message_id": request.message_id,
        "kind": _KIND.get(request.kind, "unknown"),
        "summary": request.summary,
        "tool": request.tool_call.tool_name if request.HasField("tool_call") else "",
        "arguments": _arguments(request) if request.HasField("tool_call") else {},
        "policy": request.policy,
        "allowed_decisions": [_DECISION[d] for d in request.allowed_decisions if d in _DECISION],
        "allowed_responders": list(request.allowed_responders),
        "created_at": _iso(request.created_at.ToSeconds()) if request.HasField("created_at") else "",
        "expires_at": _iso(expires_at) if expires_at else "",
        "expires_in_s": max(0, round(expires_at - now)) if expires_at else None,
    }
    if request.HasField("form"):
        row["form"] = {
            "title": request.form.title,
            "fields": [
                {"name": f.name, "type": f.type, "required": f.required, "sensitive": f.sensitive}
                for f in request.form.fields
            ],
        }
    if request.plan:
        row["plan"] = [step.description for step in request.plan]
    return row


def _table(rows: list[dict[str, Any]], out: TextIO) -> None:
    if not rows:
        print("no pending input requests", file=out)
        return
    cells = [[c.title for c in _COLUMNS]]
    for row in rows:
        shown = {
            **row,
            "summary": row["summary"] + _args(row["arguments"]),
            "policy": row["policy"] or "-",
            "expires_in": _duration(row["expires_in_s"]),
        }
        cells.append([str(shown[c.key]) for c in _COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    for line in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip(), file=out
        )
    print(f"{len(rows)} pending", file=out)


def _args(arguments: dict[str, Any]) -> str:
    """A tool call's arguments, compact, for the table (the summary names the tool)."""
    if not arguments:
        return ""
    text = json.dumps(arguments, separators=(",", ":"), sort_keys=True)
    return " " + (text if len(text) <= 60 else text[:57] + "...")


def _outcome(request: message_types_pb2.InputRequest) -> str:
    answer = request.resolution
    if answer.decision == message_types_pb2.DECISION_DENY:
        return f"deny ({answer.reason})"
    if answer.decision in _DECISION:
        return _DECISION[answer.decision]
    if request.kind == message_types_pb2.INPUT_KIND_CONFIRMATION:
        return "confirmed" if answer.confirmed else "not confirmed"
    return "form submitted"


def _arguments(request: message_types_pb2.InputRequest) -> dict[str, Any]:
    """The tool call's arguments, integers as ints."""
    return _json.exact_object(request.tool_call.arguments, request.tool_call.arguments_json)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "expiring"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _describe(error: grpc.RpcError, target: str) -> str:
    """The mesh's own words for a failed call, with its status and reason."""
    code: grpc.StatusCode = error.code()
    details = error.details() or ""
    if code is grpc.StatusCode.UNAVAILABLE and not _reason(error):
        return f"cannot reach the mesh at {target} ({details})"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the mesh at {target} did not answer in time"
    reason = _reason(error)
    return f"{code.name}{f' {reason}' if reason else ''}: {details}"


def _reason(error: grpc.RpcError) -> str:
    """``google.rpc.ErrorInfo.reason`` from the rich status trailer, if the mesh sent one."""
    trailers = error.trailing_metadata() or ()
    raw = dict(trailers).get("grpc-status-details-bin")
    if not raw:
        return ""
    try:
        status = status_pb2.Status.FromString(raw)
    except Exception:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""
