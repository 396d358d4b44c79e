"""`python -m bot_runtime [--transport daily|webrtc] [--room-url URL]`: run one dispatched session.

The runtime reads the bot contract (SESSION_ID, DAILY_ROOM_URL, ... from the dispatcher),
imports the team's bot named by BOT_ENTRYPOINT (`bot_runtime.entrypoint`) and calls its
`bot(runner_args)` with Pipecat's own runner arguments (`bot_runtime.transport`). Around that
call it does what the contract asks: `ready` once the user can be heard, the session's time
limit, SIGTERM and SIGINT, `ended` with the reason and exit code (`bot_runtime.session`), JSON
logs with the session's ID (`bot_runtime.logs`), and traces under TRACEPARENT
(`bot_runtime.tracing`).

Pooled (the warm pool: POOL_TOKEN set, no SESSION_ID; see `bot_runtime.pool`): load
everything first, the team's module included, then wait for the dispatcher to assign a
session, and run it as if started with the assignment's environment and command line.

Exit codes: 0 a clean end, 1 `bot()` raised or the bot could not join, 2 a missing or
malformed contract variable or a broken entry point (the `ended` report says which, when a
callback is possible), or a pooled machine the dispatcher refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypedDict, TypeVar

import httpx
from loguru import logger
from opentelemetry import trace

from bot_runtime.callbacks import CallbackTarget, DispatcherClient
from bot_runtime.contract import SESSION_ID, TRACEPARENT, TRANSPORTS, BotEnv
from bot_runtime.entrypoint import EntryPoint, EntryPointError, load, spec_from_environ
from bot_runtime.logs import JSON, JsonLogSink, configure_logging, environ_secrets
from bot_runtime.outcome import CONTRACT_ERROR, ENTRYPOINT_ERROR, EXIT_CONFIG, SessionOutcome
from bot_runtime.pool import boot, is_pooled, wait_for_session
from bot_runtime.preload import Preloaded
from bot_runtime.signals import StopSignals
from bot_runtime.tracing import ENDED_SPAN, TRACER_NAME, Tracing, remote_parent, remote_span

# How long the tasks a session leaves behind may take to finish once it is over.
CLEANUP_S = 1.0
T = TypeVar("T")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The runtime's command line."""
    parser = argparse.ArgumentParser(prog="python -m bot_runtime", description=__doc__)
    parser.add_argument("--room-url", help="the Daily room to join (equals DAILY_ROOM_URL)")
    parser.add_argument(
        "--transport", choices=TRANSPORTS, help="the session's transport (equals BOT_TRANSPORT)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="import BOT_ENTRYPOINT and check it, then exit: 0 if a session could run it, 2 if not",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the session; returns the process exit code."""
    signals = StopSignals()
    signals.install()
    args = parse_args(argv)
    environ = os.environ if environ is None else environ
    if args.check:
        return check(environ)
    preloaded: Preloaded | None = None
    if is_pooled(environ):
        booted = boot(environ, spec_from_environ(environ))
        if isinstance(booted, int):
            return booted
        sink = _configure_logging(environ, pooled=True)
        assigned = wait_for_session(*booted, environ=environ, signals=signals)
        if isinstance(assigned, int):
            return assigned
        args, environ, preloaded = parse_args(assigned.args), assigned.environ, assigned.preloaded
        os.environ.update(assigned.environ)
        sink.bind(environ_secrets(environ), **_log_fields(environ))
        logger.info("Assignment received: running the session")
    try:
        env = BotEnv.from_environ(
            environ, argv_room_url=args.room_url, argv_transport=args.transport
        )
    except ValueError as exc:
        print(f"bot_runtime: {exc}", file=sys.stderr)
        return _refuse(environ, CONTRACT_ERROR, str(exc))
    entry: EntryPoint | None = preloaded.entry if preloaded is not None else None
    try:
        if preloaded is None:
            entry = load(spec_from_environ(environ))
        elif preloaded.error is not None:
            raise EntryPointError(preloaded.error)
    except EntryPointError as exc:
        sink = _configure_logging(environ)
        logger.opt(exception=exc.__cause__).error(f"The bot cannot run: {exc}")
        return _refuse(environ, ENTRYPOINT_ERROR, sink.mask(str(exc)), target=env)
    assert entry is not None
    sink = _configure_logging(environ)
    logger.info(f"Running {entry.name} for session {env.session_id} ({env.transport})")
    tracing = Tracing.installed()
    if tracing is None:
        built = preloaded.span_exporters if preloaded is not None else None
        tracing = Tracing.from_environ(environ, session_id=env.session_id, built=built)
        if tracing is not None:
            tracing.install()
    if tracing is not None:
        tracing.stamp(environ, env.session_id)
    try:
        verify = preloaded.ssl_context if preloaded is not None else None
        outcome = run_bounded(_run(entry, env, environ, signals, sink, verify))
    finally:
        _flush(tracing)
    return outcome.exit_code


def run_bounded(coro: Coroutine[Any, Any, T], cleanup_s: float = CLEANUP_S) -> T:
    """Run `coro` on a new event loop, then give the tasks it left behind (Pipecat's, after a
    cancelled or abandoned pipeline) `cleanup_s` to finish, and close the loop without
    waiting for its executor's threads (one blocked in a native call would hold the exit)."""
    loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(coro)
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=cleanup_s))
        return result
    finally:
        loop.close()


def check(environ: Mapping[str, str]) -> int:
    """`--check`: import the entry point as a session would, and say whether it can run."""
    try:
        entry = load(spec_from_environ(environ))
    except EntryPointError as exc:
        print(f"bot_runtime: the bot cannot run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"bot_runtime: {entry.name} is ready to run")
    return 0


async def _run(
    entry: EntryPoint,
    env: BotEnv,
    environ: Mapping[str, str],
    signals: StopSignals,
    sink: JsonLogSink,
    verify: ssl.SSLContext | None = None,
) -> SessionOutcome:
    """The session under TRACEPARENT's span, then its `ended` callback (`verify`: a TLS
    context made ahead, a pooled bot's)."""
    from bot_runtime.session import BotSession, SessionLimits
    from bot_runtime.transport import idle_timeout, open_transport

    with remote_parent(env.traceparent):
        async with httpx.AsyncClient(verify=verify or True) as http:
            dispatcher = DispatcherClient(env, http)
            try:
                transport = await open_transport(env, idle_timeout(environ))
            except (OSError, ValueError) as exc:
                logger.error(f"The session's transport could not be opened: {exc}")
                outcome = SessionOutcome.refused(CONTRACT_ERROR, sink.mask(str(exc)))
            else:
                session = BotSession(
                    entry,
                    transport.runner_args,
                    on_ready=dispatcher.ready,
                    signals=signals,
                    limits=SessionLimits(max_duration_s=env.max_duration_s),
                    mask=sink.mask,
                )
                transport.wire(session)
                try:
                    outcome = await session.run()
                finally:
                    await transport.close()
            await _report(dispatcher, env.session_id, outcome)
            return outcome


async def _report(dispatcher: DispatcherClient, session_id: str, outcome: SessionOutcome) -> None:
    attributes: dict[str, str | int] = {
        "session.id": session_id,
        "session.end_reason": outcome.reason,
        "process.exit.code": outcome.exit_code,
    }
    if outcome.error:
        attributes["error.message"] = outcome.error
    with trace.get_tracer(TRACER_NAME).start_as_current_span(ENDED_SPAN, attributes=attributes):
        await dispatcher.ended(outcome.reason, outcome.exit_code, outcome.error)


def _refuse(
    environ: Mapping[str, str], reason: str, error: str, target: CallbackTarget | None = None
) -> int:
    """The session cannot start: tell the dispatcher why, if the contract allows a callback."""
    target = target or _CallbackOnly.of(environ)
    if target is not None:
        reporting = target

        async def report() -> None:
            async with httpx.AsyncClient() as http:
                await DispatcherClient(reporting, http).ended(reason, EXIT_CONFIG, error)

        asyncio.run(report())
    return EXIT_CONFIG


class _CallbackOnly:
    """Enough of the contract to call back: the session, the dispatcher and the token."""

    def __init__(self, session_id: str, dispatcher_url: str, callback_token: str) -> None:
        self.session_id = session_id
        self.dispatcher_url = dispatcher_url
        self.callback_token = callback_token
        self.traceparent: str | None = None

    @classmethod
    def of(cls, environ: Mapping[str, str]) -> _CallbackOnly | None:
        values = [
            environ.get(name, "").strip()
            for name in (SESSION_ID, "DISPATCHER_URL", "BOT_CALLBACK_TOKEN")
        ]
        if not all(values):
            return None
        return cls(values[0], values[1].rstrip("/"), values[2])


def _flush(tracing: Tracing | None) -> None:
    """Export the last spans (bounded), then flush the log streams."""
    if tracing is not None and not tracing.shutdown():
        logger.warning("Tracing: the last spans were not exported in time")
    sys.stdout.flush()
    sys.stderr.flush()


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


def run_and_exit() -> None:
    """Run, then leave at once: nothing (an exporter's atexit flush, a stuck pipeline thread)
    may hold the exit once the `ended` callback is sent and the last spans were given their
    bounded flush."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()
