"""Real bot runtime processes (`python -m bot_runtime`) for tests: started with a contract
environment against a callback recorder, their output in files, killed by the `bots` fixture."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from testkit.fakes.recorder import CallbackRecorder, contract_env
from testkit.net import free_port

ROOT = Path(__file__).parent.parent
SESSION_ID = "s-test1"
# Generous bounds for a loaded machine: a bot boots in ~2 s, a stop takes ~1 s.
BOOT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
WEBRTC_ARGV = ("--transport", "webrtc")


@dataclass
class BotProcess:
    """`python -m bot_runtime` with its logs in files."""

    proc: asyncio.subprocess.Process
    port: int
    logs: Path
    http: httpx.AsyncClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/offer"

    def output(self) -> str:
        """Everything the bot wrote on stdout and stderr so far."""
        return "".join(p.read_text() for p in sorted(self.logs.glob("*.log")))

    async def listening(self) -> bool:
        """Wait until the bot's port accepts connections (True) or the bot exits (False)."""
        async with asyncio.timeout(BOOT_TIMEOUT_S):
            while self.proc.returncode is None:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.proc.wait(), 0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                return True
        return False

    async def post(self, body: Any, session: str | None = SESSION_ID, **kw: Any) -> httpx.Response:
        headers = {} if session is None else {"X-Session-Id": session}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.http.request(
            kw.pop("method", "POST"), self.url, content=content, headers=headers
        )

    async def exit_code(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout_s)


def webrtc_env(dispatcher_url: str, port: int) -> dict[str, str]:
    """The contract env of a webrtc session (Daily's variables removed), its bot on `port`."""
    return contract_env(
        dispatcher_url,
        BOT_TRANSPORT="webrtc",
        BOT_HOST="127.0.0.1",
        BOT_PORT=str(port),
        ICE_SERVERS="[]",
        DAILY_ROOM_URL=None,
        DAILY_TOKEN=None,
    )


async def start_bot(
    recorder: CallbackRecorder,
    tmp_path: Path,
    argv: tuple[str, ...] = WEBRTC_ARGV,
    **overrides: str | None,
) -> BotProcess:
    """Start the real bot with the webrtc contract env (Daily's variables removed)."""
    port = free_port()
    env = webrtc_env(recorder.url, port)
    env.update({"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    with (tmp_path / "stdout.log").open("w") as out, (tmp_path / "stderr.log").open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot_runtime",
            *argv,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
        )
    return BotProcess(proc, port, tmp_path, httpx.AsyncClient(timeout=30))


async def booted(
    bots: list[BotProcess], recorder: CallbackRecorder, tmp_path: Path, **overrides: str | None
) -> BotProcess:
    """A bot that listens for its offer."""
    bot = await start_bot(recorder, tmp_path, WEBRTC_ARGV, **overrides)
    bots.append(bot)
    assert await bot.listening(), bot.output()
    return bot
