"""How a session ended: the `reason` of the `ended` callback, the exit code, and the error."""

from __future__ import annotations

from dataclasses import dataclass

# Why a session ended, as the `ended` callback says it. The runtime records the first one it
# sees; a bot that returns with none recorded has `completed`.
PARTICIPANT_LEFT = "participant_left"
JOIN_FAILED = "join_failed"
ROOM_LEFT = "room_left"
MAX_DURATION = "max_duration"
SIGTERM = "sigterm"
SIGINT = "sigint"
IDLE_TIMEOUT = "idle_timeout"
COMPLETED = "completed"
ERROR = "error"
ENTRYPOINT_ERROR = "entrypoint_error"
CONTRACT_ERROR = "contract_error"

# Ends the runtime decides are failures even though `bot()` returned cleanly.
FAILURES = frozenset({JOIN_FAILED})

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2

# The longest error line sent to the dispatcher (it keeps at most 1000 characters).
ERROR_MAX_CHARS = 500


@dataclass(frozen=True)
class SessionOutcome:
    """How a session ended; `abandoned` if its pipeline had to be left running to exit."""

    reason: str
    exit_code: int
    error: str | None = None
    abandoned: bool = False

    @classmethod
    def of(cls, reason: str, *, abandoned: bool = False) -> SessionOutcome:
        """A clean end for `reason`: exit code 0, or 1 for the runtime's own failures."""
        return cls(reason, EXIT_ERROR if reason in FAILURES else EXIT_OK, abandoned=abandoned)

    @classmethod
    def raised(cls, error: str, *, abandoned: bool = False) -> SessionOutcome:
        """`bot()` raised: exit code 1, with the error's line."""
        return cls(ERROR, EXIT_ERROR, error, abandoned)

    @classmethod
    def refused(cls, reason: str, error: str) -> SessionOutcome:
        """The session could not start (a broken contract or entry point): exit code 2."""
        return cls(reason, EXIT_CONFIG, error)


def error_line(exc: BaseException) -> str:
    """`Type: message` of an exception, on one line and at most ERROR_MAX_CHARS long."""
    message = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return line if len(line) <= ERROR_MAX_CHARS else line[: ERROR_MAX_CHARS - 1] + "…"
