"""The example bot under the runtime over SmallWebRTC: an aiortc peer talks to it, as a
browser would."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from testkit.bot_process import (
    BOOT_TIMEOUT_S,
    SESSION_ID,
    BotProcess,
    booted,
    start_bot,
)
from testkit.fakes.recorder import CALLBACK_TOKEN, CallbackRecorder
from tests.fixtures.peer import (
    Peer,
    Speaker,
    active_span,
    best_correlation,
    envelope,
    heard_echo,
    utterance,
)

FAKE_KEYS = {
    "OPENAI_API_KEY": "sk-fake-openai-key-0123456789",
    "DEEPGRAM_API_KEY": "fake-deepgram-key-0123456789",
    "CARTESIA_API_KEY": "fake-cartesia-key-0123456789",
}


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    """A peer whose speaker will say the fixture's utterance."""
    p = Peer(Speaker(utterance()))
    yield p
    await p.close()


# Real-time audio compared by shape: in the one-process pass, as xdist beside it starved the
# echo on a loaded run (its envelope correlated 0.54).
@pytest.mark.slow
@pytest.mark.serial
async def test_peer_hears_its_utterance_echoed_then_leaves(
    bots: list[BotProcess], recorder: CallbackRecorder, tmp_path: Path, peer: Peer
) -> None:
    """An aiortc peer connects (ready, with the callback token), gets RTVI's bot-ready and the
    greeting chime, hears its utterance back with the same envelope, and closing it ends the
    bot participant_left."""
    bot = await booted(bots, recorder, tmp_path)
    await peer.connect(bot)
    ready = await recorder.wait_for("ready", timeout_s=30)
    assert ready.authorization == f"Bearer {CALLBACK_TOKEN}"
    assert ready.session_id == SESSION_ID

    await peer.send(
        {
            "label": "rtvi-ai",
            "type": "client-ready",
            "id": "c1",
            "data": {"version": "1.0.0", "about": {"library": "aiortc-test"}},
        }
    )
    assert (await peer.message("bot-ready"))["label"] == "rtvi-ai"
    await asyncio.wait_for(heard_echo(peer), 30)  # the greeting chime

    peer.heard.clear()
    peer.speaker.speak()
    await asyncio.wait_for(peer.speaker.spoken.wait(), 30)
    await asyncio.wait_for(heard_echo(peer), 30)

    sent = envelope(utterance(), Speaker.RATE)
    heard = envelope(peer.audio(), peer.heard_rate)
    sent_span = active_span(sent, 0.1 * sent.max())
    heard_span = active_span(heard, 0.1 * heard.max())
    assert sent_span is not None and heard_span is not None
    sent_s = (sent_span[1] - sent_span[0]) * 0.02
    heard_s = (heard_span[1] - heard_span[0]) * 0.02
    assert abs(heard_s - sent_s) < 0.3, (sent_s, heard_s)
    segment = heard[heard_span[0] : heard_span[1]]
    assert best_correlation(segment, sent[sent_span[0] : sent_span[1]]) > 0.7

    await peer.close()
    assert await bot.exit_code() == 0
    ended = await recorder.wait_for("ended")
    assert ended.body == {"reason": "participant_left", "exit_code": 0}
    assert ended.authorization == f"Bearer {CALLBACK_TOKEN}"


@pytest.mark.slow
async def test_sigterm_says_goodbye_and_exits_0(
    bots: list[BotProcess], recorder: CallbackRecorder, tmp_path: Path, peer: Peer
) -> None:
    """SIGTERM with a peer connected plays a goodbye chime, then the bot exits 0 within the
    stop timeout with ended "sigterm"."""
    bot = await booted(bots, recorder, tmp_path)
    await peer.connect(bot)
    await recorder.wait_for("ready", timeout_s=30)
    peer.heard.clear()
    bot.proc.send_signal(signal.SIGTERM)
    assert await bot.exit_code() == 0
    ended = await recorder.wait_for("ended")
    assert ended.body == {"reason": "sigterm", "exit_code": 0}
    heard = envelope(peer.audio(), peer.heard_rate)
    assert active_span(heard, 0.01) is not None, "no goodbye chime"


@pytest.mark.slow
async def test_sigterm_before_any_peer_exits_0(
    bots: list[BotProcess], recorder: CallbackRecorder, tmp_path: Path
) -> None:
    """SIGTERM while the bot waits for its offer ends it "sigterm", exit 0, without ready."""
    bot = await booted(bots, recorder, tmp_path)
    bot.proc.send_signal(signal.SIGTERM)
    assert await bot.exit_code() == 0
    assert [c.body for c in recorder.of("ended")] == [{"reason": "sigterm", "exit_code": 0}]
    assert recorder.of("ready") == []


@pytest.mark.slow
async def test_sigterm_while_booting_exits_0(
    bots: list[BotProcess], recorder: CallbackRecorder, tmp_path: Path
) -> None:
    """SIGTERM during the bot's imports is remembered: the session ends "sigterm" as soon as
    it can, exit 0 with its ended callback, rather than the process dying of the signal."""
    bot = await start_bot(recorder, tmp_path)
    bots.append(bot)
    async with asyncio.timeout(BOOT_TIMEOUT_S):
        while "Pipecat 1.14" not in bot.output():  # Logged while pipecat is being imported.
            assert bot.proc.returncode is None, bot.output()
            await asyncio.sleep(0.01)
    bot.proc.send_signal(signal.SIGTERM)
    assert await bot.exit_code() == 0
    assert [c.body for c in recorder.of("ended")] == [{"reason": "sigterm", "exit_code": 0}]
    assert recorder.of("ready") == []


@pytest.mark.slow
async def test_max_duration_ends_the_session(
    bots: list[BotProcess], recorder: CallbackRecorder, tmp_path: Path
) -> None:
    """SESSION_MAX_DURATION_S passing ends the bot by itself, reason max_duration, exit 0."""
    bot = await start_bot(recorder, tmp_path, SESSION_MAX_DURATION_S="2")
    bots.append(bot)
    assert await bot.exit_code(BOOT_TIMEOUT_S) == 0
    assert [c.body for c in recorder.of("ended")] == [{"reason": "max_duration", "exit_code": 0}]


@pytest.mark.slow
async def test_signalling_routes_answer_json(
    bots: list[BotProcess], recorder: CallbackRecorder, tmp_path: Path, peer: Peer
) -> None:
    """The offer routes serve their own session only, one peer only, with JSON errors."""
    bot = await booted(bots, recorder, tmp_path)
    offer = await peer.offer()

    async def refused(response: httpx.Response, status: int, code: str) -> None:
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["code"] == code

    await refused(await bot.post(offer, session="s-other"), 404, "session-not-found")
    await refused(await bot.post(offer, session=None), 404, "session-not-found")
    await refused(await bot.post(b"{not json"), 400, "invalid-json")
    await refused(await bot.post({"sdp": "v=0", "type": "offer"}), 400, "invalid-sdp")
    await refused(await bot.post({"type": "offer"}), 400, "invalid-offer")
    patch = {"pc_id": "nope", "candidates": []}
    await refused(await bot.post(patch, method="PATCH"), 404, "peer-not-found")
    await refused(await bot.post({}, method="GET"), 405, "method-not-allowed")

    first = await bot.post(offer)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert answer["type"] == "answer" and "m=audio" in answer["sdp"]
    await refused(await bot.post(offer), 409, "peer-exists")
    await refused(await bot.post({**offer, "pc_id": "other"}), 409, "peer-exists")

    renegotiated = await bot.post({**offer, "pc_id": answer["pc_id"], "requestData": {"a": 1}})
    assert renegotiated.status_code == 200, renegotiated.text
    assert renegotiated.json()["pc_id"] == answer["pc_id"]
    end_of_candidates = {
        "pc_id": answer["pc_id"],
        "candidates": [{"candidate": "", "sdp_mid": "0", "sdp_mline_index": 0}],
    }
    added = await bot.post(end_of_candidates, method="PATCH")
    assert added.status_code == 200, added.text
    bad = {"pc_id": answer["pc_id"], "candidates": [{"candidate": "candidate:1 1 udp"}]}
    await refused(await bot.post(bad, method="PATCH"), 400, "invalid-candidate")


@pytest.mark.slow
async def test_no_secret_in_the_output(
    bots: list[BotProcess], recorder: CallbackRecorder, tmp_path: Path
) -> None:
    """With DEBUG logs and every provider key set, neither the callback token nor a key shows
    in the bot's stdout or stderr, whether the conversation starts or fails."""
    bot = await start_bot(recorder, tmp_path, LOG_LEVEL="DEBUG", **FAKE_KEYS)
    bots.append(bot)
    if await bot.listening():
        bot.proc.send_signal(signal.SIGTERM)
    await bot.exit_code()
    await recorder.wait_for("ended")
    output = bot.output()
    assert "Starting bot: conversation" in output
    for secret in (CALLBACK_TOKEN, *FAKE_KEYS.values()):
        assert secret not in output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith('{"ts"')]
    assert lines and all(line["session_id"] == SESSION_ID for line in lines)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"BOT_PORT": None}, "BOT_PORT"),
        ({"BOT_PORT": "http"}, "BOT_PORT"),
        ({"ICE_SERVERS": '[{"url": "stun:x"}]'}, "ICE_SERVERS"),
        ({"BOT_TRANSPORT": "carrier-pigeon"}, "BOT_TRANSPORT"),
    ],
)
async def test_bad_webrtc_env_exits_2(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    tmp_path: Path,
    overrides: dict[str, str | None],
    named: str,
) -> None:
    """A missing or malformed webrtc variable exits 2 naming it, and the session's `ended`
    says so: reason contract_error, exit code 2, the error naming the variable."""
    bot = await start_bot(recorder, tmp_path, (), **overrides)
    bots.append(bot)
    assert await bot.exit_code(BOOT_TIMEOUT_S) == 2
    assert named in bot.output()
    [ended] = [c.body for c in recorder.calls]
    assert (ended["reason"], ended["exit_code"]) == ("contract_error", 2)
    assert named in ended["error"]
