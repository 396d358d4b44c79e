"""The bot's logs: one JSON object per line on stderr, with the session ID, secrets masked.

Every line carries the session's fixed fields (`session_id`, `machine_id`, `trace_id` of
TRACEPARENT; a pooled bot's lines carry `pooled`, and its session's fields once it has one)
and, when an OpenTelemetry span is current where it was logged, that span's `trace_id` and
`span_id`. LOG_FORMAT=text writes the same as one readable line instead.

Pipecat logs through loguru; the standard library's `logging` (httpx, the dispatcher client)
is routed into the same sink.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger
from opentelemetry import trace

if TYPE_CHECKING:
    from loguru import Message, Record

MASK = "[redacted]"
JSON = "json"
TEXT = "text"
_MIN_SECRET_LENGTH = 8
# What a text line shows in its own columns rather than as `key=value`.
_TEXT_COLUMNS = frozenset({"ts", "level", "logger", "msg", "exc"})
# The fields a text line names first, in this order (the dispatcher's text lines name its
# context's ids the same way: dispatcher/logs.py), the others after them.
_TEXT_FIELDS = ("session_id", "machine_id", "trace_id", "span_id")
# Pipecat's SmallWebRTC transport looks up a screen-share track on every connect, whatever the
# transport's params, and warns when the peer offered none. @pipecat-ai/small-webrtc-transport
# offers that transceiver only when its media manager can share a screen; a voice page (ours)
# cannot, and offering a transceiver it never uses would be the wrong fix. The warning says
# nothing about the session, every session: it is dropped, and only it.
_NOISE = frozenset(
    {("pipecat.transports.smallwebrtc.connection", "No screen video transceiver is available")}
)

# The environment variables whose values never appear in a log line: the contract's tokens,
# and every variable named like a credential (the providers' API keys, any secret of the bot
# app's). TURN credentials in ICE_SERVERS too.
SECRET_VARIABLES = ("DAILY_TOKEN", "BOT_CALLBACK_TOKEN", "POOL_TOKEN")
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)


def environ_secrets(environ: Mapping[str, str]) -> list[str]:
    """Every secret value of `environ`, read leniently (a malformed value is masked whole)."""
    names = {*SECRET_VARIABLES, *(name for name in environ if _SECRET_NAME.search(name))}
    secrets = [environ.get(name, "") for name in sorted(names)]
    raw = environ.get("ICE_SERVERS", "")
    try:
        servers = json.loads(raw) if raw.strip() else []
    except json.JSONDecodeError:
        servers = [{"credential": raw}]
    if isinstance(servers, list):
        secrets += [s["credential"] for s in servers if isinstance(s, dict) and "credential" in s]
    return [s for s in secrets if isinstance(s, str) and s]


def span_fields() -> dict[str, str]:
    """`trace_id` and `span_id` of the current OpenTelemetry span; empty when none is valid."""
    span = trace.get_current_span().get_span_context()
    if not span.is_valid:
        return {}
    return {
        "trace_id": trace.format_trace_id(span.trace_id),
        "span_id": trace.format_span_id(span.span_id),
    }


class JsonLogSink:
    """A loguru sink writing one JSON object per record, with every known secret masked."""

    def __init__(
        self, stream: TextIO, secrets: Iterable[str | None], fields: Mapping[str, Any]
    ) -> None:
        self._stream = stream
        self._secrets = _longest_first(secrets)
        self._fields = dict(fields)

    def bind(self, secrets: Iterable[str | None] = (), **fields: Any) -> None:
        """Add `fields` to every later line and mask `secrets` too (a pooled bot's session)."""
        self._secrets = _longest_first([*self._secrets, *secrets])
        self._fields = {**self._fields, **{k: v for k, v in fields.items() if v is not None}}

    def mask(self, text: str) -> str:
        """`text` with every secret replaced by the mask."""
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def __call__(self, message: Message) -> None:
        record = message.record
        if (record["name"], record["message"]) in _NOISE:
            return
        line: dict[str, Any] = {
            "ts": record["time"].isoformat(),
            "level": record["level"].name,
            "logger": record["name"],
            "msg": self.mask(record["message"]),
            **self._fields,
            **span_fields(),
        }
        exception = record["exception"]
        if exception is not None and exception.type is not None:
            text = "".join(
                traceback.format_exception(exception.type, exception.value, exception.traceback)
            )
            line["exc"] = self.mask(text)
        self._stream.write(self.render(line) + "\n")
        self._stream.flush()

    def render(self, line: dict[str, Any]) -> str:
        """One record's line, without its newline."""
        return json.dumps(line, default=str)


def _longest_first(secrets: Iterable[str | None]) -> list[str]:
    return sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True)


class TextLogSink(JsonLogSink):
    """The same records for a terminal: time, level, logger, message, then the fields."""

    def render(self, line: dict[str, Any]) -> str:
        """`HH:MM:SS.mmm LEVEL   logger: message  key=value ...`, the traceback below; the
        dispatcher's text lines have the same columns and field order."""
        known = [k for k in _TEXT_FIELDS if k in line]
        others = [k for k in line if k not in _TEXT_COLUMNS and k not in _TEXT_FIELDS]
        fields = " ".join(f"{k}={line[k]}" for k in [*known, *others])
        text = f"{line['ts'][11:23]} {line['level']:<7} {line['logger']}: {line['msg']}"
        text = f"{text}  {fields}" if fields else text
        return f"{text}\n{line['exc'].rstrip()}" if "exc" in line else text


class _ToLoguru(logging.Handler):
    """Forwards standard-library log records to loguru, keeping the caller's logger name."""

    def emit(self, record: logging.LogRecord) -> None:
        level: str | int
        try:
            level = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.patch(_named(record.name)).opt(exception=record.exc_info).log(
            level, record.getMessage()
        )


def _named(name: str) -> Callable[[Record], None]:
    def patch(record: Record) -> None:
        record["name"] = name

    return patch


def configure_logging(
    *,
    level: str = "INFO",
    secrets: Iterable[str | None] = (),
    stream: TextIO | None = None,
    log_format: str = JSON,
    **fields: str | bool | None,
) -> JsonLogSink:
    """Send all logs to `stream` (stderr) as JSON lines carrying `fields` (session_id ...).

    `log_format` "text" writes readable lines instead; an unknown format means JSON.
    """
    sink_class = TextLogSink if log_format.strip().lower() == TEXT else JsonLogSink
    sink = sink_class(
        stream or sys.stderr, secrets, {k: v for k, v in fields.items() if v is not None}
    )
    try:
        level = logger.level(level.upper()).name
    except ValueError:
        level = "INFO"
    logger.remove()
    logger.add(sink, level=level, backtrace=False, diagnose=False)
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.INFO, force=True)
    return sink
