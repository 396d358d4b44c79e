"""A real browser on the real page: `make run` as a process, headless Chromium (Debian's, never
a downloaded one) with a fake microphone, and the page's own event log. Shared by
tests/test_browser.py and bench/browser_start.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import wave
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from testkit.net import free_port
from testkit.procs import bot_pids, pool_worker_pids
from testkit.waits import eventually

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Page

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
UTTERANCE = ROOT / "tests" / "fixtures" / "utterance_16k.wav"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Settings that would move `make run` off its embedded defaults (docs/configuration.md), and
# the bot contract's variables: none may leak in from the environment running the tests.
DISPATCHER_ENV = re.compile(
    r"^(HOST|PORT|MACHINE_BACKEND|FLY_.*|BOT_.*|DAILY_.*|DATABASE_URL|DISPATCHER_.*|SESSION_.*|"
    r"READY_TIMEOUT_S|MAX_SESSIONS|JWT_.*|LOCAL_BOT_DIR|ICE_SERVERS|TRACEPARENT|LOG_.*|OTEL_.*|"
    r"TRACE_USER_IDS|POOL_.*)$"
)
START_TIMEOUT_S = 120  # `make run` includes `uv sync --locked`
BOT_READY_TIMEOUT_S = 60
END_TIMEOUT_S = 30
# Every audio track the page gets from getUserMedia, for the tests to see what the mic does.
TRACK_SPY = """(() => {
    window.micTracks = [];
    const media = navigator.mediaDevices;
    if (!media?.getUserMedia) return;
    const getUserMedia = media.getUserMedia.bind(media);
    media.getUserMedia = async (constraints) => {
        const stream = await getUserMedia(constraints);
        window.micTracks.push(...stream.getAudioTracks());
        return stream;
    };
})()"""


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"the browser tests need Chromium in CI: {reason}")
    pytest.skip(reason)


class Dispatcher:
    """`make run PORT=<port>` in the repo root, as a newcomer runs it; its output collected.
    `env` adds settings (POOL_SIZE=0: a dispatcher with no warm bot process)."""

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.env = {k: v for k, v in os.environ.items() if not DISPATCHER_ENV.match(k)}
        self.env["DATABASE_URL"] = f"sqlite:///{tmp_path}/d.db"
        self.env.update(env or {})
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
        body: dict[str, Any] = answer.json()
        return body

    async def wait_ready(self, session_id: str) -> None:
        """The session `ready` (its bot's ready callback may land after the page's bot-ready)."""

        async def ready() -> bool:
            return bool((await self.session(session_id))["state"] == "ready")

        await eventually(ready, END_TIMEOUT_S, f"session {session_id} to be ready", interval=0.25)

    async def wait_line(self, *parts: str) -> str:
        """The first line of the output holding every one of `parts`."""

        async def line() -> str | None:
            return next((ln for ln in self.lines if all(p in ln for p in parts)), None)

        return str(await eventually(line, END_TIMEOUT_S, f"a line with {parts}", interval=0.25))

    async def wait_ended(self, session_id: str) -> dict[str, Any]:
        """The session once `ended` (never `failed`), and its bot process gone."""

        async def ended() -> dict[str, Any] | None:
            s = await self.session(session_id)
            assert s["state"] != "failed", s
            return s if s["state"] == "ended" else None

        async def bot_gone() -> bool:
            return not await self.bot_pids(session_id)

        final = await eventually(
            ended, END_TIMEOUT_S, f"session {session_id} to end", interval=0.25
        )
        await eventually(bot_gone, END_TIMEOUT_S, f"the bot of {session_id} to exit", interval=0.25)
        return dict(final)

    async def bot_pids(self, session_id: str) -> list[int]:
        """The live process of the session's bot: a cold one, or the pool worker serving it."""
        return bot_pids(session_id, (await self.session(session_id)).get("machineId"))

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
        leftover = pool_worker_pids(self.base)
        for session_id in self.sessions:
            leftover += bot_pids(session_id)
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Browser:
    """A page of headless Chromium, with everything it said."""

    page: Page
    shots: Path
    console: list[str] = field(default_factory=list)

    @classmethod
    async def open(cls, context: BrowserContext, url: str, shots: Path) -> Browser:
        """A new tab of `context` on `url`, once the page has loaded."""
        page = await context.new_page()
        b = cls(page, shots)
        page.on("console", lambda m: b.console.append(f"console.{m.type}: {m.text}"))
        page.on("pageerror", lambda e: b.console.append(f"pageerror: {e}"))
        page.on(
            "requestfailed",
            lambda r: b.console.append(f"requestfailed: {r.method} {r.url} {r.failure}"),
        )
        await page.goto(url)
        await b.wait_event("page-loaded", timeout_s=10)
        return b

    async def another_tab(self) -> Browser:
        """The same page in another tab of this browser (the same storage)."""
        return await Browser.open(self.page.context, self.page.url, self.shots)

    async def screenshot(self, name: str) -> Path:
        """The page as it looks now, saved as `<name>.png` in the test's tmp dir."""
        path = self.shots / f"{name}.png"
        await self.page.screenshot(path=path, full_page=True)
        print(f"screenshot: {path}")
        return path

    async def connect(self) -> str:
        """Press Connect; the session id once the bot is ready."""
        await self.page.click("#connect")
        first = await self.wait_event("bot-ready", "error", timeout_s=BOT_READY_TIMEOUT_S)
        assert first == "bot-ready", f"the page shows an error: {await self.text('#error')}"
        return await self.text("#session-id")

    async def wait_text(self, selector: str, text: str, timeout_s: float = 10) -> None:
        """Until the element's text is `text`."""
        await self.page.wait_for_function(
            "([selector, text]) => document.querySelector(selector)?.textContent.trim() === text",
            arg=[selector, text],
            timeout=timeout_s * 1000,
        )

    async def events(self) -> list[str]:
        """The names of the events the page recorded (window.pipecatEvents)."""
        names = await self.page.evaluate("(window.pipecatEvents || []).map(e => e.name)")
        return [str(n) for n in names]

    async def wait_event(self, *names: str, timeout_s: float) -> str:
        """The first of `names` the page records (already recorded counts)."""
        handle = await self.page.wait_for_function(
            """names => (window.pipecatEvents || [])
                .map(e => e.name).find(n => names.includes(n))""",
            arg=list(names),
            timeout=timeout_s * 1000,
        )
        return str(await handle.json_value())

    async def text(self, selector: str) -> str:
        return (await self.page.text_content(selector) or "").strip()


def microphone_args(workdir: Path, utterance: Path = UTTERANCE, pause_s: float = 1.5) -> list[str]:
    """Chromium's arguments for a microphone allowed without a prompt, playing `utterance`
    then `pause_s` of silence, in a loop."""
    with wave.open(str(utterance)) as source:
        params, frames = source.getparams(), source.readframes(source.getnframes())
    path = workdir / "microphone.wav"
    with wave.open(str(path), "wb") as looped:
        looped.setparams(params)
        looped.writeframes(frames + bytes(int(params.framerate * pause_s) * params.sampwidth))
    return ["--use-fake-ui-for-media-stream", f"--use-file-for-fake-audio-capture={path}"]


@contextlib.asynccontextmanager
async def chromium(args: Sequence[str]) -> AsyncIterator[BrowserContext]:
    """A context of headless Chromium with CHROMIUM_ARGS and `args`, the page's microphone
    tracks spied on (TRACK_SPY)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=False, args=[*CHROMIUM_ARGS, *args]
        )
        try:
            context = await browser.new_context()
            await context.add_init_script(TRACK_SPY)
            yield context
        finally:
            await browser.close()
