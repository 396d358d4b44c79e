"""Pipecat's runner arguments for the session's transport, built from the bot contract.

Daily: `DailyRunnerArguments(room_url, token, body)`; the bot's transport joins the room.
WebRTC: the runtime owns the session's `SmallWebRTCConnection` and serves its offer routes on
BOT_HOST:BOT_PORT (`bot_runtime.webrtc`) as soon as the session starts, as Pipecat's runner
does; it sees the peer connect (the session is ready) and close (the user left) itself.

Both carry the session's `body` and `session_id`; the signal flags stay False, as Pipecat's
runner leaves them for bots it hosts (the runtime handles SIGTERM and SIGINT), and
`pipeline_idle_timeout_secs` is BOT_IDLE_TIMEOUT_S when set (Pipecat's 300 s otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bot_runtime.contract import WEBRTC, BotEnv
from bot_runtime.outcome import JOIN_FAILED, PARTICIPANT_LEFT

if TYPE_CHECKING:
    from bot_runtime.session import BotSession
    from bot_runtime.webrtc import OfferServer

BOT_IDLE_TIMEOUT_S = "BOT_IDLE_TIMEOUT_S"
# RunnerArguments.pipeline_idle_timeout_secs as Pipecat's runner sets it.
PIPECAT_IDLE_TIMEOUT_S = 300.0
_NO_TIMEOUT = frozenset({"0", "none", "off"})


def idle_timeout(environ: Mapping[str, str]) -> float | None:
    """BOT_IDLE_TIMEOUT_S in seconds (None turns it off; unset, Pipecat's 300).

    A malformed value raises ValueError naming the variable.
    """
    raw = environ.get(BOT_IDLE_TIMEOUT_S, "").strip().lower()
    if not raw:
        return PIPECAT_IDLE_TIMEOUT_S
    if raw in _NO_TIMEOUT:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{BOT_IDLE_TIMEOUT_S} must be seconds or 'none', got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{BOT_IDLE_TIMEOUT_S} must be positive, got {raw!r}")
    return value


@dataclass
class SessionTransport:
    """The runner arguments of one session, and what the runtime holds for its transport."""

    runner_args: Any
    server: OfferServer | None = None
    connection: Any = None

    def wire(self, session: BotSession) -> None:
        """WebRTC: the peer connecting makes the session ready; closing it, the user's end."""
        if self.connection is None:
            return
        watch = session.watch

        async def connected(_connection: Any) -> None:
            watch.joined()

        async def closed(_connection: Any) -> None:
            if not watch.ending:
                session.record(PARTICIPANT_LEFT if watch.has_joined else JOIN_FAILED)

        self.connection.add_event_handler("connected", connected)
        self.connection.add_event_handler("closed", closed)

    async def close(self) -> None:
        """Stop serving the offer routes."""
        if self.server is not None:
            await self.server.close()


async def open_transport(
    env: BotEnv, idle_timeout_s: float | None = PIPECAT_IDLE_TIMEOUT_S
) -> SessionTransport:
    """The session's runner arguments; webrtc's offer routes are served from here on."""
    from pipecat.runner.types import (
        DailyRunnerArguments,
        RunnerArguments,
        SmallWebRTCRunnerArguments,
    )

    transport: SessionTransport
    args: RunnerArguments
    if env.transport == WEBRTC:
        from bot_runtime.webrtc import OfferServer, new_connection

        assert env.port is not None
        connection = new_connection(env.ice_servers)
        server = OfferServer(connection, session_id=env.session_id, host=env.host, port=env.port)
        args = SmallWebRTCRunnerArguments(
            webrtc_connection=connection, body=env.body, session_id=env.session_id
        )
        transport = SessionTransport(args, server, connection)
        await server.start()
    else:
        assert env.room_url is not None
        args = DailyRunnerArguments(
            room_url=env.room_url, token=env.daily_token, body=env.body, session_id=env.session_id
        )
        transport = SessionTransport(args)
    args.pipeline_idle_timeout_secs = idle_timeout_s
    return transport
