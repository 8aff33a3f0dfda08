"""Log output of the server process: the classic text lines, or one JSON object per line.

``configure(level, fmt)`` is called once by the CLI. With ``fmt="json"`` each record is
one line with ``time``, ``level``, ``logger`` and ``message``, the session id when the
record was made within a session's work (``core.log_context.SESSION_ID``, or an explicit
``extra={"session_id": ...}``), the trace and span ids when a sampled OpenTelemetry span is
current, any other ``extra`` fields (``agent_type``, ``instance_id``, ``request_id``,
``outcome``, ...), and the exception when there is one.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from svantic_grpc.core.log_context import SESSION_ID

__all__ = ["JsonFormatter", "TextFormatter", "configure"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has: anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

try:  # the API alone is cheap; without a tracer provider no span is ever valid
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - a2a-sdk brings it
    _trace = None  # type: ignore[assignment]


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        session_id = getattr(record, "session_id", "") or SESSION_ID.get()
        if session_id:
            line["session_id"] = session_id
        if _trace is not None:
            context = _trace.get_current_span().get_span_context()
            if context.is_valid:
                line["trace_id"] = format(context.trace_id, "032x")
                line["span_id"] = format(context.span_id, "016x")
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """The classic text line, with line breaks and other control characters in the message shown
    escaped: a reason an agent or client wrote (``"oops\\rid: 1"``) cannot start a line of its own
    or rewrite one on a terminal. A traceback after the message keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        if not message.isprintable():
            record.message = message.translate(_ESCAPED)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


_ESCAPED = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


CHATTY = ("httpx", "httpcore", "a2a", "aiohttp.access", "uvicorn.access")
"""Libraries that log every request (httpx a line per call to a hosted agent, a2a-sdk each card
it reads, whole) at INFO: below WARNING they speak only when the server logs at DEBUG."""


def configure(level: str, fmt: Literal["text", "json"] = "text") -> None:
    """Send the process's logs to stderr at ``level``, as text lines or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    quiet = logging.getLogger().getEffectiveLevel() > logging.DEBUG
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
