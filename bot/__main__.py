"""`python -m bot --room-url <url>`: run one dispatched session and report how it ended.

Exit codes: 0 a clean end, 1 an error or a failed join, 2 a missing or malformed contract
variable (no callback is possible then).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence

import httpx
from loguru import logger

from bot.dispatcher_client import (
    SECRET_VARIABLES,
    SESSION_ID,
    TRACEPARENT,
    BotEnv,
    DispatcherClient,
)
from bot.logs import configure_logging
from bot.outcome import ERROR, EXIT_CONFIG, SessionOutcome


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The bot's command line."""
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    parser.add_argument("--room-url", help="the Daily room to join (equals DAILY_ROOM_URL)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the bot; returns the process exit code."""
    args = parse_args(argv)
    environ = os.environ if environ is None else environ
    _configure_logging(environ)
    try:
        env = BotEnv.from_environ(environ, argv_room_url=args.room_url)
    except ValueError as exc:
        print(f"bot: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    with asyncio.Runner() as runner:
        outcome = runner.run(run(env))
        if outcome.abandoned:
            # A pipeline stuck in Daily would hold the event loop's shutdown until it gives
            # up; `ended` has been sent, so leave now rather than when Fly kills the machine.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(outcome.exit_code)
    return outcome.exit_code


async def run(env: BotEnv) -> SessionOutcome:
    """Run the session of `env`, then send `ended` with the exit code about to be used."""
    async with httpx.AsyncClient() as http:
        dispatcher = DispatcherClient(env, http)
        try:
            outcome = await _run_session(env, dispatcher)
        except Exception:
            logger.exception("Bot failed")
            outcome = SessionOutcome.of(ERROR)
        await dispatcher.ended(outcome.reason, outcome.exit_code)
        return outcome


async def _run_session(env: BotEnv, dispatcher: DispatcherClient) -> SessionOutcome:
    # Imported here so that a bad environment fails fast, before pipecat's imports.
    from pipecat.runner.types import DailyRunnerArguments

    from bot.bot import SessionOptions, bot

    runner_args = DailyRunnerArguments(
        room_url=env.room_url, token=env.daily_token, body=env.body, session_id=env.session_id
    )
    runner_args.handle_sigterm = True
    runner_args.handle_sigint = True
    options = SessionOptions(on_ready=dispatcher.ready, max_duration_s=env.max_duration_s)
    return await bot(runner_args, options)


def _configure_logging(environ: Mapping[str, str]) -> None:
    parts = environ.get(TRACEPARENT, "").split("-")
    configure_logging(
        level=environ.get("LOG_LEVEL", "INFO"),
        secrets=[environ.get(name) for name in SECRET_VARIABLES],
        session_id=environ.get(SESSION_ID) or None,
        machine_id=environ.get("FLY_MACHINE_ID") or None,
        trace_id=parts[1] if len(parts) == 4 else None,
    )


if __name__ == "__main__":
    sys.exit(main())
