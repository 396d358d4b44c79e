"""Which pipeline the provider keys choose, what the services are built with, and that the
echo bot never imports a provider's SDK."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import warnings
from pathlib import Path

import pytest

from bot.logs import MASK, JsonLogSink, environ_secrets
from bot.services import (
    CONVERSATION,
    DEFAULT_CARTESIA_VOICE_ID,
    DEFAULT_SYSTEM_PROMPT,
    ECHO,
    Providers,
    build_llm,
    build_tts,
    system_prompt,
)

ROOT = Path(__file__).parent.parent
KEYS = {
    "DEEPGRAM_API_KEY": "dg-secret-key-0123456789",
    "OPENAI_API_KEY": "sk-secret-key-0123456789",
    "CARTESIA_API_KEY": "sk_car_secret-key-0123456789",
}
# Pipecat's core imports `pipecat.services.llm_service` and friends; the providers are these.
PROVIDER_MODULES = (
    "pipecat.services.deepgram",
    "pipecat.services.openai",
    "pipecat.services.cartesia",
    "deepgram",
    "cartesia",
    "openai",
)


def test_all_three_keys_make_a_conversation() -> None:
    """With the three keys set the bot holds a conversation; the optional settings are read."""
    providers = Providers.from_environ(
        {
            **KEYS,
            "OPENAI_BASE_URL": "http://llm.internal/v1",
            "OPENAI_MODEL": "llama-3.1-8b",
            "CARTESIA_VOICE_ID": "voice-1",
        }
    )
    assert providers.mode == CONVERSATION
    assert providers.missing == ()
    assert providers.openai_base_url == "http://llm.internal/v1"
    assert providers.openai_model == "llama-3.1-8b"
    assert providers.cartesia_voice_id == "voice-1"
    assert "llama-3.1-8b at http://llm.internal/v1" in providers.describe()


@pytest.mark.parametrize("absent", sorted(KEYS))
def test_any_missing_key_makes_the_echo(absent: str) -> None:
    """Without one key (or with it empty) the bot echoes, and says which key is missing."""
    for environ in ({k: v for k, v in KEYS.items() if k != absent}, {**KEYS, absent: " "}):
        providers = Providers.from_environ(environ)
        assert providers.mode == ECHO
        assert providers.missing == (absent,)
        assert absent in providers.describe()
        assert providers.describe().startswith("echo mode")


def test_no_keys_at_all() -> None:
    """No key at all is the echo, with every key named; the voice has its default."""
    providers = Providers.from_environ({})
    assert providers.mode == ECHO
    assert providers.missing == tuple(KEYS)
    assert providers.cartesia_voice_id == DEFAULT_CARTESIA_VOICE_ID


def test_keys_stay_out_of_repr() -> None:
    """No key shows in the providers' `repr`."""
    text = repr(Providers.from_environ(KEYS))
    assert not any(key in text for key in KEYS.values())


def test_system_prompt_comes_from_the_body() -> None:
    """SESSION_BODY's `systemPrompt` string is the prompt; anything else means the default."""
    assert system_prompt({"systemPrompt": " Talk like a pirate. "}) == "Talk like a pirate."
    for body in ({}, {"systemPrompt": ""}, {"systemPrompt": 3}, ["x"], None):
        assert system_prompt(body) == DEFAULT_SYSTEM_PROMPT


def test_llm_and_tts_are_built_with_their_settings() -> None:
    """The LLM gets the base URL, model and system prompt; the TTS the voice."""
    providers = Providers.from_environ(
        {**KEYS, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_MODEL": "m-1"}
    )
    with warnings.catch_warnings():
        # Importing the services warns: audioop (deprecated in Python 3.11), and pipecat's
        # own deprecated TTS base classes, defined at import.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        llm = build_llm(providers, "Be brief.")
        tts = build_tts(providers)
    assert str(llm._client.base_url) == "http://127.0.0.1:9/v1/"
    assert llm.settings.model == "m-1"
    assert llm.settings.system_instruction == "Be brief."
    assert tts.settings.voice == DEFAULT_CARTESIA_VOICE_ID


def test_provider_keys_and_turn_credentials_are_masked() -> None:
    """Every provider key and TURN credential in the environment is masked in the logs."""
    environ = {
        **KEYS,
        "BOT_CALLBACK_TOKEN": "cb-secret-token-0123456789",
        "ICE_SERVERS": '[{"urls": ["turn:t"], "username": "u", "credential": "turn-secret-123"}]',
    }
    sink = JsonLogSink(io.StringIO(), environ_secrets(environ), {})
    for secret in (*KEYS.values(), "cb-secret-token-0123456789", "turn-secret-123"):
        assert sink.mask(f"x {secret} y") == f"x {MASK} y"


LAZY_IMPORTS = """
import asyncio, json, sys, warnings
warnings.simplefilter("ignore")
from pipecat.runner.types import SmallWebRTCRunnerArguments
from bot.bot import bot
from bot.services import Providers, build_llm
from bot.session import SessionOptions
from bot.webrtc import new_connection

def loaded():
    return sorted(m for m in sys.modules if m.startswith(PREFIXES))

args = SmallWebRTCRunnerArguments(webrtc_connection=new_connection(), session_id="s-test1")
outcome = asyncio.run(
    bot(args, SessionOptions(max_duration_s=0.5), environ={"OPENAI_API_KEY": "sk-0123456789"})
)
echo = loaded()
build_llm(Providers(openai_api_key="sk-0123456789"), "prompt")
print(json.dumps({"reason": outcome.reason, "echo": echo, "after_llm": loaded()}))
"""


async def test_the_echo_bot_never_imports_a_provider() -> None:
    """A whole echo session (a key set, the others missing) leaves every provider module
    unimported; building the LLM afterwards does import it (the check can see an import)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        f"PREFIXES = {PROVIDER_MODULES!r}\n" + LAZY_IMPORTS,
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().splitlines()[-1])
    assert result["reason"] == "max_duration"
    assert result["echo"] == []
    assert "pipecat.services.openai.llm" in result["after_llm"]
    assert "openai" in result["after_llm"]
