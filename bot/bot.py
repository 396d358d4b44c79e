"""The Pipecat bot run once per session, over Daily or SmallWebRTC, as an echo or a conversation.

`bot(runner_args)` follows Pipecat's runner convention: `DailyRunnerArguments` join a Daily
room, `SmallWebRTCRunnerArguments` carry the session's peer connection. The providers' keys
in the environment choose the pipeline (see `bot.services`); only the transport and the
services in use are imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADAnalyzer
from pipecat.runner.types import (
    DailyRunnerArguments,
    RunnerArguments,
    SmallWebRTCRunnerArguments,
)
from pipecat.transports.base_transport import BaseTransport

from bot.outcome import SessionOutcome
from bot.pipeline import build_pipeline
from bot.services import CONVERSATION, Providers, build_services, system_prompt
from bot.session import DAILY, WEBRTC, BotSession, SessionOptions
from bot.tracing import tracing_configured

BOT_NAME = "Pipecat Bot"
# What `build_transport` imports for each transport (a pooled bot imports them at boot).
TRANSPORT_MODULES = {
    DAILY: ("pipecat.transports.daily.transport",),
    WEBRTC: ("pipecat.transports.smallwebrtc.transport", "bot.webrtc"),
}


def build_transport(runner_args: RunnerArguments) -> tuple[BaseTransport, str]:
    """The session's transport (it connects when the pipeline starts) and its kind."""
    if isinstance(runner_args, DailyRunnerArguments):
        from pipecat.transports.daily.transport import DailyParams, DailyTransport

        params = DailyParams(audio_in_enabled=True, audio_out_enabled=True)
        return DailyTransport(runner_args.room_url, runner_args.token, BOT_NAME, params), DAILY
    if isinstance(runner_args, SmallWebRTCRunnerArguments):
        from pipecat.transports.base_transport import TransportParams
        from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

        params = TransportParams(audio_in_enabled=True, audio_out_enabled=True)
        transport = SmallWebRTCTransport(
            webrtc_connection=runner_args.webrtc_connection, params=params
        )
        return transport, WEBRTC
    raise TypeError(f"unsupported runner arguments: {type(runner_args).__name__}")


async def bot(
    runner_args: RunnerArguments,
    options: SessionOptions | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    vad_analyzer: VADAnalyzer | None = None,
) -> SessionOutcome:
    """Pipecat's bot entry point: run one session on the transport of `runner_args`.

    The providers' keys and the `OTEL_*` variables are read from `environ` (the process
    environment by default). `vad_analyzer` is a Silero analyzer loaded in advance (a pooled
    bot's); without it the pipeline loads its own.
    """
    environ = os.environ if environ is None else environ
    providers = Providers.from_environ(environ)
    logger.info(f"Bot in {providers.describe()}")
    services = None
    if providers.mode == CONVERSATION:
        services = build_services(providers, prompt=system_prompt(runner_args.body))
    transport, kind = build_transport(runner_args)
    built = build_pipeline(
        transport,
        session_id=runner_args.session_id,
        idle_timeout_secs=runner_args.pipeline_idle_timeout_secs,
        services=services,
        vad_analyzer=vad_analyzer,
        tracing=tracing_configured(environ),
    )
    session = BotSession(
        transport,
        built.worker,
        options,
        kind=kind,
        greeting=built.greeting,
        goodbye=built.goodbye,
    )
    try:
        return await session.run(
            handle_sigterm=runner_args.handle_sigterm, handle_sigint=runner_args.handle_sigint
        )
    finally:
        # Pipecat ends its spans when the pipeline is cleaned up; an abandoned one never is.
        if built.worker.turn_trace_observer is not None:
            built.worker.turn_trace_observer.end_conversation_tracing()
