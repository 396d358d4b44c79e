"""The session's pipelines: the offline echo, or a conversation (STT, LLM, TTS).

Pipecat 1.14 has no VAD on the transport: Silero runs in a `VADProcessor` for the echo, and
in the user aggregator (`LLMUserAggregatorParams.vad_analyzer`) for a conversation. RTVI is
added by `PipelineWorker` itself (an `RTVIProcessor` first in the pipeline and its observer),
which answers the client's `client-ready` with `bot-ready`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer
from pipecat.frames.frames import Frame, LLMMessagesAppendFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.transports.base_transport import BaseTransport

from bot.echo import EchoProcessor, chime_frame
from bot.services import CONVERSATION, ECHO, Services

# The echo plays back what it heard: the same rate in and out, no resampling.
ECHO_SAMPLE_RATE = 16000
GREETING_PROMPT = "Greet the user in one short sentence and ask how you can help."
GOODBYE_TEXT = "Sorry, I have to go now. Goodbye!"


@dataclass
class BotPipeline:
    """A built pipeline, its worker, and what it says when the user arrives and leaves."""

    pipeline: Pipeline
    worker: PipelineWorker
    mode: str
    sample_rate_out: int

    def greeting(self) -> Sequence[Frame]:
        """Frames that greet the user as they arrive (a conversation speaks first)."""
        if self.mode != CONVERSATION:
            return []
        return [
            LLMMessagesAppendFrame(
                messages=[{"role": "user", "content": GREETING_PROMPT}], run_llm=True
            )
        ]

    def goodbye(self) -> Sequence[Frame]:
        """Frames that say goodbye before the end: spoken with TTS, else a chime."""
        if self.mode == CONVERSATION:
            return [TTSSpeakFrame(GOODBYE_TEXT, append_to_context=False)]
        return [chime_frame(self.sample_rate_out)]


def build_pipeline(
    transport: BaseTransport,
    *,
    session_id: str | None,
    idle_timeout_secs: float | None,
    services: Services | None = None,
    vad_analyzer: VADAnalyzer | None = None,
    tracing: bool = False,
) -> BotPipeline:
    """The session's pipeline and its worker, built without connecting anything.

    With `services` it is a conversation, else the echo. With `tracing`, Pipecat records a
    "conversation" span (`conversation.id` and `session.id` the session's ID) under the
    current span context, its "turn" spans, and the services' spans under those.
    """
    vad = vad_analyzer or SileroVADAnalyzer()
    if services is None:
        mode = ECHO
        processors = [
            transport.input(),
            VADProcessor(vad_analyzer=vad),
            EchoProcessor(),
            transport.output(),
        ]
        rates = {
            "audio_in_sample_rate": ECHO_SAMPLE_RATE,
            "audio_out_sample_rate": ECHO_SAMPLE_RATE,
        }
    else:
        mode = CONVERSATION
        processors = _conversation(transport, services, vad)
        rates = {}
    params = PipelineParams(enable_metrics=True, enable_usage_metrics=True, **rates)
    pipeline = Pipeline(processors)
    worker = PipelineWorker(
        pipeline,
        params=params,
        conversation_id=session_id,
        enable_tracing=tracing,
        additional_span_attributes={"session.id": session_id} if session_id else None,
        idle_timeout_secs=idle_timeout_secs,
        cancel_on_idle_timeout=True,
    )
    return BotPipeline(pipeline, worker, mode, params.audio_out_sample_rate)


def _conversation(
    transport: BaseTransport, services: Services, vad: VADAnalyzer
) -> list[FrameProcessor]:
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )

    context = LLMContext()
    aggregators = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=vad)
    )
    return [
        transport.input(),
        services.stt,
        aggregators.user(),
        services.llm,
        services.tts,
        transport.output(),
        aggregators.assistant(),
    ]
