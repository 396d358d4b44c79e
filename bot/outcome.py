"""How a session ended: the `reason` of the `ended` callback and the bot's exit code."""

from __future__ import annotations

from dataclasses import dataclass

PARTICIPANT_LEFT = "participant_left"
JOIN_FAILED = "join_failed"
MAX_DURATION = "max_duration"
SIGTERM = "sigterm"
SIGINT = "sigint"
IDLE_TIMEOUT = "idle_timeout"
ROOM_LEFT = "room_left"
PIPELINE_CANCELLED = "pipeline_cancelled"
COMPLETED = "completed"
ERROR = "error"

FAILURES = frozenset({JOIN_FAILED, PIPELINE_CANCELLED, ERROR})

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2


@dataclass(frozen=True)
class SessionOutcome:
    """How a session ended; `abandoned` if its pipeline had to be left running to exit."""

    reason: str
    exit_code: int
    abandoned: bool = False

    @classmethod
    def of(cls, reason: str, *, abandoned: bool = False) -> SessionOutcome:
        """The outcome of `reason`: exit code 1 for failures, 0 otherwise."""
        return cls(reason, EXIT_ERROR if reason in FAILURES else EXIT_OK, abandoned)
