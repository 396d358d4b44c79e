"""The echo bot's voice: the user's last utterance played back, and a chime to greet and part."""

from __future__ import annotations

from collections import deque

import numpy as np
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    OutputAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

# The echo plays back what it heard: the same rate in and out, no resampling.
ECHO_SAMPLE_RATE = 16000
# Audio kept from before the VAD noticed speech: it confirms a start `start_secs` (0.2 s)
# late, plus an analysis window, and the first syllable should not be cut.
PRE_ROLL_S = 0.5
# An utterance longer than this is played back as its last MAX_UTTERANCE_S seconds.
MAX_UTTERANCE_S = 30.0

_BYTES_PER_SAMPLE = 2


def audio_seconds(frame: InputAudioRawFrame | OutputAudioRawFrame) -> float:
    """How long `frame` plays."""
    return len(frame.audio) / (frame.sample_rate * frame.num_channels * _BYTES_PER_SAMPLE)


class EchoProcessor(FrameProcessor):
    """Plays the user's last utterance back once the VAD hears them stop.

    Input audio is buffered (not passed on) between `VADUserStartedSpeakingFrame` and
    `VADUserStoppedSpeakingFrame`, with `pre_roll_s` of audio from before the start, and at
    most `max_utterance_s`; at the stop it goes downstream as one `OutputAudioRawFrame`.
    Every other frame passes through.
    """

    def __init__(
        self,
        *,
        pre_roll_s: float = PRE_ROLL_S,
        max_utterance_s: float = MAX_UTTERANCE_S,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self._pre_roll_s = pre_roll_s
        self._max_utterance_s = max_utterance_s
        self._frames: deque[InputAudioRawFrame] = deque()
        self._seconds = 0.0
        self._speaking = False

    @property
    def buffered_s(self) -> float:
        """Seconds of audio held right now."""
        return self._seconds

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Buffer input audio, play it back at the end of speech, pass the rest on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self._hold(frame)
            return
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._speaking = True
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and self._speaking:
            self._speaking = False
            echo = self._take()
            if echo is not None:
                await self.push_frame(echo)
        await self.push_frame(frame, direction)

    def _hold(self, frame: InputAudioRawFrame) -> None:
        last = self._frames[-1] if self._frames else None
        if last and (last.sample_rate, last.num_channels) != (
            frame.sample_rate,
            frame.num_channels,
        ):
            self._clear()
        self._frames.append(frame)
        self._seconds += audio_seconds(frame)
        limit = self._max_utterance_s if self._speaking else self._pre_roll_s
        while self._frames and self._seconds - audio_seconds(self._frames[0]) >= limit:
            self._seconds -= audio_seconds(self._frames.popleft())

    def _take(self) -> OutputAudioRawFrame | None:
        if not self._frames:
            return None
        first = self._frames[0]
        audio = b"".join(f.audio for f in self._frames)
        self._clear()
        # Output transports take whole 10 ms chunks: pad the tail with silence.
        step = first.sample_rate // 100 * first.num_channels * _BYTES_PER_SAMPLE
        audio += bytes(-len(audio) % step)
        return OutputAudioRawFrame(
            audio=audio, sample_rate=first.sample_rate, num_channels=first.num_channels
        )

    def _clear(self) -> None:
        self._frames.clear()
        self._seconds = 0.0


def chime(sample_rate: int, *, duration_s: float = 0.4, volume: float = 0.3) -> bytes:
    """A short falling two-note chime (E6 then A5), 16-bit mono PCM, faded in and out."""
    half = int(sample_rate * duration_s / 2) // (sample_rate // 100) * (sample_rate // 100)
    notes = []
    for frequency in (1318.5, 880.0):
        t = np.arange(half) / sample_rate
        envelope = np.minimum(1.0, t / 0.01) * np.exp(-t * 8)
        notes.append(np.sin(2 * np.pi * frequency * t) * envelope)
    samples = np.concatenate(notes) * volume * 32767
    return samples.astype(np.int16).tobytes()


def chime_frame(sample_rate: int) -> OutputAudioRawFrame:
    """The chime as an output frame."""
    return OutputAudioRawFrame(audio=chime(sample_rate), sample_rate=sample_rate, num_channels=1)
