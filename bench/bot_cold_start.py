"""What the bot runtime adds to a bot's cold start, over the bot file's own imports.

    .venv/bin/python bench/bot_cold_start.py [--runs 10] [--bot examples/bot/bot.py]

Each case is a fresh process, in echo mode (no provider keys), measured from its spawn:

- `python -c pass`: the interpreter alone;
- the bot file's own imports: a process that imports the bot's module (its Pipecat imports,
  its module-level work) and exits: what any host of the file pays;
- the runtime's own imports: `bot_runtime` and what a session of it imports, without the bot;
- the runtime running the bot, webrtc: until the session's port answers a real SDP offer with
  200 (the transport served, the bot's pipeline built and started);
- the runtime running the bot, Daily: until the bot's transport logs that it is joining its
  room (an address nobody answers: nothing is joined);
- Pipecat's development runner running the same file (`python bot.py -t webrtc`): until its
  `/api/offer` answers the same offer, the other way a team runs this file.

Runs are interleaved, so that a slow spell of the machine hits every case alike; the first
round warms the disk cache and is not counted. "Over the bot's imports" is a case's median
minus the bot file's own import median: what that host adds to the file's own start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from aiohttp import web

from bench.report import emit, percentile
from testkit.net import free_port

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from aiortc import RTCPeerConnection

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "bot" / "bot.py"
SESSION_ID = "s-bench"
TOKEN = "bench-callback-token-0123456789"  # noqa: S105 (a fake, for a fake dispatcher)
RUNTIME_MODULES = (
    "bot_runtime.__main__",
    "bot_runtime.session",
    "bot_runtime.transport",
    "bot_runtime.webrtc",
    "pipecat.runner.types",
)
POLL_S = 0.005
STOP_TIMEOUT_S = 15

Case = Callable[[], Awaitable[float]]


def base_env(dispatcher_url: str, bot: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SESSION_ID": SESSION_ID,
        "DISPATCHER_URL": dispatcher_url,
        "BOT_CALLBACK_TOKEN": TOKEN,
        "SESSION_MAX_DURATION_S": "120",
        "BOT_ENTRYPOINT": str(bot),
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


async def stop(proc: asyncio.subprocess.Process, signum: int = signal.SIGTERM) -> None:
    if proc.returncode is None:
        proc.send_signal(signum)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def until_offer_answered(
    proc: asyncio.subprocess.Process,
    url: str,
    sdp: str,
    http: httpx.AsyncClient,
    started: float,
    headers: dict[str, str],
) -> float:
    """Seconds from `started` until `url` answers the offer with 200."""
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"the process exited with {proc.returncode} before answering")
        try:
            response = await http.post(url, json={"sdp": sdp, "type": "offer"}, headers=headers)
        except httpx.TransportError:
            await asyncio.sleep(POLL_S)
            continue
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}: {response.text}")
        return time.perf_counter() - started


async def time_runtime_webrtc(
    dispatcher_url: str, bot: Path, sdp: str, http: httpx.AsyncClient
) -> float:
    """The runtime running `bot` over webrtc: spawn to its port answering an offer."""
    port = free_port()
    env = {
        **base_env(dispatcher_url, bot),
        "BOT_TRANSPORT": "webrtc",
        "BOT_HOST": "127.0.0.1",
        "BOT_PORT": str(port),
        "ICE_SERVERS": "[]",
    }
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot_runtime",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/offer"
        headers = {"X-Session-Id": SESSION_ID}
        return await until_offer_answered(proc, url, sdp, http, started, headers)
    finally:
        await stop(proc)


async def time_runtime_daily(dispatcher_url: str, bot: Path) -> float:
    """The runtime running `bot` over Daily: spawn to the transport's `Joining` line."""
    env = {
        **base_env(dispatcher_url, bot),
        "BOT_TRANSPORT": "daily",
        "DAILY_ROOM_URL": "http://127.0.0.1:9/s-bench",
        "DAILY_TOKEN": "bench-daily-token-0123456789",
    }
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot_runtime",
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


async def time_dev_runner(bot: Path, sdp: str, http: httpx.AsyncClient) -> float:
    """Pipecat's development runner running `bot`: spawn to `/api/offer` answering."""
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        bot.name,
        "-t",
        "webrtc",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        cwd=bot.parent,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/offer"
        return await until_offer_answered(proc, url, sdp, http, started, {})
    finally:
        await stop(proc, signal.SIGINT)


async def time_python(code: str, cwd: Path = ROOT) -> float:
    """Seconds for `python -c code` to run to its end."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "ignore",
        "-c",
        code,
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    if await proc.wait() != 0:
        raise RuntimeError(f"python -c {code!r} failed")
    return time.perf_counter() - started


def import_file(bot: Path) -> str:
    """Code that imports `bot` the way the runtime and Pipecat's runner do (its folder first)."""
    return (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(bot.parent)!r})\n"
        f"spec = importlib.util.spec_from_file_location({bot.stem!r}, {str(bot)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
    )


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


async def measure(runs: int, bot: Path) -> dict[str, list[float]]:
    """Each case's timings (seconds), `runs` of each after a warm-up round."""
    sink, dispatcher_url = await callback_sink()
    sdp = await offer_sdp()
    runtime_imports = "; ".join(f"import {m}" for m in RUNTIME_MODULES)
    async with httpx.AsyncClient(timeout=10) as http:
        cases: dict[str, Case] = {
            "python -c pass": lambda: time_python("pass"),
            "the bot file's own imports": lambda: time_python(import_file(bot), bot.parent),
            "the runtime's own imports (no bot)": lambda: time_python(runtime_imports),
            "runtime + bot, webrtc: offer answered": lambda: time_runtime_webrtc(
                dispatcher_url, bot, sdp, http
            ),
            "runtime + bot, daily: joining its room": lambda: time_runtime_daily(
                dispatcher_url, bot
            ),
            "Pipecat's dev runner + bot, webrtc: offer answered": lambda: time_dev_runner(
                bot, sdp, http
            ),
        }
        results: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(runs + 1):
            for name, case in cases.items():
                value = await case()
                if i:
                    results[name].append(value)
    await sink.cleanup()
    return results


def report(results: dict[str, list[float]], runs: int, bot: Path) -> str:
    """The table: median, p95, and each case over the bot file's own imports."""
    names = list(results)
    own = statistics.median(results[names[1]])
    lines = [
        f"bot cold start of {bot.relative_to(ROOT) if bot.is_relative_to(ROOT) else bot}, "
        f"{runs} runs each (after one warm-up round), Python {sys.version.split()[0]}",
        f"{'case':<52} {'median':>8} {'p95':>8} {'over the bot':>13} {'÷ bot':>6}",
    ]
    for name, values in results.items():
        median = statistics.median(values)
        lines.append(
            f"{name:<52} {median * 1000:>6.0f}ms {percentile(values, 95) * 1000:>6.0f}ms"
            f" {(median - own) * 1000:>+11.0f}ms {median / own:>5.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs per case")
    parser.add_argument("--bot", type=Path, default=EXAMPLE, help="the bot file (default: example)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        results = asyncio.run(measure(args.runs, args.bot.resolve()))
        emit(report(results, args.runs, args.bot.resolve()))


if __name__ == "__main__":
    main()
