"""Session ids: made here, and known in room names (a Daily room is named after its session)."""

from __future__ import annotations

import re
import secrets

# A session id, and the name of its Daily room; rooms named otherwise are not ours.
SESSION_ID = re.compile(r"^s-[0-9a-f]{16}$")


def new_session_id() -> str:
    """A session id: short, URL- and Daily-room-name-safe, 64 random bits."""
    return "s-" + secrets.token_hex(8)
