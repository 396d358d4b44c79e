"""The session states, end reasons and error codes as the OpenAPI document names them, taken from
`dispatcher.lifecycle` and `dispatcher.errors`: the one place in the document's modules where
they come from."""

from __future__ import annotations

from typing import Any

from dispatcher.callbacks import REASON
from dispatcher.errors import ErrorCode
from dispatcher.lifecycle import END_REASON_VALUES, STATE_VALUES


def session_state() -> dict[str, Any]:
    """The schema of a session's `state` (and of the list's `state` filter)."""
    return {"type": "string", "enum": list(STATE_VALUES)}


def end_reason() -> dict[str, Any]:
    """The schema of a session's `endReason`: a reason the dispatcher records, the bot's own, or
    null while the session runs."""
    return {
        "description": (
            "Why the session ended: a reason the dispatcher records, or the bot's own reason "
            "from its `ended` report (e.g. `join_failed`); null until it ends."
        ),
        "anyOf": [
            {
                "type": "string",
                "enum": list(END_REASON_VALUES),
                "description": "A reason the dispatcher records.",
            },
            {
                "type": "string",
                "pattern": REASON.pattern,
                "description": "The bot's own reason.",
            },
            {"type": "null"},
        ],
    }


def error_code() -> dict[str, Any]:
    """The schema of an error's `code`: every code of the registry, with its statuses and what
    it means."""
    return {
        "type": "string",
        "description": (
            "A stable kebab-case code. Each error answer lists the codes it carries; every code, "
            "with the statuses it comes with, is one of these."
        ),
        "oneOf": [
            {"const": code.value, "description": f"{statuses(code)}: {code.meaning}"}
            for code in ErrorCode
        ],
    }


def statuses(code: ErrorCode) -> str:
    """The statuses a code comes with, in words."""
    return ", ".join(map(str, code.statuses)) or "any status"


def named(code: ErrorCode) -> str:
    """A code as the document's prose names it."""
    return f"`{code}`"
