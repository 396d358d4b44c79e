"""How the on-call commands print: tables, times, one-line details, JSON."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from dispatcher.store import Session, iso

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# -- formatting -------------------------------------------------------------------------------


def session_json(s: Session) -> dict[str, Any]:
    extra = {
        "dispatcher": s.dispatcher,
        "roomDeletedAt": iso(s.room_deleted_at),
        "endRequestedAt": iso(s.end_requested_at),
        "traceId": trace_id(s),
    }
    return s.public() | extra


def trace_id(s: Session) -> str | None:
    """The session's trace (its spans and its bot's, and its log records' `trace_id`)."""
    parts = (s.traceparent or "").split("-")
    return parts[1] if len(parts) == 4 else None


def unknown(session_id: str) -> int:
    print(f"dispatcher: no session {session_id}")
    return 1


def reason(s: Session) -> str:
    if s.end_reason is None:
        return ""
    return s.end_reason + ("" if s.exit_code is None else f" (exit {s.exit_code})")


def event_time(value: Any) -> float | None:
    """Fly's event timestamps are unix milliseconds (an RFC 3339 string is accepted too)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value / 1000
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def clock(ts: float | None) -> str:
    return (iso(ts) or "")[:19].replace("T", " ")


def age(seconds: float) -> str:
    """A span of time the way people say it: 45s, 12m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def seconds(value: float | None) -> str:
    return "" if value is None else f"{value:+.3f}s"


def details_text(details: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={one_line(str(v))}" for k, v in details.items() if v not in (None, "", [])
    )


def one_line(text: str) -> str:
    """Text for one line of a terminal: control characters (newlines, escapes) as escapes."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    head = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    return "\n".join(line.rstrip() for line in (head, *lines))


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))
