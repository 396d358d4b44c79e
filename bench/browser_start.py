"""How soon the page's user has a bot: a cold dispatcher against one with a warm pool, in a
real browser.

    .venv/bin/python bench/browser_start.py [--sessions 20] [--out figures.json]

Two `make run` dispatchers on this machine, their embedded defaults but for the pool: one cold
(`POOL_SIZE=0`: every bot a fresh process that imports Pipecat and loads Silero), one pooled
(`POOL_SIZE=1`: a bot process loaded ahead of the session, waiting for its assignment). Headless
Chromium opens each one's page with a fake microphone playing a spoken sentence (the fixture's
utterance, then 1.5 s of silence, in a loop), as tests/test_browser.py drives it. Sessions
alternate between the two dispatchers, `--sessions` each; a session presses Connect, waits for
the page's RTVI `bot-ready` and for the bot's first audio heard by the page (its level meter
crossing the speaking threshold: the example bot greets the user with a chime as the client
connects), then presses Disconnect and waits until the session has ended and its bot process
is gone. Before each session both dispatchers are idle: the pooled one's pool is full again
(the bot that replaces the one a session took has loaded), so that neither measures the other's
background work. Times are the page's own clock (`Date.now()` at the click, and at each event).

Figures: p50 and p95 of Connect → bot ready and Connect → first bot audio heard, per dispatcher,
the ratio of the two medians, whether every pooled session got a pool worker, and the
machine's load average (`uptime`'s) before and after the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import emit, percentile
from testkit.browser import BOT_READY_TIMEOUT_S, Browser, Dispatcher, chromium, microphone_args
from testkit.waits import eventually

KINDS = ("cold", "pooled")
POOL_SIZE = 1
IDLE_TIMEOUT_S = 120.0
# The bot's first audio, heard: the page's level meter for the bot says it is speaking.
FIRST_AUDIO = "bot-speaking"
AUDIO_TIMEOUT_S = 30.0
# Presses Connect and answers the page's clock at that moment.
CONNECT = "() => { const at = Date.now(); document.getElementById('connect').click(); return at; }"
EVENT_AT = "name => (window.pipecatEvents || []).find(e => e.name === name)?.at ?? null"
# Every event the page recorded, first of each name: where a session's time went.
TIMELINE = """() => {
    const seen = {};
    for (const e of window.pipecatEvents || []) if (!(e.name in seen)) seen[e.name] = e.at;
    return seen;
}"""


@dataclass
class Run:
    """One dispatcher's sessions: their times (seconds) and how each started."""

    kind: str
    ready_s: list[float] = field(default_factory=list)
    audio_s: list[float] = field(default_factory=list)
    claims: int = 0
    misses: int = 0

    def figures(self) -> dict[str, Any]:
        return {
            "sessions": len(self.ready_s),
            "bot_ready_s": {q: pct(self.ready_s, q) for q in ("p50", "p95")},
            "first_audio_s": {q: pct(self.audio_s, q) for q in ("p50", "p95")},
            "bot_ready_all_s": self.ready_s,
            "first_audio_all_s": self.audio_s,
            "pool_claims": self.claims,
            "pool_misses": self.misses,
        }


def pct(values: list[float], q: str) -> float | None:
    return percentile(values, float(q[1:])) if values else None


async def metric(dispatcher: Dispatcher, name: str) -> float:
    """A counter or gauge of the dispatcher's /metrics (0 when absent), summed over labels."""
    text = (await dispatcher.http.get("/metrics")).text
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


async def pool_full(dispatcher: Dispatcher, size: int) -> None:
    """Until `size` pool workers are loaded and waiting, and none is still loading."""

    async def full() -> bool:
        text = (await dispatcher.http.get("/metrics")).text
        available = warming = 0.0
        for line in text.splitlines():
            if line.startswith("dispatcher_pool_machines{"):
                value = float(line.rsplit(" ", 1)[1])
                if 'state="available"' in line:
                    available += value
                elif 'state="warming"' in line:
                    warming += value
        return available == size and warming == 0

    await eventually(full, IDLE_TIMEOUT_S, "the pool full again", interval=0.25)


async def one_session(dispatcher: Dispatcher, browser: Browser) -> tuple[float, float]:
    """Connect, the bot ready and heard, Disconnect, the session over: (ready, audio) seconds."""
    page = browser.page
    clicked = await page.evaluate(CONNECT)
    first = await browser.wait_event("bot-ready", "error", timeout_s=BOT_READY_TIMEOUT_S)
    if first != "bot-ready":
        raise RuntimeError(f"the page shows an error: {await browser.text('#error')}")
    await browser.wait_event(FIRST_AUDIO, timeout_s=AUDIO_TIMEOUT_S)
    ready_at = await page.evaluate(EVENT_AT, "bot-ready")
    audio_at = await page.evaluate(EVENT_AT, FIRST_AUDIO)
    session_id = await browser.text("#session-id")
    dispatcher.sessions.append(session_id)
    timeline = await page.evaluate(TIMELINE)
    steps = sorted((at - clicked, name) for name, at in timeline.items() if at >= clicked)
    print("  " + ", ".join(f"{name} {ms}" for ms, name in steps), file=sys.stderr)
    await page.click("#disconnect")
    await dispatcher.wait_ended(session_id)
    return (ready_at - clicked) / 1000, (audio_at - clicked) / 1000


@contextlib.asynccontextmanager
async def dispatchers(workdir: Path) -> AsyncIterator[dict[str, Dispatcher]]:
    """The two `make run`s, started one after the other (the first syncs the environment)."""
    started: dict[str, Dispatcher] = {}
    try:
        for kind in KINDS:
            size = POOL_SIZE if kind == "pooled" else 0
            home = workdir / kind
            home.mkdir(parents=True, exist_ok=True)
            started[kind] = Dispatcher(home, {"POOL_SIZE": str(size)})
            await started[kind].start()
        yield started
    finally:
        for dispatcher in started.values():
            await dispatcher.stop()


async def measure(sessions: int, workdir: Path) -> dict[str, Run]:
    """`sessions` sessions of each dispatcher, alternating, in one browser."""
    runs = {kind: Run(kind) for kind in KINDS}
    async with (
        dispatchers(workdir) as started,
        chromium(microphone_args(workdir)) as context,
    ):
        for index in range(sessions * len(KINDS)):
            kind = KINDS[index % len(KINDS)]
            dispatcher = started[kind]
            await pool_full(started["pooled"], POOL_SIZE)
            claims = await metric(dispatcher, "dispatcher_pool_claims_total")
            browser = await Browser.open(context, dispatcher.page_url(), workdir)
            try:
                ready_s, audio_s = await one_session(dispatcher, browser)
            finally:
                await browser.page.close()
            run = runs[kind]
            run.ready_s.append(ready_s)
            run.audio_s.append(audio_s)
            if kind == "pooled":
                claimed = await metric(dispatcher, "dispatcher_pool_claims_total") > claims
                run.claims += claimed
                run.misses += not claimed
            print(
                f"{kind:>6} session {len(run.ready_s):>2}: bot ready {ready_s * 1000:.0f} ms, "
                f"first audio {audio_s * 1000:.0f} ms",
                file=sys.stderr,
                flush=True,
            )
    return runs


def report(runs: dict[str, Run], load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    """The table: p50 and p95 of both figures per dispatcher, and the ratio of the medians."""
    lines = [
        "Connect to bot ready, and to the bot's first audio heard, in the page (ms)",
        "",
        "| dispatcher | sessions | bot ready p50 | p95 | first audio p50 | p95 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs.values():
        name = "cold (POOL_SIZE=0)" if run.kind == "cold" else f"pooled (POOL_SIZE={POOL_SIZE})"
        figures = [
            pct(run.ready_s, "p50"),
            pct(run.ready_s, "p95"),
            pct(run.audio_s, "p50"),
            pct(run.audio_s, "p95"),
        ]
        cells = " | ".join("-" if f is None else f"{f * 1000:.0f}" for f in figures)
        lines.append(f"| {name} | {len(run.ready_s)} | {cells} |")
    cold, pooled = runs["cold"], runs["pooled"]
    ready = ratio(cold.ready_s, pooled.ready_s)
    audio = ratio(cold.audio_s, pooled.audio_s)
    lines += [
        "",
        f"cold / pooled, p50: bot ready {ready:.1f}x, first audio {audio:.1f}x",
        f"pooled sessions served by a pool worker: {pooled.claims} of {len(pooled.ready_s)}",
        "load average (1, 5, 15 min) before: {} after: {}".format(
            *(" ".join(f"{v:.2f}" for v in values) for values in load)
        ),
    ]
    return "\n".join(lines)


def ratio(cold: list[float], pooled: list[float]) -> float:
    if not cold or not pooled:
        return float("nan")
    return percentile(cold, 50) / percentile(pooled, 50)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20, help="sessions per dispatcher")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="browser-start-") as tmp:
        runs = asyncio.run(measure(args.sessions, Path(tmp)))
    load = (before, os.getloadavg())
    figures = {
        "date": datetime.date.today().isoformat(),
        "load_before": before,
        "load_after": load[1],
        **{kind: run.figures() for kind, run in runs.items()},
        "ratio_p50": {
            "bot_ready": ratio(runs["cold"].ready_s, runs["pooled"].ready_s),
            "first_audio": ratio(runs["cold"].audio_s, runs["pooled"].audio_s),
        },
    }
    emit(report(runs, load), figures, args.out, started=began)


if __name__ == "__main__":
    main()
