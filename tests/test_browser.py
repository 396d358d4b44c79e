"""End to end in a real browser: `make run`, the web page, WebRTC sessions with real bots.

Headless Debian Chromium (never a downloaded browser) with a fake microphone opens the page the
dispatcher prints, presses Connect, hears the bot, presses Disconnect, and the test checks
through the API and /proc that the session ended and its bot process is gone. The fake
microphone plays the fixture's utterance in a loop (with a pause, so that the echo bot answers).
The tests save screenshots of the page's main states in their tmp dir.

Deselect with `-m "not browser"`. Without /usr/bin/chromium these tests are skipped, except in
CI (the `CI` variable set), where that is a failure: `.ci/run` installs Chromium first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from testkit.browser import (
    BOT_READY_TIMEOUT_S,
    END_TIMEOUT_S,
    Browser,
    Dispatcher,
    chromium,
    microphone_args,
    require_chromium,
)

if TYPE_CHECKING:
    from playwright.async_api import Route

LIVE_MIC_TRACKS = """() => (window.micTracks || [])
    .filter(t => t.readyState === "live").map(t => t.enabled)"""
# A text log line of `make run` (the dispatcher's and the bots' alike):
# `HH:MM:SS.mmm LEVEL   logger: message  key=value ...`.
LOG_LINE = re.compile(
    r"^(?P<time>\d{2}:\d{2}:\d{2}\.\d{3}) (?P<level>[A-Z]+) +(?P<logger>[\w.]+): (?P<msg>.*?)"
    r"(?:  (?P<fields>\w+=\S+(?: \w+=\S+)*))?$"
)
LOG_FIELDS = ("session_id", "machine_id", "trace_id", "span_id")
SCREEN_TRANSCEIVER_WARNING = "No screen video transceiver is available"

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


@pytest.fixture
def dispatcher_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings for `make run` beyond its defaults (a test gives them through `indirect`)."""
    return getattr(request, "param", {})


@pytest.fixture
async def dispatcher(tmp_path: Path, dispatcher_env: dict[str, str]) -> AsyncIterator[Dispatcher]:
    require_chromium()
    d = Dispatcher(tmp_path, dispatcher_env)
    try:
        await d.start()
        yield d
    finally:
        await d.stop()
        # Shown by pytest only when the test fails (or with -rA).
        print("--- make run output:", *d.lines, sep="\n  ")


@pytest.fixture
def microphone(tmp_path: Path) -> list[str]:
    """Chromium's arguments for a microphone allowed without a prompt, playing the fixture's
    utterance then 1.5 s of silence, in a loop."""
    return microphone_args(tmp_path)


@pytest.fixture
def denied_microphone() -> list[str]:
    """Chromium's arguments for a user who refuses the microphone: no fake-UI auto-accept, and
    every permission prompt denied."""
    return ["--deny-permission-prompts"]


@pytest.fixture
async def browser(
    dispatcher: Dispatcher, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Browser]:
    # The microphone's fixture: `microphone`, or another named through `indirect`.
    mic_args = request.getfixturevalue(getattr(request, "param", "microphone"))
    async with chromium(mic_args) as context:
        b = await Browser.open(context, dispatcher.page_url(), tmp_path)
        yield b
        # Shown by pytest only when the test fails (or with -rA).
        with contextlib.suppress(Exception):
            print(f"--- page events: {' '.join(await b.events())}")
        print("--- browser console:", *b.console, sep="\n  ")


async def test_talk_to_a_bot_and_hang_up(dispatcher: Dispatcher, browser: Browser) -> None:
    """Connect, bot-ready, the bot's audio plays, the mic toggles, Disconnect: the session ends
    (the page says so in words), and its bot process exits."""
    began = time.monotonic()
    page = browser.page
    session_id = await browser.connect()
    assert await page.is_hidden("#error"), await browser.text("#error")
    assert await browser.text("#transport-state") == "ready"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", session_id), session_id
    dispatcher.sessions.append(session_id)

    # The bot's audio arrives as a track and plays in the <audio> element.
    await page.wait_for_function(
        """() => {
            const a = document.getElementById("bot-audio");
            const tracks = a.srcObject ? a.srcObject.getAudioTracks() : [];
            return tracks.length > 0 && tracks[0].readyState === "live"
                && !a.paused && a.currentTime > 0;
        }""",
        timeout=15_000,
    )
    seen = await browser.events()
    assert "bot-track-started" in seen, seen
    assert "bot-audio-playing" in seen, seen

    # The dispatcher agrees, the page shows it, and the bot is a process on this machine.
    await dispatcher.wait_ready(session_id)
    await page.wait_for_selector('#session-state[data-state="ready"]', state="attached")
    assert await dispatcher.bot_pids(session_id), f"no process serves {session_id}"

    # The mic toggles (the fake microphone streams to the bot meanwhile), and the page says it.
    await page.click("#mic")
    assert await page.get_attribute("#mic", "aria-pressed") == "false"
    assert await browser.text("#status") == "Connected: your microphone is off"
    assert await page.evaluate(LIVE_MIC_TRACKS) == [False]
    await page.click("#mic")
    assert await page.get_attribute("#mic", "aria-pressed") == "true"
    assert await browser.text("#status") == "Connected: talk"
    assert await page.evaluate(LIVE_MIC_TRACKS) == [True]

    # Disconnect: the client hangs up and DELETEs the session; it ends, its bot exits.
    await page.click("#disconnect")
    final = await dispatcher.wait_ended(session_id)
    reason = final.get("endReason", final.get("end_reason"))
    assert reason, final
    ended = await page.wait_for_selector('#session-state[data-state="ended"]', state="attached")
    assert reason in (await ended.text_content() or "")
    await browser.wait_text("#status", "Ended: you hung up.")
    assert await browser.text("#transport-state") == "disconnected"
    assert await page.is_hidden("#error"), await browser.text("#error")
    assert not [c for c in browser.console if c.startswith("pageerror")], browser.console
    await browser.screenshot("ended")
    print(f"browser session: {time.monotonic() - began:.1f} s from Connect to the bot's exit")


async def test_hang_up_reads_the_same_when_the_bot_reports_first(
    dispatcher: Dispatcher, browser: Browser
) -> None:
    """Disconnect hangs up the transport before it DELETEs the session, so the bot may report
    `participant_left` first (a race CI saw). The DELETE is held here until the dispatcher has
    recorded that end: the page still says the user hung up, and shows no error."""
    page = browser.page
    session_id = await browser.connect()
    dispatcher.sessions.append(session_id)
    recorded: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def hold_the_delete(route: Route) -> None:
        if route.request.method == "DELETE" and not recorded.done():
            recorded.set_result(await dispatcher.wait_ended(session_id))
        await route.continue_()

    await page.route(f"**/sessions/{session_id}", hold_the_delete)
    await page.click("#disconnect")
    final = await asyncio.wait_for(recorded, END_TIMEOUT_S * 2)
    assert final["endReason"] == "participant_left", final
    await page.wait_for_selector('#session-state[data-state="ended"]', state="attached")
    await browser.wait_text("#status", "Ended: you hung up.")
    assert "session-delete-sent" in await browser.events()
    assert await page.is_hidden("#error"), await browser.text("#error")


async def test_the_microphone_opens_when_the_bot_is_ready(
    dispatcher: Dispatcher, browser: Browser
) -> None:
    """Until the bot is ready the page says it is starting and its microphone track is
    closed (nobody listens); at bot-ready the microphone opens and the page says talk."""
    page = browser.page
    held, release = asyncio.Event(), asyncio.Event()

    async def hold_the_offer(route: Route) -> None:
        if route.request.method == "POST":
            held.set()
            await release.wait()
        await route.continue_()

    await page.route("**/api/offer", hold_the_offer)
    await page.click("#connect")
    await asyncio.wait_for(held.wait(), BOT_READY_TIMEOUT_S)
    dispatcher.sessions.append(await browser.text("#session-id"))

    # The session exists, its bot is booting, the offer waits: the microphone is closed.
    assert await page.evaluate(LIVE_MIC_TRACKS) == [False]
    await browser.wait_text("#status", "Starting your bot…")
    assert await page.get_attribute("#mic", "aria-pressed") == "false"
    assert await page.is_disabled("#mic")
    await browser.screenshot("starting")

    release.set()
    await browser.wait_event("bot-ready", timeout_s=BOT_READY_TIMEOUT_S)
    await page.wait_for_function(f"() => ({LIVE_MIC_TRACKS})().join() === 'true'")
    seen = await browser.events()
    assert seen.index("bot-ready") < seen.index("mic-opened"), seen
    await browser.wait_text("#status", "Connected: talk")
    assert await page.get_attribute("#mic", "aria-pressed") == "true"
    assert await page.is_enabled("#mic")
    await browser.screenshot("connected")


async def test_levels_show_who_is_speaking(dispatcher: Dispatcher, browser: Browser) -> None:
    """A level meter for the user and one for the bot: the microphone's utterance lights the
    user's (only once the mic is open), the bot's chime and echo light the bot's."""
    page = browser.page
    dispatcher.sessions.append(await browser.connect())
    await page.wait_for_selector('#bot-speaker[data-speaking="true"]', timeout=30_000)
    await browser.screenshot("bot-speaking")
    await page.wait_for_selector('#user-speaker[data-speaking="true"]', timeout=30_000)
    await browser.screenshot("user-speaking")
    seen = await browser.events()
    assert seen.index("mic-opened") < seen.index("user-speaking"), seen


async def test_the_page_says_when_the_bot_is_an_echo(
    dispatcher: Dispatcher, browser: Browser
) -> None:
    """The example bot without provider keys tells the page it is an echo (an RTVI server
    message), and the page says so."""
    page = browser.page
    dispatcher.sessions.append(await browser.connect())
    await page.wait_for_selector("#bot-info", state="visible", timeout=15_000)
    assert "echo" in await browser.text("#bot-info")
    messages = await page.evaluate(
        "window.pipecatEvents.filter(e => e.name === 'server-message').map(e => e.detail)"
    )
    assert {"type": "bot-info", "mode": "echo"} in [json.loads(m) for m in messages], messages
    await browser.screenshot("echo")


@pytest.mark.parametrize(
    "dispatcher_env",
    [{"BOT_ENTRYPOINT": "tests/bots/pipecat_style/bot.py"}],
    indirect=True,
    ids=["pipecat-style-bot"],
)
async def test_a_bot_that_says_nothing_shows_nothing(
    dispatcher: Dispatcher, browser: Browser
) -> None:
    """A bot that sends no bot-info (one written as Pipecat's examples are) gets no
    description on the page, only the words of the call."""
    page = browser.page
    session_id = await browser.connect()
    dispatcher.sessions.append(session_id)
    # Its greeting is queued when the client connects, where an echo's bot-info would be.
    await dispatcher.wait_line("Client connected", f"session_id={session_id}")
    await browser.wait_event("bot-audio-playing", timeout_s=15)
    await browser.wait_text("#status", "Connected: talk")
    assert await page.locator("#bot-info").count() == 1
    assert await page.is_hidden("#bot-info")
    assert "server-message" not in await browser.events()


async def test_no_answer_says_cannot_reach_the_dispatcher(
    dispatcher: Dispatcher, browser: Browser
) -> None:
    """When /start gets no HTTP answer at all the page says it cannot reach the dispatcher
    (not a made-up HTTP status), and Connect can be pressed again."""
    page = browser.page
    await page.route("**/start", lambda route: route.abort("connectionrefused"))
    await page.click("#connect")
    await browser.wait_event("error", timeout_s=30)
    error = await browser.text("#error")
    assert "Cannot reach the dispatcher" in error, error
    assert "HTTP" not in error, error
    await browser.wait_text("#status", "Could not connect")
    await page.wait_for_selector("#connect:not([disabled])", timeout=5_000)
    await browser.screenshot("unreachable")


@pytest.mark.parametrize(
    "dispatcher_env", [{"MAX_SESSIONS_PER_USER": "1"}], indirect=True, ids=["one-per-user"]
)
async def test_at_capacity_the_page_offers_to_end_your_other_sessions(
    dispatcher: Dispatcher, browser: Browser
) -> None:
    """A start refused with 429 user-at-capacity offers to end the sessions this browser
    started (remembered across tabs) that are still live; accepting ends them and connects."""
    first_id = await browser.connect()
    dispatcher.sessions.append(first_id)

    # Another tab of the same browser: the user's one session is the first tab's.
    second = await browser.another_tab()
    await second.page.click("#connect")
    await second.page.wait_for_selector("#end-others", state="visible", timeout=30_000)
    assert "started from this browser" in await second.text("#capacity-text")
    await second.wait_text("#status", "You have too many sessions running")
    await second.screenshot("capacity")

    await second.page.click("#end-others")
    first_end = await dispatcher.wait_ended(first_id)
    assert first_end.get("endReason", first_end.get("end_reason")) == "deleted", first_end
    first = await second.wait_event("bot-ready", "error", timeout_s=BOT_READY_TIMEOUT_S)
    assert first == "bot-ready", f"the page shows an error: {await second.text('#error')}"
    second_id = await second.text("#session-id")
    dispatcher.sessions.append(second_id)
    assert second_id != first_id
    await second.wait_text("#status", "Connected: talk")
    await browser.wait_text("#status", "Ended: the session was ended.", timeout_s=END_TIMEOUT_S)
    await second.page.click("#disconnect")
    await dispatcher.wait_ended(second_id)


@pytest.mark.parametrize("browser", ["denied_microphone"], indirect=True)
async def test_the_mic_button_stays_true_when_the_microphone_is_denied(
    dispatcher: Dispatcher, browser: Browser
) -> None:
    """With the microphone refused the session still connects, listening only, and the mic
    button says there is no microphone (never "Mic on")."""
    page = browser.page
    await page.click("#connect")
    await browser.wait_event("bot-ready", timeout_s=BOT_READY_TIMEOUT_S)
    dispatcher.sessions.append(await browser.text("#session-id"))
    assert await page.evaluate(LIVE_MIC_TRACKS) == []
    assert await page.get_attribute("#mic", "aria-pressed") == "false"
    assert await page.is_disabled("#mic")
    await browser.wait_text("#mic", "No microphone")
    await browser.wait_text("#status", "Connected: listening only")
    await browser.screenshot("mic-denied")


async def test_make_run_logs_read_as_one_log(dispatcher: Dispatcher, browser: Browser) -> None:
    """In `make run`'s output the dispatcher's and the bot's lines of a session have one
    shape: the same columns and the same fields in the same order, with one trace id."""
    session_id = await browser.connect()
    dispatcher.sessions.append(session_id)
    ours = await dispatcher.wait_line(" dispatcher.starter: session dispatched", session_id)
    bots = await dispatcher.wait_line(" bot: Client connected", session_id)
    lines = {"dispatcher": ours, "bot": bots}
    parsed = {}
    for who, line in lines.items():
        match = LOG_LINE.match(line)
        assert match, f"the {who}'s line has another shape: {line!r}"
        assert match.start("logger") == len("HH:MM:SS.mmm LEVEL   "), line
        fields = dict(f.split("=", 1) for f in (match["fields"] or "").split())
        known = [k for k in fields if k in LOG_FIELDS]
        assert known == sorted(known, key=LOG_FIELDS.index), line
        parsed[who] = fields
    assert parsed["dispatcher"]["session_id"] == parsed["bot"]["session_id"] == session_id
    assert parsed["dispatcher"]["trace_id"] == parsed["bot"]["trace_id"], lines


async def test_no_screen_transceiver_warning_per_session(
    dispatcher: Dispatcher, browser: Browser
) -> None:
    """A page's session logs no warning about the screen-share transceiver the voice page
    never offers (Pipecat looks for one on every connect)."""
    session_id = await browser.connect()
    dispatcher.sessions.append(session_id)
    # Pipecat warns just before it calls the bot's on_client_connected, which logs this.
    await dispatcher.wait_line(" bot: Client connected", session_id)
    warnings = [ln for ln in dispatcher.lines if SCREEN_TRANSCEIVER_WARNING in ln]
    assert not warnings, warnings


async def test_errors_show_the_dispatchers_detail(dispatcher: Dispatcher, browser: Browser) -> None:
    """A refused start shows the dispatcher's detail and can be retried; a refused offer shows
    its detail and ends the session the page started."""
    page = browser.page

    # A refused start: the page shows the JSON `detail` (as a sentence) and can try again.
    detail = "at capacity: 50 active sessions"
    await page.route(
        "**/start",
        lambda route: route.fulfill(status=429, json={"detail": detail, "code": "at-capacity"}),
    )
    await page.click("#connect")
    assert await browser.wait_event("error", "bot-ready", timeout_s=10) == "error"
    assert await browser.text("#error") == "At capacity: 50 active sessions (HTTP 429)"
    await page.wait_for_selector("#connect:not([disabled])", timeout=5_000)
    await browser.screenshot("refused")
    await page.unroute("**/start")

    # A refused offer (a real session whose bot is said to be gone): the page shows the
    # detail and ends the session it started, so no bot waits for a peer that never comes.
    detail = "The session's bot has exited (HTTP 410)"
    await page.route(
        "**/api/offer",
        lambda route: route.fulfill(
            status=410, json={"detail": "the session's bot has exited", "code": "bot-gone"}
        ),
    )
    await page.click("#connect")
    await browser.wait_event("session-started", timeout_s=BOT_READY_TIMEOUT_S)
    session_id = await browser.text("#session-id")
    dispatcher.sessions.append(session_id)
    await page.wait_for_function(
        "text => document.getElementById('error').textContent.includes(text)",
        arg=detail,
        timeout=BOT_READY_TIMEOUT_S * 1000,
    )
    await browser.wait_event("session-delete-sent", timeout_s=10)
    await dispatcher.wait_ended(session_id)
    await page.wait_for_selector('#session-state[data-state="ended"]', state="attached")
    await page.wait_for_selector("#connect:not([disabled])", timeout=5_000)
