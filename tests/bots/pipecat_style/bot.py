#
# A bot in the style of Pipecat's 1.x examples (examples/getting-started/06-voice-agent.py):
# the same imports, `load_dotenv(override=True)`, the transport from `create_transport`, a
# `PipelineWorker` run by `WorkerRunner(handle_sigint=runner_args.handle_sigint)`, and the
# logging set-up many Pipecat bots have at import. Its pipeline passes audio through and greets
# the user with a short tone (there is no provider to speak with offline).
#

import sys

import numpy as np
from dotenv import load_dotenv
from loguru import logger
from pipecat.frames.frames import OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.transports.daily.transport import DailyParams
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams
from pipecat.workers.runner import WorkerRunner

load_dotenv(override=True)

logger.remove(0)
logger.add(sys.stderr, level="DEBUG")

# We use lambdas to defer transport parameter creation until the transport
# type is selected at runtime.
transport_params = {
    "daily": lambda: DailyParams(
        audio_in_enabled=True,
        audio_out_enabled=True,
    ),
    "twilio": lambda: FastAPIWebsocketParams(
        audio_in_enabled=True,
        audio_out_enabled=True,
    ),
    "webrtc": lambda: TransportParams(
        audio_in_enabled=True,
        audio_out_enabled=True,
    ),
}


def tone(sample_rate: int = 24000, seconds: float = 0.3) -> OutputAudioRawFrame:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    samples = (np.sin(2 * np.pi * 660 * t) * 0.3 * 32767).astype(np.int16)
    return OutputAudioRawFrame(audio=samples.tobytes(), sample_rate=sample_rate, num_channels=1)


async def run_bot(transport: BaseTransport, runner_args: RunnerArguments):
    logger.info("Starting bot")

    pipeline = Pipeline(
        [
            transport.input(),  # Transport user input
            transport.output(),  # Transport bot output
        ]
    )

    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(
            enable_metrics=True,
            enable_usage_metrics=True,
        ),
        idle_timeout_secs=runner_args.pipeline_idle_timeout_secs,
    )

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client):
        logger.info("Client connected")
        # Kick off the conversation.
        await worker.queue_frames([tone()])

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        logger.info("Client disconnected")
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)

    await runner.add_workers(worker)
    await runner.run()


async def bot(runner_args: RunnerArguments):
    """Main bot entry point compatible with Pipecat Cloud."""
    transport = await create_transport(runner_args, transport_params)
    await run_bot(transport, runner_args)


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
