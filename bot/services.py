"""The conversation's providers, chosen by the API keys present and imported only when used.

With DEEPGRAM_API_KEY, OPENAI_API_KEY and CARTESIA_API_KEY all set the bot holds a
conversation (Deepgram STT, an OpenAI-compatible LLM, Cartesia TTS); with any of them missing
it runs the offline echo pipeline. This module imports nothing of pipecat until
`build_services` is called, so an echo bot never loads a provider's SDK.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipecat.processors.frame_processor import FrameProcessor

DEEPGRAM_API_KEY = "DEEPGRAM_API_KEY"
OPENAI_API_KEY = "OPENAI_API_KEY"
OPENAI_BASE_URL = "OPENAI_BASE_URL"
OPENAI_MODEL = "OPENAI_MODEL"
CARTESIA_API_KEY = "CARTESIA_API_KEY"
CARTESIA_VOICE_ID = "CARTESIA_VOICE_ID"

KEY_VARIABLES = (DEEPGRAM_API_KEY, OPENAI_API_KEY, CARTESIA_API_KEY)

ECHO = "echo"
CONVERSATION = "conversation"

# Cartesia's "British Reading Lady", the voice of Pipecat's examples.
DEFAULT_CARTESIA_VOICE_ID = "71a7ad14-091c-4e8e-a314-022ece01c121"

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant in a live audio call. Your replies are spoken "
    "aloud, so keep them short and conversational: one or two sentences, no lists, no "
    "markdown, no emoji."
)
# SESSION_BODY's optional field that replaces the default system prompt.
SYSTEM_PROMPT_FIELD = "systemPrompt"
# What `build_services` and the conversation pipeline import (a pooled bot imports them at boot).
CONVERSATION_MODULES = (
    "pipecat.services.deepgram.stt",
    "pipecat.services.openai.llm",
    "pipecat.services.cartesia.tts",
    "pipecat.processors.aggregators.llm_response_universal",
)


@dataclass(frozen=True)
class Providers:
    """The providers' settings from the environment; the keys stay out of `repr`."""

    deepgram_api_key: str | None = field(default=None, repr=False)
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    openai_model: str | None = None
    cartesia_api_key: str | None = field(default=None, repr=False)
    cartesia_voice_id: str = DEFAULT_CARTESIA_VOICE_ID

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Providers:
        """Read the providers' variables; empty values count as absent."""

        def get(name: str) -> str | None:
            return environ.get(name, "").strip() or None

        return cls(
            deepgram_api_key=get(DEEPGRAM_API_KEY),
            openai_api_key=get(OPENAI_API_KEY),
            openai_base_url=get(OPENAI_BASE_URL),
            openai_model=get(OPENAI_MODEL),
            cartesia_api_key=get(CARTESIA_API_KEY),
            cartesia_voice_id=get(CARTESIA_VOICE_ID) or DEFAULT_CARTESIA_VOICE_ID,
        )

    @property
    def missing(self) -> tuple[str, ...]:
        """The key variables that are not set."""
        keys = (self.deepgram_api_key, self.openai_api_key, self.cartesia_api_key)
        return tuple(name for name, key in zip(KEY_VARIABLES, keys, strict=True) if not key)

    @property
    def mode(self) -> str:
        """`conversation` when every provider has its key, else `echo`."""
        return ECHO if self.missing else CONVERSATION

    def describe(self) -> str:
        """Which mode, and why, for the log."""
        if self.missing:
            return f"echo mode: {', '.join(self.missing)} not set"
        model = self.openai_model or "the default model"
        where = f" at {self.openai_base_url}" if self.openai_base_url else ""
        return f"conversation mode: Deepgram STT, OpenAI LLM ({model}{where}), Cartesia TTS"


@dataclass(frozen=True)
class Services:
    """The three services of a conversation."""

    stt: FrameProcessor
    llm: FrameProcessor
    tts: FrameProcessor


def system_prompt(body: Any) -> str:
    """The session's system prompt: SESSION_BODY's `systemPrompt` string, or the default."""
    prompt = body.get(SYSTEM_PROMPT_FIELD) if isinstance(body, dict) else None
    return prompt.strip() if isinstance(prompt, str) and prompt.strip() else DEFAULT_SYSTEM_PROMPT


def build_services(providers: Providers, *, prompt: str = DEFAULT_SYSTEM_PROMPT) -> Services:
    """Import and build the services of a conversation (every key must be set)."""
    if providers.missing:
        raise ValueError(f"cannot hold a conversation without {', '.join(providers.missing)}")
    return Services(
        stt=build_stt(providers), llm=build_llm(providers, prompt), tts=build_tts(providers)
    )


def build_stt(providers: Providers) -> FrameProcessor:
    """Deepgram's streaming STT (needs the `deepgram` extra of pipecat-ai)."""
    from pipecat.services.deepgram.stt import DeepgramSTTService

    assert providers.deepgram_api_key is not None
    return DeepgramSTTService(api_key=providers.deepgram_api_key)


def build_llm(providers: Providers, prompt: str) -> FrameProcessor:
    """An OpenAI-compatible chat LLM, at OPENAI_BASE_URL when set, with `prompt` as system."""
    from pipecat.services.openai.llm import OpenAILLMService

    settings = OpenAILLMService.Settings(system_instruction=prompt)
    if providers.openai_model:
        settings.model = providers.openai_model
    return OpenAILLMService(
        api_key=providers.openai_api_key,
        base_url=providers.openai_base_url,
        settings=settings,
    )


def build_tts(providers: Providers) -> FrameProcessor:
    """Cartesia's streaming TTS (WebSocket), in CARTESIA_VOICE_ID's voice."""
    from pipecat.services.cartesia.tts import CartesiaTTSService

    assert providers.cartesia_api_key is not None
    return CartesiaTTSService(
        api_key=providers.cartesia_api_key,
        settings=CartesiaTTSService.Settings(voice=providers.cartesia_voice_id),
    )
