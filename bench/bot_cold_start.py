"""The bot's cold start: process start -> ready to join, N runs, with baselines from the same run.

    .venv/bin/python bench/bot_cold_start.py [--runs 10]

"Ready" is, for webrtc, the moment the bot's port answers a real SDP offer with 200 (imports,
Silero VAD loaded, pipeline built, server listening); for daily, the moment it logs that it is
joining its room (an unreachable one: nothing is joined). Each run is a fresh process in echo
mode (no provider keys). The baselines, measured in the same run so that the ratios stay
comparable on noisy machines: a bare interpreter (`python -c pass`), and an eager import of the
bot with every provider service it could use (those installed) -- what lazy imports avoid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from aiohttp import web

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from aiortc import RTCPeerConnection

ROOT = Path(__file__).resolve().parent.parent
SESSION_ID = "s-bench"
TOKEN = "bench-callback-token-0123456789"  # noqa: S105 (a fake, for a fake dispatcher)
PROVIDER_MODULES = {
    "pipecat.services.openai.llm": "openai",
    "pipecat.services.cartesia.tts": "websockets",
    "pipecat.services.deepgram.stt": "deepgram",
}
POLL_S = 0.005


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(dispatcher_url: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SESSION_ID": SESSION_ID,
        "DISPATCHER_URL": dispatcher_url,
        "BOT_CALLBACK_TOKEN": TOKEN,
        "SESSION_MAX_DURATION_S": "120",
    }


async def offer_sdp() -> str:
    """A browser-like offer (audio sendrecv, a data channel) from an aiortc peer."""
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("chat")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def time_webrtc(dispatcher_url: str, sdp: str, http: httpx.AsyncClient) -> float:
    """Seconds from spawning a webrtc bot to its 200 answer to an offer."""
    port = free_port()
    env = {
        **base_env(dispatcher_url),
        "BOT_TRANSPORT": "webrtc",
        "BOT_HOST": "127.0.0.1",
        "BOT_PORT": str(port),
        "ICE_SERVERS": "[]",
    }
    url = f"http://127.0.0.1:{port}/api/offer"
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "--transport",
        "webrtc",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"the bot exited with {proc.returncode} before answering")
            try:
                response = await http.post(
                    url,
                    json={"sdp": sdp, "type": "offer"},
                    headers={"X-Session-Id": SESSION_ID},
                )
            except httpx.ConnectError:
                await asyncio.sleep(POLL_S)
                continue
            if response.status_code != 200:
                raise RuntimeError(f"the bot answered {response.status_code}: {response.text}")
            return time.perf_counter() - started
    finally:
        await stop(proc)


async def time_daily(dispatcher_url: str) -> float:
    """Seconds from spawning a daily bot to its `Joining` log line (pipeline built)."""
    env = {
        **base_env(dispatcher_url),
        "BOT_TRANSPORT": "daily",
        "DAILY_ROOM_URL": "http://127.0.0.1:9/s-bench",
        "DAILY_TOKEN": "bench-daily-token-0123456789",
    }
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        while line := await proc.stderr.readline():
            if b"Joining" in line:
                return time.perf_counter() - started
        raise RuntimeError(f"the bot exited with {await proc.wait()} before joining")
    finally:
        await stop(proc)
        if proc.stderr is not None:
            await proc.stderr.read()


async def time_python(code: str) -> float:
    """Seconds for `python -c code` to run to its end."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "ignore",
        "-c",
        code,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    if await proc.wait() != 0:
        raise RuntimeError(f"python -c {code!r} failed")
    return time.perf_counter() - started


def eager_imports() -> tuple[str, list[str]]:
    """Code importing the bot with every installed provider service, and their names."""
    present = [m for m, dep in PROVIDER_MODULES.items() if importlib.util.find_spec(dep)]
    modules = [
        "bot.bot",
        "bot.webrtc",
        "pipecat.transports.smallwebrtc.transport",
        "pipecat.transports.daily.transport",
        "pipecat.processors.aggregators.llm_response_universal",
        *present,
    ]
    return "; ".join(f"import {m}" for m in modules), present


async def callback_sink() -> tuple[web.AppRunner, str]:
    """The dispatcher's callbacks, answered 204 at once."""

    async def accept(_: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/internal/sessions/{sid}/{op}", accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def measure(runs: int) -> None:
    sink, dispatcher_url = await callback_sink()
    sdp = await offer_sdp()
    eager, providers = eager_imports()
    cases: list[tuple[str, Callable[[], Awaitable[float]]]] = []
    async with httpx.AsyncClient(timeout=10) as http:
        cases = [
            ("python -c pass", lambda: time_python("pass")),
            (
                "eager imports (bot + "
                + (", ".join(p.split(".")[2] for p in providers) or "none")
                + ")",
                lambda: time_python(eager),
            ),
            ("webrtc bot: port answers an offer", lambda: time_webrtc(dispatcher_url, sdp, http)),
            ("daily bot: joining its room", lambda: time_daily(dispatcher_url)),
        ]
        results: dict[str, list[float]] = {name: [] for name, _ in cases}
        # Interleaved, so that a slow spell of the machine hits every case alike.
        for i in range(runs + 1):
            for name, case in cases:
                value = await case()
                if i:  # The first round warms the disk cache.
                    results[name].append(value)
    await sink.cleanup()

    python = statistics.median(results[cases[0][0]])
    eager_median = statistics.median(results[cases[1][0]])
    print(f"bot cold start, {runs} runs each (after one warm-up round), {sys.version.split()[0]}")
    print(f"{'case':<48} {'median':>8} {'p95':>8} {'/python':>8} {'/eager':>7}")
    for name, values in results.items():
        median = statistics.median(values)
        print(
            f"{name:<48} {median * 1000:>6.0f}ms {p95(values) * 1000:>6.0f}ms"
            f" {median / python:>7.1f}x {median / eager_median:>6.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs per case")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(measure(args.runs))


if __name__ == "__main__":
    main()
