"""`python -m bot [--transport daily|webrtc] [--room-url URL]`: run one dispatched session.

Daily (the default): join the room of `--room-url`/DAILY_ROOM_URL. WebRTC: serve the
session's SmallWebRTC offer routes on BOT_HOST:BOT_PORT. Either way, report readiness and
how the session ended to the dispatcher.

Exit codes: 0 a clean end, 1 an error or a failed join, 2 a missing or malformed contract
variable (no callback is possible then).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

import httpx
from loguru import logger

from bot.dispatcher_client import (
    SESSION_ID,
    TRACEPARENT,
    TRANSPORTS,
    WEBRTC,
    BotEnv,
    DispatcherClient,
)
from bot.logs import configure_logging, environ_secrets
from bot.outcome import ERROR, EXIT_CONFIG, SIGINT, SIGTERM, SessionOutcome

if TYPE_CHECKING:
    from pipecat.runner.types import RunnerArguments

RunnerArgs = TypeVar("RunnerArgs", bound="RunnerArguments")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The bot's command line."""
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    parser.add_argument("--room-url", help="the Daily room to join (equals DAILY_ROOM_URL)")
    parser.add_argument(
        "--transport", choices=TRANSPORTS, help="the session's transport (equals BOT_TRANSPORT)"
    )
    return parser.parse_args(argv)


class EarlySignals:
    """Stop signals that arrive while the bot boots (imports, VAD load): remembered, so that
    the session ends at once for that reason when it starts, rather than the process dying
    of the signal without an `ended` callback."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._record)
        signal.signal(signal.SIGINT, self._record)

    def _record(self, signum: int, _frame: object) -> None:
        self.reason = self.reason or (SIGTERM if signum == signal.SIGTERM else SIGINT)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the bot; returns the process exit code."""
    early = EarlySignals()
    early.install()
    args = parse_args(argv)
    environ = os.environ if environ is None else environ
    _configure_logging(environ)
    try:
        env = BotEnv.from_environ(
            environ, argv_room_url=args.room_url, argv_transport=args.transport
        )
    except ValueError as exc:
        print(f"bot: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    with asyncio.Runner() as runner:
        outcome = runner.run(run(env, lambda: early.reason))
        if outcome.abandoned:
            # A pipeline stuck in Daily would hold the event loop's shutdown until it gives
            # up; `ended` has been sent, so leave now rather than when Fly kills the machine.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(outcome.exit_code)
    return outcome.exit_code


async def run(
    env: BotEnv, stop_requested: Callable[[], str | None] = lambda: None
) -> SessionOutcome:
    """Run the session of `env`, then send `ended` with the exit code about to be used."""
    async with httpx.AsyncClient() as http:
        dispatcher = DispatcherClient(env, http)
        try:
            outcome = await _run_session(env, dispatcher, stop_requested)
        except Exception:
            logger.exception("Bot failed")
            outcome = SessionOutcome.of(ERROR)
        await dispatcher.ended(outcome.reason, outcome.exit_code)
        return outcome


async def _run_session(
    env: BotEnv, dispatcher: DispatcherClient, stop_requested: Callable[[], str | None]
) -> SessionOutcome:
    # Imported here so that a bad environment fails fast, before pipecat's imports.
    from pipecat.runner.types import DailyRunnerArguments, SmallWebRTCRunnerArguments

    from bot.bot import bot
    from bot.session import SessionOptions

    options = SessionOptions(
        on_ready=dispatcher.ready,
        max_duration_s=env.max_duration_s,
        stop_requested=stop_requested,
    )
    if env.transport != WEBRTC:
        daily_args = DailyRunnerArguments(
            room_url=env.room_url, token=env.daily_token, body=env.body, session_id=env.session_id
        )
        return await bot(_handling_signals(daily_args), options)

    # The peer connection exists before its offer: the pipeline runs, then the port listens.
    from bot.webrtc import OfferServer, new_connection

    assert env.port is not None
    connection = new_connection(env.ice_servers)
    server = OfferServer(connection, session_id=env.session_id, host=env.host, port=env.port)
    webrtc_args = SmallWebRTCRunnerArguments(
        webrtc_connection=connection, body=env.body, session_id=env.session_id
    )
    try:
        return await bot(_handling_signals(webrtc_args), replace(options, on_started=server.start))
    finally:
        await server.close()


def _handling_signals(runner_args: RunnerArgs) -> RunnerArgs:
    runner_args.handle_sigterm = True
    runner_args.handle_sigint = True
    return runner_args


def _configure_logging(environ: Mapping[str, str]) -> None:
    parts = environ.get(TRACEPARENT, "").split("-")
    configure_logging(
        level=environ.get("LOG_LEVEL", "INFO"),
        secrets=environ_secrets(environ),
        session_id=environ.get(SESSION_ID) or None,
        machine_id=environ.get("FLY_MACHINE_ID") or None,
        trace_id=parts[1] if len(parts) == 4 else None,
    )


if __name__ == "__main__":
    sys.exit(main())
