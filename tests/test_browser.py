"""End to end in a real browser: `make run`, the web page, WebRTC sessions with real bots.

Headless Debian Chromium (never a downloaded browser) with a fake microphone opens the page the
dispatcher prints, presses Connect, hears the bot, presses Disconnect, and the test checks
through the API and /proc that the session ended and its bot process is gone.

Deselect with `-m "not browser"`. Without /usr/bin/chromium these tests are skipped, except in
CI (the `CI` variable set), where that is a failure: `.ci/run` installs Chromium first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from playwright.async_api import Page

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Settings that would move `make run` off its embedded defaults (README, Configuration), and
# the bot contract's variables: none may leak in from the environment running the tests.
DISPATCHER_ENV = re.compile(
    r"^(HOST|PORT|MACHINE_BACKEND|FLY_.*|BOT_.*|DAILY_.*|DATABASE_URL|DISPATCHER_.*|SESSION_.*|"
    r"READY_TIMEOUT_S|MAX_SESSIONS|JWT_.*|LOCAL_BOT_DIR|ICE_SERVERS|TRACEPARENT|LOG_.*|OTEL_.*|"
    r"TRACE_USER_IDS)$"
)
START_TIMEOUT_S = 120  # `make run` includes `uv sync --locked`
BOT_READY_TIMEOUT_S = 60
END_TIMEOUT_S = 30

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"the browser tests need Chromium in CI: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bot_pids(session_id: str) -> list[int]:
    """Processes whose environment carries SESSION_ID=<session_id>."""
    needle = f"SESSION_ID={session_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.25
) -> Any:
    """The first truthy result of `check()` within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


class Dispatcher:
    """`make run PORT=<port>` in the repo root, as a newcomer runs it; its output collected."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.env = {k: v for k, v in os.environ.items() if not DISPATCHER_ENV.match(k)}
        self.env["DATABASE_URL"] = f"sqlite:///{tmp_path}/d.db"
        self.http = httpx.AsyncClient(base_url=self.base, timeout=10)
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.sessions: list[str] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "make",
            "--no-print-directory",
            "run",
            f"PORT={self.port}",
            cwd=ROOT,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read())

        async def healthy() -> bool:
            assert self.proc
            if self.proc.returncode is not None:
                raise AssertionError(f"`make run` exited with {self.proc.returncode}")
            try:
                return (await self.http.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(healthy, START_TIMEOUT_S, "/healthz", interval=0.2)

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def page_url(self) -> str:
        """The page URL the dispatcher printed: its `open <url>` hint, else any URL of it."""
        url = re.compile(rf"http://(?:127\.0\.0\.1|localhost|\[::1\]):{self.port}/?[^\s'\"]*")
        found = [(ln.startswith("open "), m.group(0)) for ln in self.lines if (m := url.search(ln))]
        assert found, f"the dispatcher printed no URL on port {self.port}"
        return max(found, key=lambda f: f[0])[1]

    async def session(self, session_id: str) -> dict[str, Any]:
        answer = await self.http.get(f"/sessions/{session_id}")
        assert answer.status_code == 200, answer.text
        return answer.json()

    async def wait_ended(self, session_id: str) -> dict[str, Any]:
        """The session once `ended` (never `failed`), and its bot process gone."""

        async def ended() -> dict[str, Any] | None:
            s = await self.session(session_id)
            assert s["state"] != "failed", s
            return s if s["state"] == "ended" else None

        async def bot_gone() -> bool:
            return not bot_pids(session_id)

        final = await eventually(ended, END_TIMEOUT_S, f"session {session_id} to end")
        await eventually(bot_gone, END_TIMEOUT_S, f"the bot of {session_id} to exit")
        return final

    async def stop(self) -> None:
        """SIGTERM to the whole process group (make, uv, the dispatcher), SIGKILL if it lingers;
        then SIGKILL to any bot of this test's sessions still running (after a failure)."""
        await self.http.aclose()
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        if self._reader:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        for session_id in self.sessions:
            for pid in bot_pids(session_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@dataclass
class Browser:
    """A page of headless Chromium, with everything it said."""

    page: Page
    console: list[str] = field(default_factory=list)

    async def events(self) -> list[str]:
        """The names of the events the page recorded (window.pipecatEvents)."""
        return await self.page.evaluate("(window.pipecatEvents || []).map(e => e.name)")

    async def wait_event(self, *names: str, timeout_s: float) -> str:
        """The first of `names` the page records (already recorded counts)."""
        return await (
            await self.page.wait_for_function(
                """names => (window.pipecatEvents || [])
                    .map(e => e.name).find(n => names.includes(n))""",
                arg=list(names),
                timeout=timeout_s * 1000,
            )
        ).json_value()

    async def text(self, selector: str) -> str:
        return (await self.page.text_content(selector) or "").strip()


@pytest.fixture
async def dispatcher(tmp_path: Path) -> AsyncIterator[Dispatcher]:
    _require_chromium()
    d = Dispatcher(tmp_path)
    try:
        await d.start()
        yield d
    finally:
        await d.stop()
        # Shown by pytest only when the test fails (or with -rA).
        print("--- make run output:", *d.lines, sep="\n  ")


@pytest.fixture
async def browser(dispatcher: Dispatcher) -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=False, args=CHROMIUM_ARGS
        )
        try:
            page = await chromium.new_page()
            b = Browser(page)
            page.on("console", lambda m: b.console.append(f"console.{m.type}: {m.text}"))
            page.on("pageerror", lambda e: b.console.append(f"pageerror: {e}"))
            page.on(
                "requestfailed",
                lambda r: b.console.append(f"requestfailed: {r.method} {r.url} {r.failure}"),
            )
            await page.goto(dispatcher.page_url())
            await b.wait_event("page-loaded", timeout_s=10)
            yield b
            # Shown by pytest only when the test fails (or with -rA).
            with contextlib.suppress(Exception):
                print(f"--- page events: {' '.join(await b.events())}")
            print("--- browser console:", *b.console, sep="\n  ")
        finally:
            await chromium.close()


async def test_talk_to_a_bot_and_hang_up(dispatcher: Dispatcher, browser: Browser) -> None:
    began = time.monotonic()
    page = browser.page
    await page.click("#connect")

    # The bot answers the offer and says bot-ready (or the page shows an error).
    first = await browser.wait_event("bot-ready", "error", timeout_s=BOT_READY_TIMEOUT_S)
    assert first == "bot-ready", f"the page shows an error: {await browser.text('#error')}"
    assert await page.is_hidden("#error"), await browser.text("#error")
    assert await browser.text("#transport-state") == "ready"
    session_id = await browser.text("#session-id")
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
    assert (await dispatcher.session(session_id))["state"] == "ready"
    await page.wait_for_selector('#session-state[data-state="ready"]', timeout=5_000)
    assert bot_pids(session_id), f"no process has SESSION_ID={session_id}"

    # The mic toggles (the fake microphone streams to the bot meanwhile).
    await page.click("#mic")
    assert await page.get_attribute("#mic", "aria-pressed") == "false"
    await page.click("#mic")
    assert await page.get_attribute("#mic", "aria-pressed") == "true"

    # Disconnect: the client hangs up and DELETEs the session; it ends, its bot exits.
    await page.click("#disconnect")
    final = await dispatcher.wait_ended(session_id)
    reason = final.get("endReason", final.get("end_reason"))
    assert reason, final
    ended = await page.wait_for_selector('#session-state[data-state="ended"]', timeout=5_000)
    assert reason in (await ended.text_content() or "")
    assert await browser.text("#transport-state") == "disconnected"
    assert await page.is_hidden("#error"), await browser.text("#error")
    assert not [c for c in browser.console if c.startswith("pageerror")], browser.console
    print(f"browser session: {time.monotonic() - began:.1f} s from Connect to the bot's exit")


async def test_errors_show_the_dispatchers_detail(dispatcher: Dispatcher, browser: Browser) -> None:
    page = browser.page

    # A refused start: the page shows the JSON `detail` and can try again.
    detail = "at capacity: 50 active sessions"
    await page.route(
        "**/start",
        lambda route: route.fulfill(status=429, json={"detail": detail, "code": "at-capacity"}),
    )
    await page.click("#connect")
    assert await browser.wait_event("error", "bot-ready", timeout_s=10) == "error"
    assert detail in await browser.text("#error")
    assert "429" in await browser.text("#error")
    await page.wait_for_selector("#connect:not([disabled])", timeout=5_000)
    await page.unroute("**/start")

    # A refused offer (a real session whose bot is said to be gone): the page shows the
    # detail and ends the session it started, so no bot waits for a peer that never comes.
    detail = "the session's bot has exited"
    await page.route(
        "**/api/offer",
        lambda route: route.fulfill(status=410, json={"detail": detail, "code": "bot-gone"}),
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
    await page.wait_for_selector('#session-state[data-state="ended"]', timeout=5_000)
    await page.wait_for_selector("#connect:not([disabled])", timeout=5_000)
