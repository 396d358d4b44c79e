"""The bot's logs: one JSON object per line on stderr, with the session ID, secrets masked.

Pipecat logs through loguru; the standard library's `logging` (httpx, the dispatcher client)
is routed into the same sink.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger

if TYPE_CHECKING:
    from loguru import Message, Record

MASK = "[redacted]"
_MIN_SECRET_LENGTH = 8

# The environment variables whose values never appear in a log line: the contract's tokens
# and the providers' API keys (secrets of the bot app). TURN credentials in ICE_SERVERS too.
SECRET_VARIABLES = (
    "DAILY_TOKEN",
    "BOT_CALLBACK_TOKEN",
    "DEEPGRAM_API_KEY",
    "OPENAI_API_KEY",
    "CARTESIA_API_KEY",
)


def environ_secrets(environ: Mapping[str, str]) -> list[str]:
    """Every secret value of `environ`, read leniently (a malformed value is masked whole)."""
    secrets = [environ.get(name, "") for name in SECRET_VARIABLES]
    raw = environ.get("ICE_SERVERS", "")
    try:
        servers = json.loads(raw) if raw.strip() else []
    except json.JSONDecodeError:
        servers = [{"credential": raw}]
    if isinstance(servers, list):
        secrets += [s["credential"] for s in servers if isinstance(s, dict) and "credential" in s]
    return [s for s in secrets if isinstance(s, str) and s]


class JsonLogSink:
    """A loguru sink writing one JSON object per record, with every known secret masked."""

    def __init__(
        self, stream: TextIO, secrets: Iterable[str | None], fields: dict[str, str]
    ) -> None:
        self._stream = stream
        self._secrets = sorted(
            {s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True
        )
        self._fields = fields

    def mask(self, text: str) -> str:
        """`text` with every secret replaced by the mask."""
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def __call__(self, message: Message) -> None:
        record = message.record
        line: dict[str, Any] = {
            "ts": record["time"].isoformat(),
            "level": record["level"].name,
            "logger": record["name"],
            "msg": self.mask(record["message"]),
            **self._fields,
        }
        exception = record["exception"]
        if exception is not None and exception.type is not None:
            text = "".join(
                traceback.format_exception(exception.type, exception.value, exception.traceback)
            )
            line["exc"] = self.mask(text)
        self._stream.write(json.dumps(line, default=str) + "\n")
        self._stream.flush()


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
    **fields: str | None,
) -> JsonLogSink:
    """Send all logs to `stream` (stderr) as JSON lines carrying `fields` (session_id ...)."""
    sink = JsonLogSink(
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
