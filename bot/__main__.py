"""`python -m bot [--transport daily|webrtc] [--room-url URL]`: run one dispatched session.

Daily (the default): join the room of `--room-url`/DAILY_ROOM_URL. WebRTC: serve the
session's SmallWebRTC offer routes on BOT_HOST:BOT_PORT. Either way, report readiness and
how the session ended to the dispatcher.

Pooled (the warm pool: POOL_TOKEN set, no SESSION_ID; see `bot.pool`): load everything
first, then wait for the dispatcher to assign a session, and run it as if started with the
assignment's environment and command line. Retired or stopped before that: exit 0.

Exit codes: 0 a clean end, 1 an error or a failed join, 2 a missing or malformed contract
variable, or a pooled machine the dispatcher refuses (no callback is possible then).

Traces (see `bot.tracing`): the session runs under TRACEPARENT's span, and the spans still
queued are exported before the process exits, however it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import httpx
from loguru import logger
from opentelemetry import trace

from bot.dispatcher_client import (
    SESSION_ID,
    TRACEPARENT,
    TRANSPORTS,
    WEBRTC,
    BotEnv,
    DispatcherClient,
)
from bot.logs import JSON, JsonLogSink, configure_logging, environ_secrets
from bot.outcome import ERROR, EXIT_CONFIG, SIGINT, SIGTERM, SessionOutcome
from bot.pool import Preloaded, boot_then_wait, is_pooled
from bot.tracing import ENDED_SPAN, TRACER_NAME, Tracing, remote_parent, remote_span

if TYPE_CHECKING:
    from pipecat.audio.vad.vad_analyzer import VADAnalyzer
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
    preloaded: Preloaded | None = None
    if is_pooled(environ):
        sink = _configure_logging(environ, pooled=True)
        assigned = boot_then_wait(environ, lambda: early.reason)
        if isinstance(assigned, int):
            return assigned
        args, environ, preloaded = parse_args(assigned.args), assigned.environ, assigned.preloaded
        sink.bind(environ_secrets(environ), **_log_fields(environ))
        logger.info("Assignment received: running the session")
    else:
        _configure_logging(environ)
    try:
        env = BotEnv.from_environ(
            environ, argv_room_url=args.room_url, argv_transport=args.transport
        )
    except ValueError as exc:
        print(f"bot: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    tracing = Tracing.from_environ(
        environ,
        session_id=env.session_id,
        built=preloaded.span_exporters if preloaded is not None else None,
    )
    if tracing is not None:
        tracing.install()
    vad_analyzer = preloaded.vad_analyzer if preloaded is not None else None
    try:
        with asyncio.Runner() as runner:
            session = run(env, lambda: early.reason, environ=environ, vad_analyzer=vad_analyzer)
            outcome = runner.run(session)
            if outcome.abandoned:
                # A pipeline stuck in Daily would hold the event loop's shutdown until it gives
                # up; `ended` has been sent, so leave now rather than when Fly kills the machine.
                _flush(tracing)
                os._exit(outcome.exit_code)
    finally:
        _flush(tracing)
    return outcome.exit_code


def _flush(tracing: Tracing | None) -> None:
    """Export the last spans (bounded), then flush the log streams."""
    if tracing is not None and not tracing.shutdown():
        logger.warning("Tracing: the last spans were not exported in time")
    sys.stdout.flush()
    sys.stderr.flush()


async def run(
    env: BotEnv,
    stop_requested: Callable[[], str | None] = lambda: None,
    *,
    environ: Mapping[str, str] | None = None,
    vad_analyzer: VADAnalyzer | None = None,
) -> SessionOutcome:
    """Run the session of `env`, then send `ended` with the exit code about to be used.

    `environ` (the process's by default) holds the providers' keys and `OTEL_*` settings;
    `vad_analyzer` is a Silero analyzer loaded in advance (a pooled bot's). All of it runs
    under TRACEPARENT's span: the pipeline's tasks, created here, inherit it.
    """
    with remote_parent(env.traceparent):
        async with httpx.AsyncClient() as http:
            dispatcher = DispatcherClient(env, http)
            try:
                outcome = await _run_session(
                    env, dispatcher, stop_requested, environ=environ, vad_analyzer=vad_analyzer
                )
            except Exception:
                logger.exception("Bot failed")
                outcome = SessionOutcome.of(ERROR)
            attributes: dict[str, str | int] = {
                "session.id": env.session_id,
                "session.end_reason": outcome.reason,
                "process.exit.code": outcome.exit_code,
            }
            with trace.get_tracer(TRACER_NAME).start_as_current_span(
                ENDED_SPAN, attributes=attributes
            ):
                await dispatcher.ended(outcome.reason, outcome.exit_code)
            return outcome


async def _run_session(
    env: BotEnv,
    dispatcher: DispatcherClient,
    stop_requested: Callable[[], str | None],
    *,
    environ: Mapping[str, str] | None,
    vad_analyzer: VADAnalyzer | None,
) -> SessionOutcome:
    # Imported here so that a bad environment fails fast, before pipecat's imports.
    from pipecat.runner.types import DailyRunnerArguments, SmallWebRTCRunnerArguments

    from bot.bot import bot
    from bot.session import SessionOptions

    extras: dict[str, Any] = {"environ": environ, "vad_analyzer": vad_analyzer}
    options = SessionOptions(
        on_ready=dispatcher.ready,
        max_duration_s=env.max_duration_s,
        stop_requested=stop_requested,
    )
    if env.transport != WEBRTC:
        daily_args = DailyRunnerArguments(
            room_url=env.room_url, token=env.daily_token, body=env.body, session_id=env.session_id
        )
        return await bot(_handling_signals(daily_args), options, **extras)

    # The peer connection exists before its offer: the pipeline runs, then the port listens.
    from bot.webrtc import OfferServer, new_connection

    assert env.port is not None
    connection = new_connection(env.ice_servers)
    server = OfferServer(connection, session_id=env.session_id, host=env.host, port=env.port)
    webrtc_args = SmallWebRTCRunnerArguments(
        webrtc_connection=connection, body=env.body, session_id=env.session_id
    )
    try:
        started = replace(options, on_started=server.start)
        return await bot(_handling_signals(webrtc_args), started, **extras)
    finally:
        await server.close()


def _handling_signals(runner_args: RunnerArgs) -> RunnerArgs:
    runner_args.handle_sigterm = True
    runner_args.handle_sigint = True
    return runner_args


def _configure_logging(environ: Mapping[str, str], *, pooled: bool = False) -> JsonLogSink:
    """Log lines carry the session's fields; a pooled bot's also `pooled`, and its session's
    fields only once it has one (`_log_fields` of the assigned environment, bound then)."""
    return configure_logging(
        level=environ.get("LOG_LEVEL", "INFO"),
        log_format=environ.get("LOG_FORMAT", JSON),
        secrets=environ_secrets(environ),
        pooled=pooled or None,
        **_log_fields(environ),
    )


class LogFields(TypedDict):
    """The fields every log line of a session carries (None: not known)."""

    session_id: str | None
    machine_id: str | None
    trace_id: str | None


def _log_fields(environ: Mapping[str, str]) -> LogFields:
    parent = remote_span(environ.get(TRACEPARENT))
    return LogFields(
        session_id=environ.get(SESSION_ID) or None,
        machine_id=environ.get("FLY_MACHINE_ID") or None,
        trace_id=trace.format_trace_id(parent.trace_id) if parent else None,
    )


if __name__ == "__main__":
    sys.exit(main())
