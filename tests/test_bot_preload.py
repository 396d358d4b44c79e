"""bot_runtime.preload: the Silero model a pooled bot loads ahead goes to its session's first
analyzer, once; a Pipecat whose internals moved costs the head start, not the session."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

with warnings.catch_warnings():
    # pipecat.audio.utils imports audioop, deprecated in Python 3.11 (audioop-lts from 3.13).
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    from pipecat.audio.vad import silero
    from pipecat.audio.vad.silero import SileroVADAnalyzer

from bot_runtime.preload import hand_over_vad


@pytest.fixture
def restored() -> Any:
    original = silero.SileroOnnxModel
    yield
    silero.SileroOnnxModel = original  # type: ignore[misc]


def test_the_preloaded_model_goes_to_the_first_analyzer_only(restored: Any) -> None:
    ahead = SileroVADAnalyzer()
    hand_over_vad(ahead)
    first, second = SileroVADAnalyzer(), SileroVADAnalyzer()
    assert first._model is ahead._model
    assert second._model is not ahead._model
    assert silero.SileroOnnxModel is not None and isinstance(second._model, silero.SileroOnnxModel)


def test_an_analyzer_without_the_expected_model_raises_attribute_error(restored: Any) -> None:
    """preload() catches this and lets the session load its own model."""
    original = silero.SileroOnnxModel
    with pytest.raises(AttributeError):
        hand_over_vad(object())
    assert silero.SileroOnnxModel is original
