"""The session states and end reasons that the OpenAPI document names: the one place in the
document's modules where they come from."""

from __future__ import annotations

from typing import Any

from dispatcher.store import ACTIVE_STATES, TERMINAL_STATES

SESSION_STATES: tuple[str, ...] = (*ACTIVE_STATES, *TERMINAL_STATES)


def end_reason() -> dict[str, Any]:
    """The schema of a session's `endReason`."""
    return {
        "type": ["string", "null"],
        "description": (
            "`deleted`, `max_duration`, `ready_timeout`, `start_interrupted`, "
            "`dispatcher_stopped` (a local bot's dispatcher stopped), the bot's own "
            "reason (`participant_left`, ...), `oom_killed`, `dispatcher_lost` (a "
            "local bot died with its dispatcher), `completed`, `crashed` or "
            "`exited_before_ready`."
        ),
    }
