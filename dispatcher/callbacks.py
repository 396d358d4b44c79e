"""What bots ask of the dispatcher: a pool machine's assignment, and every bot's ready and
ended callbacks. Each is authenticated by a token of that bot only (the pool machine's, or the
session's callback token), compared in constant time against the stored hash."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Any

from dispatcher.auth import derived_callback_token, token_matches
from dispatcher.config import Settings
from dispatcher.errors import BadRequest, Conflict, ErrorCode, Gone, NotFound, Unauthorized
from dispatcher.lifecycle import ACTIVE_STATES, State, mark_ready, request_end
from dispatcher.logs import bind, session_context
from dispatcher.pool import Pool
from dispatcher.rooms import RoomBackend
from dispatcher.store import AVAILABLE, CLAIMED, WARMING, Session, Store
from dispatcher.supervisor import Supervisor
from dispatcher.telemetry import Telemetry

log = logging.getLogger(__name__)

# The end reason a bot may report of its own (its `ended` report).
REASON = re.compile(r"^[a-z0-9_]{1,64}$")
# The longest `error` of an ended report kept; a longer one is cut there, never refused.
MAX_ERROR_CHARS = 1000
# How long an assignment request of a machine the pool does not know (yet) is held.
UNKNOWN_MACHINE_WAIT_S = 1.0


def bot_env(
    settings: Settings, session_id: str, callback_token: str, body_json: str, traceparent: str
) -> dict[str, str]:
    """The bot contract's env common to every transport: per-session values only, never a
    key of the dispatcher's (the transport adds its own, see `RoomBackend.bot_contract`)."""
    assert settings.dispatcher_url
    return {
        "SESSION_ID": session_id,
        "DISPATCHER_URL": settings.dispatcher_url,
        "BOT_CALLBACK_TOKEN": callback_token,
        "SESSION_BODY": body_json,
        "SESSION_MAX_DURATION_S": str(settings.session_max_duration_s),
        "TRACEPARENT": traceparent,
    }


def bot_error(value: Any) -> str | None:
    """The `error` of a bot's ended report as stored: None when absent, null or blank; else
    stripped, made storable (NUL and lone surrogates replaced) and cut to MAX_ERROR_CHARS."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest("error must be a string or null", code=ErrorCode.INVALID_ERROR)
    text = value.strip().replace("\x00", "\ufffd")
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text[:MAX_ERROR_CHARS] or None


class BotCallbacks:
    """The routes bots call (`/internal/...`)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        rooms: Mapping[str, RoomBackend],
        supervisor: Supervisor,
        telemetry: Telemetry,
        pool: Pool | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._rooms = rooms
        self._supervisor = supervisor
        self._telemetry = telemetry
        self._pool = pool

    async def assignment(
        self, machine_id: str, token: str | None, wait_s: float
    ) -> dict[str, Any] | None:
        """The session of a pool machine, for its bot (authenticated by the machine's token):
        `{"env", "args"}` as a cold bot gets them, once claimed; None if not claimed within
        `wait_s` (ask again). The same answer every time until the session moves on (an
        answer lost to a frozen or abandoned request is given again)."""
        if self._pool is None:
            raise NotFound("there is no warm pool", code=ErrorCode.NOT_FOUND)
        row = await self._pool.row(machine_id)
        if row is None:
            # A machine whose bot asks before its create has answered (and its row is stored).
            await asyncio.sleep(min(wait_s, UNKNOWN_MACHINE_WAIT_S))
            return None
        if token is None or not token_matches(token, row.token_hash):
            raise Unauthorized("bad pool token", code=ErrorCode.INVALID_POOL_TOKEN)
        if row.state not in (WARMING, AVAILABLE, CLAIMED):
            raise Gone("this pool machine is retired", code=ErrorCode.POOL_MACHINE_RETIRED)
        if row.state == WARMING:
            self._pool.warm(row)
        claimed = await self._pool.claimed(row, wait_s)
        if claimed is None:
            if await self._pool.row(machine_id) is None:
                raise Gone("this pool machine is retired", code=ErrorCode.POOL_MACHINE_RETIRED)
            return None
        assert claimed.session_id is not None
        with session_context(claimed.session_id, machine_id=machine_id):
            session = await self._store.get(claimed.session_id)
            if session is None:
                return None  # claimed for a start that has not stored its session yet
            if session.state not in (State.STARTING, State.DISPATCHED):
                raise Gone(f"the session is {session.state}", code=ErrorCode.POOL_MACHINE_RETIRED)
            rooms = self._rooms[session.transport]
            callback_token, callback_hash = derived_callback_token(token, session.id)
            await self._store.update(session.id, callback_hash=callback_hash)
            contract = rooms.bot_contract(
                rooms.plan(session.id, session.user_id, session.expires_at, {}, {})
            )
            env = bot_env(
                self._settings,
                session.id,
                callback_token,
                claimed.body or "{}",
                session.traceparent or "",
            )
            await self._store.record(session.id, "assigned", {"machine_id": machine_id})
            log.info("pool machine %s fetched its assignment", machine_id)
            return {"env": {**env, **contract.env}, "args": list(contract.args)}

    async def bot_ready(self, session_id: str, token: str | None) -> None:
        """The bot joined its room."""
        with session_context(session_id):
            session = await self._bot_session(session_id, token)
            ready = await mark_ready(self._store, session_id)
            self._telemetry.session_ready(ready)
            if ready is None and session.state not in (State.READY, State.ENDING):
                raise Conflict(f"session is {session.state}", code=ErrorCode.SESSION_ENDED)
            self._supervisor.notify_ready(session_id)

    async def bot_ended(
        self,
        session_id: str,
        token: str | None,
        reason: Any,
        exit_code: Any,
        error: Any = None,
    ) -> None:
        """The bot is leaving, with its reason, exit code and error (why it failed). A session
        already ending keeps the reason it had; the bot's exit code and error are recorded
        where none is stored yet."""
        if not isinstance(reason, str) or not REASON.match(reason):
            raise BadRequest("reason must match [a-z0-9_]{1,64}", code=ErrorCode.INVALID_REASON)
        if exit_code is not None and (type(exit_code) is not int or not 0 <= exit_code <= 255):
            raise BadRequest(
                "exit_code must be an integer 0..255", code=ErrorCode.INVALID_EXIT_CODE
            )
        error = bot_error(error)
        with session_context(session_id):
            await self._bot_session(session_id, token)
            details = {"source": "bot", "reason": reason, "exit_code": exit_code}
            if error is not None:
                details["error"] = error
            moved = await request_end(
                self._store, session_id, reason, details, exit_code=exit_code, error=error
            )
            if moved is None:
                await self._store.record(session_id, "bot_ended", details)
                await self._store.fill(session_id, exit_code=exit_code, error=error)
            if error is not None:
                log.warning("the bot ended (%s): %s", reason, error)
            # The first sign of the end: its machine exits in moments, and the session is
            # finished as soon as it has (dispatcher/supervisor.py), here, whoever follows it.
            ending = moved or await self._store.get(session_id)
            if ending is not None:
                self._supervisor.follow(ending)

    async def _bot_session(self, session_id: str, token: str | None) -> Session:
        """The session of a callback: refused unless the token matches and the session lives."""
        session = await self._store.get(session_id)
        if session is None or not token_matches(token, session.callback_hash):
            raise Unauthorized("bad callback token", code=ErrorCode.INVALID_CALLBACK_TOKEN)
        if session.state not in ACTIVE_STATES:
            raise Conflict(f"session is {session.state}", code=ErrorCode.SESSION_ENDED)
        bind(machine_id=session.machine_id, traceparent=session.traceparent)
        return session
