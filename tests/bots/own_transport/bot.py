#
# A bot that builds its transport from the runner arguments itself, as Pipecat's older examples
# do, with the deprecated `PipelineTask`/`PipelineRunner` names, and that reads `body`:
#
#   {"greeting": "..."}   logged when the user connects ("Greeting: ...")
#   {"fail": "..."}       bot() raises ValueError with that message once the user connects
#
# When BOT_IMPORT_MARKER names a file, importing this module appends "<time> <pid>" to it (the
# warm pool's tests: a pooled bot imports the team's module before it asks for a session).
#

import os
import time

from loguru import logger
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.runner.types import (
    DailyRunnerArguments,
    RunnerArguments,
    SmallWebRTCRunnerArguments,
)
from pipecat.transports.base_transport import TransportParams

if os.getenv("BOT_IMPORT_MARKER"):
    with open(os.environ["BOT_IMPORT_MARKER"], "a") as marker:
        marker.write(f"{time.time()} {os.getpid()}\n")


def make_transport(runner_args: RunnerArguments):
    if isinstance(runner_args, DailyRunnerArguments):
        from pipecat.transports.daily.transport import DailyParams, DailyTransport

        params = DailyParams(audio_in_enabled=True, audio_out_enabled=True)
        return DailyTransport(runner_args.room_url, runner_args.token, "Own Transport Bot", params)
    if isinstance(runner_args, SmallWebRTCRunnerArguments):
        from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

        params = TransportParams(audio_in_enabled=True, audio_out_enabled=True)
        return SmallWebRTCTransport(webrtc_connection=runner_args.webrtc_connection, params=params)
    raise ValueError(f"unsupported runner arguments: {type(runner_args).__name__}")


async def bot(runner_args: RunnerArguments):
    body = runner_args.body or {}
    transport = make_transport(runner_args)
    task = PipelineTask(
        Pipeline([transport.input(), transport.output()]),
        params=PipelineParams(enable_metrics=True),
        idle_timeout_secs=runner_args.pipeline_idle_timeout_secs,
    )
    failure: list[str] = []

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client):
        logger.info(f"Greeting: {body.get('greeting', 'hello')}")
        if body.get("fail"):
            failure.append(body["fail"])
            await task.cancel()

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        await task.cancel()

    runner = PipelineRunner(handle_sigint=runner_args.handle_sigint)
    await runner.run(task)
    if failure:
        raise ValueError(failure[0])
