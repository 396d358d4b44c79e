#
# The example bot: a Pipecat bot written as Pipecat's own examples are, run unchanged by
# Pipecat's development runner (`python bot.py`) and by the dispatcher's bot runtime.
#
# With DEEPGRAM_API_KEY, OPENAI_API_KEY and CARTESIA_API_KEY set it holds a conversation
# (Deepgram STT, an OpenAI-compatible LLM at OPENAI_BASE_URL with OPENAI_MODEL, Cartesia TTS in
# CARTESIA_VOICE_ID's voice; the session body's `systemPrompt` replaces the default prompt).
# Without them it is an offline echo: it plays each utterance back once the user stops
# speaking. Either way it greets the user when they connect (a short chime in echo mode),
# ends when they leave, and says goodbye when the host stops it (`on_session_stop`). In echo
# mode it also tells the client what it is, an RTVI server message the dispatcher's page shows:
# {"type": "bot-info", "mode": "echo"}.
#

import os

from dotenv import load_dotenv
from echo import ECHO_SAMPLE_RATE, EchoProcessor, chime_frame
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import LLMRunFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frameworks.rtvi import RTVIServerMessageFrame
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.transports.daily.transport import DailyParams
from pipecat.workers.runner import WorkerRunner

load_dotenv(override=True)

IS_TRACING_ENABLED = bool(os.getenv("ENABLE_TRACING"))

if IS_TRACING_ENABLED:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from pipecat.utils.tracing.setup import setup_tracing

    setup_tracing(service_name="pipecat-bot", exporter=OTLPSpanExporter())

PROVIDER_KEYS = ("DEEPGRAM_API_KEY", "OPENAI_API_KEY", "CARTESIA_API_KEY")
SYSTEM_PROMPT = (
    "You are a friendly voice assistant in a live audio call. Your replies are spoken aloud, "
    "so keep them short and conversational: one or two sentences, no lists, no markdown, "
    "no emoji."
)
GOODBYE = "Sorry, I have to go now. Goodbye!"
# Cartesia's "British Reading Lady", the voice of Pipecat's examples.
CARTESIA_VOICE = "71a7ad14-091c-4e8e-a314-022ece01c121"

# We use lambdas to defer transport parameter creation until the transport
# type is selected at runtime.
transport_params = {
    "daily": lambda: DailyParams(
        audio_in_enabled=True,
        audio_out_enabled=True,
    ),
    "webrtc": lambda: TransportParams(
        audio_in_enabled=True,
        audio_out_enabled=True,
    ),
}


def is_conversation() -> bool:
    """Whether every provider has its key (else the bot is an echo)."""
    return all(os.getenv(key, "").strip() for key in PROVIDER_KEYS)


def system_prompt(body) -> str:
    """The session body's `systemPrompt`, or the default one."""
    prompt = body.get("systemPrompt") if isinstance(body, dict) else None
    return prompt.strip() if isinstance(prompt, str) and prompt.strip() else SYSTEM_PROMPT


def conversation(transport: BaseTransport, runner_args: RunnerArguments):
    """The conversation's pipeline, and what greets the user."""
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )
    from pipecat.services.cartesia.tts import CartesiaTTSService
    from pipecat.services.deepgram.stt import DeepgramSTTService
    from pipecat.services.openai.llm import OpenAILLMService

    stt = DeepgramSTTService(api_key=os.environ["DEEPGRAM_API_KEY"])

    voice = os.getenv("CARTESIA_VOICE_ID") or CARTESIA_VOICE
    tts = CartesiaTTSService(
        api_key=os.environ["CARTESIA_API_KEY"],
        settings=CartesiaTTSService.Settings(voice=voice),
    )

    settings = OpenAILLMService.Settings(system_instruction=system_prompt(runner_args.body))
    if os.getenv("OPENAI_MODEL"):
        settings.model = os.environ["OPENAI_MODEL"]
    llm = OpenAILLMService(
        api_key=os.environ["OPENAI_API_KEY"],
        base_url=os.getenv("OPENAI_BASE_URL") or None,
        settings=settings,
    )

    context = LLMContext()
    user_aggregator, assistant_aggregator = LLMContextAggregatorPair(
        context,
        user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer()),
    )

    pipeline = Pipeline(
        [
            transport.input(),  # Transport user input
            stt,
            user_aggregator,  # User responses
            llm,  # LLM
            tts,  # TTS
            transport.output(),  # Transport bot output
            assistant_aggregator,  # Assistant spoken responses
        ]
    )

    def greeting():
        context.add_message({"role": "developer", "content": "Please introduce yourself."})
        return [LLMRunFrame()]

    return pipeline, PipelineParams(enable_metrics=True, enable_usage_metrics=True), greeting


def echo(transport: BaseTransport):
    """The echo's pipeline, and what greets the user: its bot-info for the client, a chime."""
    pipeline = Pipeline(
        [
            transport.input(),
            VADProcessor(vad_analyzer=SileroVADAnalyzer()),
            EchoProcessor(),  # Plays each utterance back
            transport.output(),
        ]
    )
    params = PipelineParams(
        audio_in_sample_rate=ECHO_SAMPLE_RATE,
        audio_out_sample_rate=ECHO_SAMPLE_RATE,
        enable_metrics=True,
    )

    def greeting():
        # Tell the client what this bot is (the dispatcher's page says it), then chime.
        bot_info = RTVIServerMessageFrame(data={"type": "bot-info", "mode": "echo"})
        return [bot_info, chime_frame(ECHO_SAMPLE_RATE)]

    return pipeline, params, greeting


async def run_bot(transport: BaseTransport, runner_args: RunnerArguments):
    if is_conversation():
        logger.info("Starting bot: conversation (Deepgram, OpenAI, Cartesia)")
        pipeline, params, greeting = conversation(transport, runner_args)
    else:
        missing = ", ".join(key for key in PROVIDER_KEYS if not os.getenv(key, "").strip())
        logger.info(f"Starting bot: echo ({missing} not set)")
        pipeline, params, greeting = echo(transport)

    worker = PipelineWorker(
        pipeline,
        params=params,
        enable_tracing=IS_TRACING_ENABLED,
        conversation_id=runner_args.session_id,
        idle_timeout_secs=runner_args.pipeline_idle_timeout_secs,
    )

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client):
        logger.info("Client connected")
        # Greet the user as soon as they can hear it.
        await worker.queue_frames(greeting())

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        logger.info("Client disconnected")
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)

    await runner.add_workers(worker)
    await runner.run()


async def on_session_stop(worker: PipelineWorker, reason: str):
    """Called by the dispatcher's bot runtime before it ends a session it was asked to stop."""
    logger.info(f"Saying goodbye ({reason})")
    if is_conversation():
        await worker.queue_frames([TTSSpeakFrame(GOODBYE, append_to_context=False)])
    else:
        await worker.queue_frames([chime_frame(ECHO_SAMPLE_RATE)])


async def bot(runner_args: RunnerArguments):
    """Main bot entry point compatible with Pipecat Cloud."""
    transport = await create_transport(runner_args, transport_params)
    await run_bot(transport, runner_args)


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
