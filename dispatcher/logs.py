"""The dispatcher's logs: one JSON object per line (or text for a terminal), each record with
the session it belongs to, taken from context variables rather than threaded by hand.

Work done for one session runs inside `session_context(...)`: a start, a follow, a callback, a
reconciler repair, a room delete. Every record logged there, by our code or by a library
(httpx), carries `session_id`, and `machine_id`, `trace_id`, `span_id` once known.

The session's trace is OpenTelemetry's own context: `session_context` makes the session's
traceparent (its start span) the current parent, unless a span of that trace is current
already. So what is done later for a session (a DELETE's stop, a reconciler's repair) joins
the session's trace, and with tracing off the records still carry its trace id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

LogFormat = Literal["json", "text"]
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "text")

_session_id: ContextVar[str | None] = ContextVar("session_id", default=None)
_machine_id: ContextVar[str | None] = ContextVar("machine_id", default=None)
_PROPAGATOR = TraceContextTextMapPropagator()


@contextlib.contextmanager
def session_context(
    session_id: str | None, *, machine_id: str | None = None, traceparent: str | None = None
) -> Iterator[None]:
    """Records logged inside carry this session (and machine and trace, when given)."""
    session_token = _session_id.set(session_id)
    machine_token = _machine_id.set(machine_id)
    trace_token = _join_trace(traceparent)
    try:
        yield
    finally:
        if trace_token is not None:
            otel_context.detach(trace_token)
        _machine_id.reset(machine_token)
        _session_id.reset(session_token)


def bind(
    *,
    session_id: str | None = None,
    machine_id: str | None = None,
    traceparent: str | None = None,
) -> None:
    """Add what became known to the current context: only inside a task that works for one
    session (its context is its own copy), or within `session_context`."""
    if session_id is not None:
        _session_id.set(session_id)
    if machine_id is not None:
        _machine_id.set(machine_id)
    _join_trace(traceparent)


def _join_trace(traceparent: str | None) -> Token[Context] | None:
    """Make `traceparent` the current parent unless a span of its trace is current; the
    token to detach it with, or None when nothing was attached."""
    if not traceparent:
        return None
    parent = _PROPAGATOR.extract({"traceparent": traceparent})
    wanted = trace.get_current_span(parent).get_span_context()
    current = trace.get_current_span().get_span_context()
    if not wanted.is_valid or (current.is_valid and current.trace_id == wanted.trace_id):
        return None
    return otel_context.attach(parent)


def context_fields() -> dict[str, str]:
    """The session, machine and trace of the current context (only those known)."""
    fields: dict[str, str] = {}
    if (session_id := _session_id.get()) is not None:
        fields["session_id"] = session_id
    if (machine_id := _machine_id.get()) is not None:
        fields["machine_id"] = machine_id
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        fields["trace_id"] = trace.format_trace_id(span.trace_id)
        fields["span_id"] = trace.format_span_id(span.span_id)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the context's ids, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **context_fields(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """A line for people, in the columns of the bot's text lines (bot_runtime/logs.py), so that
    `make run`'s terminal reads as one log: `HH:MM:SS.mmm LEVEL   logger: message`, then the
    context's ids as `key=value` (session, machine, trace, span), a traceback below."""

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:12]
        text = f"{time} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = " ".join(f"{k}={v}" for k, v in context_fields().items())
        text = f"{text}  {fields}" if fields else text
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return text


def formatter(kind: LogFormat) -> logging.Formatter:
    """The formatter of a LOG_FORMAT."""
    return JsonFormatter() if kind == "json" else TextFormatter()


def configure_logging(level: str, kind: LogFormat, stream: TextIO | None = None) -> None:
    """Send every record (ours and the libraries') to `stream` (stderr) in `kind`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(kind))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
