"""The example bot under Pipecat's own development runner, unchanged: `python bot.py`.

The same file the bot runtime runs is started the way a Pipecat developer starts it on their
laptop (`python bot.py -t webrtc`, its folder the working directory): the runner's FastAPI
server answers an aiortc peer's offer at `/api/offer`, the bot greets the peer, and SIGINT
(Ctrl-C) stops the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from testkit.net import free_port
from tests.bots import EXAMPLE
from tests.fixtures.peer import Peer, Speaker, heard_echo

BOOT_TIMEOUT_S = 60.0


class DevRunner:
    """`python bot.py -t webrtc` on a free port, its output in a file."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)

    async def post(self, body: Any) -> httpx.Response:
        """POST an offer to the runner's `/api/offer`."""
        return await self.http.post("/api/offer", json=body)

    async def serving(self) -> None:
        """Wait until the runner's server answers."""
        async with asyncio.timeout(BOOT_TIMEOUT_S):
            while True:
                assert self.proc.returncode is None, self.log.read_text()
                with contextlib.suppress(httpx.TransportError):
                    await self.http.get("/")
                    return
                await asyncio.sleep(0.2)


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[DevRunner]:
    """The example bot started by Pipecat's development runner."""
    port = free_port()
    log = tmp_path / "runner.log"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            EXAMPLE.name,
            "-t",
            "webrtc",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            cwd=EXAMPLE.parent,
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    dev = DevRunner(proc, port, log)
    try:
        yield dev
    finally:
        await dev.http.aclose()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.slow
async def test_the_example_answers_an_offer_and_greets_under_the_dev_runner(
    runner: DevRunner,
) -> None:
    """The runner answers a webrtc offer with an SDP answer, the example greets the peer with
    its chime, and Ctrl-C (SIGINT) stops the runner."""
    await runner.serving()
    peer = Peer(Speaker(np.zeros(0, dtype=np.int16)))
    try:
        await peer.connect(runner)
        await asyncio.wait_for(heard_echo(peer), BOOT_TIMEOUT_S)  # the greeting chime
        assert peer.audio().max() > 0.05
    finally:
        await peer.close()
    runner.proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(runner.proc.wait(), BOOT_TIMEOUT_S)
    assert "Client connected" in runner.log.read_text()
