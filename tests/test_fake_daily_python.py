"""The daily-python stand-in (`testkit/fakes/daily_python`) under Pipecat's real DailyTransport.

Each test runs `testkit/fakes/daily_python/audio_bot.py` in a subprocess with the stand-in first
on PYTHONPATH, against a `DailyEmulator` served on loopback in the test's event loop, and reads
the JSON events the bot prints. Waits are bounded by a deadline; nothing asserts on time taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.fakes import DAILY_PYTHON
from testkit.fakes.daily import DEFAULT_API_KEY, DailyEmulator
from testkit.net import free_port, serve

ROOT = Path(__file__).resolve().parent.parent
BOT = DAILY_PYTHON / "audio_bot.py"
DEADLINE_S = 60.0
POLL_S = 0.05
GREETING_BYTES = 16000 * 2 * 48 // 100

Event = dict[str, Any]


class BotRun:
    """A bot process and the events it has printed so far."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc, self.stderr = proc, stderr
        self.events: list[Event] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def seen(self, name: str, **fields: Any) -> Event | None:
        """The first event called `name` whose fields include `fields`, if printed yet."""
        for event in self.events:
            if event["event"] == name and all(event.get(k) == v for k, v in fields.items()):
                return event
        return None

    async def wait_for(self, name: str, **fields: Any) -> Event:
        """The first event called `name` with `fields`, waiting for it up to the deadline."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            finished = self._reader.done()
            if (event := self.seen(name, **fields)) is not None:
                return event
            if finished or time.monotonic() > deadline:
                pytest.fail(f"no {name} {fields} event; events: {self.events}\n{self.output()}")
            await asyncio.sleep(POLL_S)

    async def exited_cleanly(self) -> None:
        """Wait for the process to end; it must exit 0 with no thread left behind."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), DEADLINE_S)
        except TimeoutError:
            pytest.fail(f"the bot did not exit; events: {self.events}\n{self.output()}")
        await self._reader
        assert code == 0, self.output()
        assert self.seen("exited", threads=[]), self.events

    def output(self) -> str:
        """The tail of the bot's stderr (Pipecat's log)."""
        return self.stderr.read_text(errors="replace")[-6000:]

    async def close(self) -> None:
        """Kill the process if it is still running."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._reader


class Stage:
    """A Daily emulator on loopback, a client of its API, and the bots started against it."""

    def __init__(self, emu: DailyEmulator, url: str, api: httpx.AsyncClient, tmp: Path) -> None:
        self.emu, self.url, self.api, self.tmp = emu, url, api, tmp
        self.bots: list[BotRun] = []

    async def room(self, name: str = "call") -> str:
        """Create a private room through the REST API; its URL."""
        answer = await self.api.post("/rooms", json={"name": name, "privacy": "private"})
        assert answer.status_code == 200, answer.text
        return str(answer.json()["url"])

    def token(self, room: str, user_id: str, *, key: str | None = None, **claims: Any) -> str:
        """A self-signed meeting token with the claims the dispatcher gives one."""
        now = int(time.time())
        payload = {"r": room, "ud": user_id, "d": self.emu.domain_id, "iat": now, "exp": now + 600}
        payload |= claims
        if key is None:
            return self.emu.sign(payload)
        return DailyEmulator(api_key=key).sign(payload)

    async def user_joins(self, room: str) -> str:
        """A user joins `room` through the emulator's join route; their participant ID."""
        token = self.token(room, f"user-{uuid.uuid4().hex[:8]}", u="User")
        answer = await self.api.post(f"/_emulator/rooms/{room}/join", json={"token": token})
        assert answer.status_code == 200, answer.text
        return str(answer.json()["id"])

    async def user_leaves(self, room: str, participant_id: str) -> None:
        """The user leaves `room` through the emulator's leave route."""
        answer = await self.api.post(f"/_emulator/rooms/{room}/leave", json={"id": participant_id})
        assert answer.status_code == 200, answer.text

    async def bot(
        self, room_url: str, token: str | None, *, speaker: bool = False, emulator: str = ""
    ) -> BotRun:
        """Start the audio bot on `room_url` with the stand-in first on its PYTHONPATH."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.tmp),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(DAILY_PYTHON), str(ROOT)]),
            "DAILY_EMULATOR_URL": emulator or self.url,
        }
        argv = [str(BOT), room_url, *(["--token", token] if token else [])]
        argv += ["--speaker"] if speaker else []
        stderr = self.tmp / f"bot-{len(self.bots)}.log"
        with stderr.open("w") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=err
            )
        run = BotRun(proc, stderr)
        self.bots.append(run)
        started = await run.wait_for("started")
        assert Path(started["daily"]).is_relative_to(DAILY_PYTHON), started
        return run

    def in_room(self, room: str) -> set[str]:
        """The IDs of the participants in `room` now."""
        return set(self.emu.rooms[room].participants)

    def departure(self, participant_id: str) -> str | None:
        """Why `participant_id` left its room, if it has."""
        reasons = [p.left_reason for p in self.emu.departures if p.id == participant_id]
        return reasons[-1] if reasons else None


@pytest.fixture
async def stage(tmp_path: Path) -> AsyncIterator[Stage]:
    """An emulator served on loopback; bots still running at the end are killed."""
    emu = DailyEmulator()
    headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    async with serve(emu.app) as url, httpx.AsyncClient(base_url=url, headers=headers) as api:
        stage = Stage(emu, url, api, tmp_path)
        try:
            yield stage
        finally:
            for run in stage.bots:
                await run.close()


async def test_participants_route_lists_a_room(stage: Stage) -> None:
    """The control route lists a room's participants, and answers 404 once it is deleted."""
    await stage.room("listed")
    user = await stage.user_joins("listed")
    listed = await stage.api.get("/_emulator/rooms/listed/participants")
    assert listed.status_code == 200
    assert [p["id"] for p in listed.json()] == [user]
    await stage.api.delete("/rooms/listed")
    gone = await stage.api.get("/_emulator/rooms/listed/participants")
    assert (gone.status_code, gone.json()) == (404, {"error": "not-found"})
    missing = await stage.api.get("/_emulator/rooms/never/participants")
    assert missing.status_code == 404


@pytest.mark.slow
async def test_bot_joins_with_a_valid_token(stage: Stage) -> None:
    """A bot with a valid token fires on_joined and is in the emulator's room as its user ID."""
    url = await stage.room()
    run = await stage.bot(url, stage.token("call", "bot-1", o=True, u="Pipecat Bot"))
    joined = await run.wait_for("joined")
    await run.wait_for("call_state", state="joined")
    local = joined["data"]["participants"]["local"]
    assert local["info"]["isLocal"] is True
    assert joined["data"]["meetingSession"]["id"]
    participant = stage.emu.rooms["call"].participants[joined["id"]]
    assert (participant.user_id, participant.is_owner) == ("bot-1", True)
    run.proc.send_signal(signal.SIGTERM)
    await run.exited_cleanly()


@pytest.mark.slow
async def test_user_joining_and_leaving_reach_the_bot(stage: Stage) -> None:
    """A user joining through the emulator fires the join events, and leaving the left ones."""
    url = await stage.room()
    run = await stage.bot(url, stage.token("call", "bot-1"))
    bot = (await run.wait_for("joined"))["id"]
    user = await stage.user_joins("call")
    first = await run.wait_for("first_participant_joined", id=user)
    assert first["participant"]["info"]["isLocal"] is False
    await run.wait_for("client_connected", id=user)
    await stage.user_leaves("call", user)
    await run.wait_for("participant_left", id=user, reason="leftCall")
    await run.wait_for("client_disconnected", id=user)
    await run.exited_cleanly()
    assert stage.departure(bot) == "left"


@pytest.mark.parametrize("problem", ["bad-token", "expired-token", "missing-room", "no-emulator"])
async def test_refused_join_fails_with_on_error(stage: Stage, problem: str) -> None:
    """A join the emulator refuses, or cannot hear, fires on_error and the bot ends promptly."""
    url = await stage.room()
    token = stage.token("call", "bot-1")
    emulator = ""
    expected = {
        "bad-token": "token-invalid",
        "expired-token": "token-expired",
        "missing-room": "room-not-found",
        "no-emulator": "cannot reach",
    }[problem]
    if problem == "bad-token":
        token = stage.token("call", "bot-1", key="not-the-api-key-" + "x" * 32)
    elif problem == "expired-token":
        token = stage.token("call", "bot-1", exp=int(time.time()) - 60)
    elif problem == "missing-room":
        url, token = url.replace("/call", "/nowhere"), stage.token("nowhere", "bot-1")
    else:
        emulator = f"http://127.0.0.1:{free_port()}"
    run = await stage.bot(url, token, emulator=emulator)
    error = await run.wait_for("error")
    assert expected in error["error"]
    await run.exited_cleanly()
    assert not run.seen("joined")
    assert stage.in_room("call") == set()


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["room-deleted", "ejected"])
async def test_call_ending_underneath_makes_the_state_left(stage: Stage, ending: str) -> None:
    """A deleted room, or a token's ejection, ends the call: the state becomes left."""
    url = await stage.room()
    claims: dict[str, Any] = {"eje": 1} if ending == "ejected" else {}
    run = await stage.bot(url, stage.token("call", "bot-1", **claims))
    bot = (await run.wait_for("joined"))["id"]
    if ending == "room-deleted":
        assert (await stage.api.delete("/rooms/call")).status_code == 200
    await run.wait_for("call_state", state="left")
    await run.exited_cleanly()
    assert stage.departure(bot) == ending


@pytest.mark.slow
async def test_bot_leaving_removes_it_from_the_room(stage: Stage) -> None:
    """A bot that ends (SIGTERM) leaves the room, which keeps its user, and exits cleanly."""
    url = await stage.room()
    user = await stage.user_joins("call")
    run = await stage.bot(url, stage.token("call", "bot-1"))
    bot = (await run.wait_for("joined"))["id"]
    await run.wait_for("first_participant_joined", id=user)
    assert stage.in_room("call") == {user, bot}
    run.proc.send_signal(signal.SIGTERM)
    await run.wait_for("left")
    await run.exited_cleanly()
    assert stage.departure(bot) == "left"
    assert stage.in_room("call") == {user}


@pytest.mark.slow
@pytest.mark.parametrize("speaker", [False, True], ids=["user-tracks", "speaker"])
async def test_audio_is_written_and_heard(stage: Stage, speaker: bool) -> None:
    """The bot's greeting is written in full, and the room's (silent) audio reaches the bot."""
    url = await stage.room()
    run = await stage.bot(url, stage.token("call", "bot-1"), speaker=speaker)
    await run.wait_for("joined")
    user = await stage.user_joins("call")
    spoke = await run.wait_for("spoke")
    assert spoke["bytes"] >= GREETING_BYTES
    heard = await run.wait_for("heard")
    assert heard["sample_rate"] == 16000
    await stage.user_leaves("call", user)
    await run.exited_cleanly()
