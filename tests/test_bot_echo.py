"""The example bot's echo processor: frames in, frames out, and the real VAD on real speech."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import soundfile

with warnings.catch_warnings():
    # pipecat.audio.utils imports audioop, deprecated in Python 3.11 (audioop-lts from 3.13).
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.frames.frames import (
        Frame,
        InputAudioRawFrame,
        OutputAudioRawFrame,
        TextFrame,
        VADUserStartedSpeakingFrame,
        VADUserStoppedSpeakingFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.processors.audio.vad_processor import VADProcessor
    from pipecat.tests.utils import run_test

    from tests.bots import example_module

    echo_module = example_module("echo")
    EchoProcessor, chime = echo_module.EchoProcessor, echo_module.chime

RATE = 16000
FRAME = 320  # 20 ms
UTTERANCE = Path(__file__).parent / "fixtures" / "utterance_16k.wav"


def audio(value: int, seconds: float, rate: int = RATE) -> list[InputAudioRawFrame]:
    """`seconds` of 20 ms input frames whose every sample is `value`."""
    size = rate // 50
    count = round(seconds * 50)
    return [
        InputAudioRawFrame(
            audio=np.full(size, value, dtype=np.int16).tobytes(), sample_rate=rate, num_channels=1
        )
        for _ in range(count)
    ]


def samples(frame: OutputAudioRawFrame) -> np.ndarray:
    return np.frombuffer(frame.audio, dtype=np.int16)


async def echo(frames: list[Frame], **kwargs: float) -> list[Frame]:
    """The frames an `EchoProcessor` sends downstream for `frames`."""
    down, _ = await run_test(EchoProcessor(**kwargs), frames_to_send=frames)
    return list(down)


async def test_plays_back_the_utterance_with_its_pre_roll() -> None:
    """Input audio is held, never passed on; at the VAD's stop the utterance comes out as one
    output frame: the last `pre_roll_s` before the start, then everything after it."""
    frames = [
        *audio(1, 1.0),
        VADUserStartedSpeakingFrame(),
        *audio(2, 1.0),
        TextFrame("passes"),
        VADUserStoppedSpeakingFrame(),
    ]
    down = await echo(frames, pre_roll_s=0.3)
    # System frames (VAD, input audio) overtake queued data frames: compare as a multiset.
    assert sorted(type(f).__name__ for f in down) == [
        "OutputAudioRawFrame",
        "TextFrame",
        "VADUserStartedSpeakingFrame",
        "VADUserStoppedSpeakingFrame",
    ]
    [out] = [f for f in down if isinstance(f, OutputAudioRawFrame)]
    assert (out.sample_rate, out.num_channels) == (RATE, 1)
    played = samples(out)
    assert np.array_equal(played, np.concatenate([np.full(4800, 1), np.full(16000, 2)]))


async def test_a_long_utterance_is_cut_to_its_last_seconds() -> None:
    """The buffer is bounded: an utterance longer than `max_utterance_s` plays its end."""
    frames = [
        VADUserStartedSpeakingFrame(),
        *audio(1, 1.0),
        *audio(2, 0.5),
        VADUserStoppedSpeakingFrame(),
    ]
    down = await echo(frames, pre_roll_s=0.1, max_utterance_s=0.5)
    [out] = [f for f in down if isinstance(f, OutputAudioRawFrame)]
    assert np.array_equal(samples(out), np.full(8000, 2))


async def test_each_utterance_is_played_once() -> None:
    """Two utterances play back one after the other; a stop without a start plays nothing."""
    frames = [
        VADUserStoppedSpeakingFrame(),
        VADUserStartedSpeakingFrame(),
        *audio(1, 0.2),
        VADUserStoppedSpeakingFrame(),
        *audio(0, 1.0),
        VADUserStartedSpeakingFrame(),
        *audio(2, 0.2),
        VADUserStoppedSpeakingFrame(),
    ]
    down = await echo(frames, pre_roll_s=0.0)
    outs = [samples(f) for f in down if isinstance(f, OutputAudioRawFrame)]
    assert [set(o.tolist()) for o in outs] == [{1}, {2}]


async def test_a_partial_tail_is_padded_to_10_ms() -> None:
    """Output transports take whole 10 ms chunks: an odd-sized utterance is padded."""
    odd = InputAudioRawFrame(audio=bytes(2 * 250), sample_rate=RATE, num_channels=1)
    down = await echo([VADUserStartedSpeakingFrame(), odd, VADUserStoppedSpeakingFrame()])
    [out] = [f for f in down if isinstance(f, OutputAudioRawFrame)]
    assert len(samples(out)) == 320


async def test_silero_hears_the_fixture_as_one_utterance() -> None:
    """The real VAD in front of the echo turns the recorded utterance (between silences) into
    one output frame holding all of its speech."""
    speech, rate = soundfile.read(UTTERANCE, dtype="int16")
    assert rate == RATE
    signal = np.concatenate([np.zeros(RATE, np.int16), speech, np.zeros(RATE, np.int16)])
    frames: list[Frame] = [
        InputAudioRawFrame(audio=signal[i : i + FRAME].tobytes(), sample_rate=RATE, num_channels=1)
        for i in range(0, len(signal) - FRAME + 1, FRAME)
    ]
    pipeline = Pipeline([VADProcessor(vad_analyzer=SileroVADAnalyzer()), EchoProcessor()])
    down, _ = await run_test(pipeline, frames_to_send=frames)
    outs = [f for f in down if isinstance(f, OutputAudioRawFrame)]
    assert len(outs) == 1
    played = samples(outs[0])
    # Pre-roll and the VAD's stop delay around all of the speech, nothing much more.
    assert len(speech) <= len(played) <= len(speech) + RATE
    loud = np.flatnonzero(np.abs(speech) > 1000)
    start = int(np.flatnonzero(np.abs(played) > 1000)[0])
    assert np.array_equal(played[start : start + 1600], speech[loud[0] : loud[0] + 1600])


def test_chime_is_short_and_audible() -> None:
    """The goodbye chime is under half a second of whole 10 ms chunks, and not silent."""
    pcm = np.frombuffer(chime(16000), dtype=np.int16)
    assert 0 < len(pcm) <= 8000
    assert len(pcm) % 160 == 0
    assert np.abs(pcm).max() > 3000
