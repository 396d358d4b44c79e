"""Unmodified bot files through a real dispatcher, on both backends and both transports.

Each test runs one bot file (tests/bots: the example, a bot in the style of Pipecat's
examples, a bot that builds its own transport) under the bot runtime, named by BOT_ENTRYPOINT:
- local backend: bots are local processes of `python -m bot_runtime`, over webrtc (an aiortc
  peer connects through the dispatcher's proxy, as a browser would) and over Daily;
- the Fly emulator: bots are the processes of machines whose image holds the bot file, over
  Daily.
Daily sessions join the Daily emulator through the daily-python stand-in
(testkit/fakes/daily_python); the user joins and leaves the room through the emulator.

Every bot reaches `ready` and is ended three ways: by `DELETE` (the bot gets SIGTERM), by the
session's time limit, and by the user leaving; each ends with its reason and exit code 0.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from dispatcher import oncall
from dispatcher.rooms.daily import daily_user_id
from dispatcher.store import AVAILABLE, PoolRows, Store
from dispatcher.webhooks import sign
from testkit.fakes import DAILY_PYTHON
from testkit.harness import BOT_IMAGE, Stack, emulators, fly_emulator, run_dispatcher
from testkit.waits import eventually
from tests.bots import EXAMPLE, OWN_TRANSPORT, PIPECAT_STYLE
from tests.fixtures.peer import Peer, Speaker

BOTS = {"example": EXAMPLE, "pipecat_style": PIPECAT_STYLE, "own_transport": OWN_TRANSPORT}
# Generous for nine bots booting at once on two loaded cores; the time limit leaves the
# sessions ended by DELETE and by the user the time to reach ready and end first.
READY_TIMEOUT_S = 25
MAX_DURATION_S = 30
END_TIMEOUT_S = 60.0
ENDS = ("deleted", "participant_left", "max_duration")


def bot_env(
    *, ready_timeout_s: int = READY_TIMEOUT_S, max_duration_s: int = MAX_DURATION_S
) -> dict[str, str]:
    """The dispatcher's settings: real bots (no test bot), real stop grace."""
    return {
        "LOCAL_BOT_DIR": "",
        "READY_TIMEOUT_S": str(ready_timeout_s),
        "SESSION_MAX_DURATION_S": str(max_duration_s),
        "BOT_STOP_TIMEOUT_S": "10",
    }


def fly_image(tmp_path: Path, bot: Path) -> Path:
    """A bot image for the Fly emulator: the bot's folder, and the daily-python stand-in."""
    image = tmp_path / "image"
    image.mkdir(parents=True)
    for item in bot.parent.iterdir():
        if item.suffix == ".py":
            (image / item.name).symlink_to(item)
    (image / "daily").symlink_to(DAILY_PYTHON / "daily", target_is_directory=True)
    return image


@contextlib.asynccontextmanager
async def local_stack(
    tmp_path: Path, bot: Path, monkeypatch: pytest.MonkeyPatch, **env: str
) -> AsyncIterator[Stack]:
    """A local-mode dispatcher whose bots run `bot` (webrtc and Daily sessions)."""
    async with emulators(fly=None) as urls:
        # Local bots inherit the dispatcher's environment, as `make run` passes it on.
        monkeypatch.setenv("BOT_ENTRYPOINT", str(bot))
        monkeypatch.setenv("PYTHONPATH", str(DAILY_PYTHON))
        monkeypatch.setenv("DAILY_EMULATOR_URL", urls.daily_url)
        (tmp_path / "local").mkdir()
        async with run_dispatcher(tmp_path / "local", urls, env=bot_env() | env, local=True) as s:
            yield s


@contextlib.asynccontextmanager
async def fly_stack(
    tmp_path: Path, bot: Path, secrets: dict[str, str] | None = None, **env: str
) -> AsyncIterator[Stack]:
    """A dispatcher on the Fly emulator, whose bot image holds `bot`'s folder (`secrets`: the
    bot app's, which every machine's env gets)."""
    image = fly_image(tmp_path / "fly", bot)
    app_secrets = {"BOT_ENTRYPOINT": bot.name, **(secrets or {})}
    fly = fly_emulator(images={BOT_IMAGE: image}, secrets=app_secrets)
    async with emulators(fly=fly) as urls:
        fly.secrets["DAILY_EMULATOR_URL"] = urls.daily_url
        async with run_dispatcher(tmp_path / "fly", urls, env=bot_env() | env) as s:
            yield s


@dataclass
class ProxiedBot:
    """The session's bot, reached through the dispatcher's per-session proxy."""

    stack: Stack
    sid: str
    user: str

    async def post(self, body: Any) -> httpx.Response:
        """POST the offer to `/sessions/{id}/api/offer`."""
        return await self.stack.http.post(
            f"/sessions/{self.sid}/api/offer", json=body, headers=self.stack.headers(self.user)
        )


@dataclass
class User:
    """A user of one session: joins its room (Daily) or connects a peer (webrtc), and leaves."""

    stack: Stack
    sid: str
    name: str
    answer: dict[str, Any]
    peer: Peer | None = None
    participant: str | None = None

    async def join(self) -> None:
        """Join the session the way its transport does."""
        if "dailyRoom" in self.answer:
            assert self.stack.daily is not None
            room = self.answer["dailyRoom"].rsplit("/", 1)[1]
            self.participant = self.stack.daily.join(room, self.answer["dailyToken"])["id"]
        else:
            self.peer = Peer(Speaker(np.zeros(0, dtype=np.int16)))
            await self.peer.connect(ProxiedBot(self.stack, self.sid, self.name))

    async def leave(self) -> None:
        """Hang up, or leave the room."""
        if self.peer is not None:
            await self.peer.close()
        elif self.participant is not None:
            assert self.stack.daily is not None
            room = self.answer["dailyRoom"].rsplit("/", 1)[1]
            with contextlib.suppress(KeyError):  # already gone with its room
                self.stack.daily.leave(room, self.participant)
            self.participant = None


async def session_ended_by(stack: Stack, transport: str, end: str, user: str) -> dict[str, Any]:
    """Start a session, join it, wait for ready, end it the way `end` says; the ended session."""
    answer = await stack.start(transport=transport, user=user)
    assert answer.status_code == 200, answer.text
    sid = answer.json()["sessionId"]
    person = User(stack, sid, user, answer.json())
    try:
        await person.join()
        ready = await stack.wait_state(sid, "ready", timeout=END_TIMEOUT_S, user=user)
        assert ready["readyAt"] is not None
        if end == "deleted":
            response = await stack.http.delete(f"/sessions/{sid}", headers=stack.headers(user))
            assert response.status_code == 202, response.text
        elif end == "participant_left":
            await person.leave()
        return await stack.wait_state(sid, "ended", "failed", timeout=END_TIMEOUT_S, user=user)
    finally:
        await person.leave()


async def every_end(stack: Stack, transport: str, prefix: str) -> dict[str, dict[str, Any]]:
    """One session per way to end, all at once; each ended session by its end."""
    sessions = await asyncio.gather(
        *(session_ended_by(stack, transport, end, f"{prefix}-{end}") for end in ENDS)
    )
    return dict(zip(ENDS, sessions, strict=True))


def assert_ended_cleanly(ended: dict[str, dict[str, Any]], where: str) -> None:
    for end, session in ended.items():
        found = (session["state"], session["endReason"], session["exitCode"], session["error"])
        assert found == ("ended", end, 0, None), (where, end, session)


@pytest.mark.slow
# Nine real Pipecat bots booting at once want the machine: run in make test's one-process pass.
@pytest.mark.serial
@pytest.mark.timeout(600)  # nine sessions booting at once, three of them to their time limit
@pytest.mark.parametrize("name", BOTS)
async def test_a_bot_file_runs_unchanged_on_both_backends(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bot file reaches ready and ends by DELETE, by its time limit and by the user
    leaving, with those reasons and exit code 0: locally over webrtc and Daily, and on the Fly
    emulator over Daily; no bot process or machine is left."""
    bot = BOTS[name]
    async with (
        local_stack(tmp_path, bot, monkeypatch) as local,
        fly_stack(tmp_path, bot) as fly,
    ):
        webrtc, daily, on_fly = await asyncio.gather(
            every_end(local, "webrtc", "webrtc"),
            every_end(local, "daily", "daily"),
            every_end(fly, "daily", "fly"),
        )
        assert fly.fly is not None
        await eventually_no_machines(fly)
    assert_ended_cleanly(webrtc, "local webrtc")
    assert_ended_cleanly(daily, "local daily")
    assert_ended_cleanly(on_fly, "fly daily")


async def eventually_no_machines(stack: Stack) -> None:
    """Every machine of the Fly emulator is destroyed (auto_destroy after the bot's exit)."""
    fly = stack.fly
    assert fly is not None
    await eventually(
        lambda: all(m.state == "destroyed" for m in fly.machines.values()),
        timeout=END_TIMEOUT_S,
        what="every machine destroyed",
    )


def bot_processes(sid: str) -> list[int]:
    """The processes of this machine whose environment says they serve session `sid`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if f"SESSION_ID={sid}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
    return found


async def trace_text(stack: Stack, sid: str) -> str:
    """What `dispatcher trace ID` prints for the session."""
    out = io.StringIO()
    async with oncall.clients(stack.settings) as clients:
        with contextlib.redirect_stdout(out):
            assert await oncall.trace(clients, sid, as_json=False) == 0
    return out.getvalue()


@pytest.mark.parametrize("backend", ["local", "fly"])
async def test_a_broken_entry_point_fails_its_session_at_once(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bot file that raises at import fails its session at once, not at the ready timeout:
    failed, entrypoint_error, exit code 2, the error in its own words in `GET /sessions/{id}`
    and `dispatcher trace`; no bot process or machine is left."""
    bot = tmp_path / "team" / "bot.py"
    bot.parent.mkdir()
    bot.write_text("raise RuntimeError('no model file at /models/voice.onnx')\n")
    stack_of = (
        local_stack(tmp_path, bot, monkeypatch) if backend == "local" else fly_stack(tmp_path, bot)
    )
    async with stack_of as stack:
        transport = "webrtc" if backend == "local" else "daily"
        answer = await stack.start(transport=transport, user="broken")
        assert answer.status_code == 200, answer.text
        sid = answer.json()["sessionId"]
        session = await stack.wait_state(
            sid, "failed", "ended", timeout=END_TIMEOUT_S, user="broken"
        )
        trace = await trace_text(stack, sid)
        if backend == "fly":
            await eventually_no_machines(stack)
        else:
            await eventually(lambda: not bot_processes(sid), what="no bot process left")
    assert (session["state"], session["endReason"], session["exitCode"]) == (
        "failed",
        "entrypoint_error",
        2,
    )
    words = "RuntimeError: no model file at /models/voice.onnx"
    assert words in session["error"] and str(bot.name) in session["error"]
    assert words in trace


async def available_pool_machine(stack: Stack) -> str:
    """The id of a pool machine that is available for a start, once there is one."""
    found: list[str] = []

    async def one_available() -> bool:
        store = await Store.open(stack.settings.database_url)
        try:
            rows = await PoolRows(store, stack.settings.dispatcher_name).all()
        finally:
            await store.close()
        found[:] = [row.machine_id for row in rows if row.state == AVAILABLE]
        return bool(found)

    await eventually(one_available, timeout=END_TIMEOUT_S, what="an available pool machine")
    return found[0]


@pytest.mark.slow
async def test_a_pooled_bot_imports_the_teams_module_before_its_claim(tmp_path: Path) -> None:
    """On the Fly emulator with a warm pool of suspended machines, the pool machine's runtime
    imports the team's module (its marker written, once) before it asks for a session, so
    before it is suspended and available, and before the start that claims it; the session
    then runs on that machine (resumed): ready, and deleted with exit 0."""
    marker = tmp_path / "imported"
    env = {
        "POOL_SIZE": "1",
        "POOL_MODE": "suspended",
        "POOL_INTERVAL_S": "0.2",
        "FLY_REGION": "iad",
    }
    secrets = {"BOT_IMPORT_MARKER": str(marker)}
    async with fly_stack(tmp_path, OWN_TRANSPORT, secrets=secrets, **env) as stack:
        pooled = await available_pool_machine(stack)
        imported_at, pid = marker.read_text().split()
        claimed_at = time.time()
        session = await session_ended_by(stack, "daily", "deleted", "pooled-user")
        assert session["machineId"] == pooled
        imports = marker.read_text().splitlines()
    assert float(imported_at) < claimed_at
    assert sum(line.endswith(f" {pid}") for line in imports) == 1
    assert (session["state"], session["endReason"], session["exitCode"]) == ("ended", "deleted", 0)


WEBHOOK_KEY = bytes(range(32))


async def deliver(stack: Stack, kind: str, room: str, **payload: Any) -> dict[str, Any]:
    """POST a Daily webhook about `room`, signed as Daily signs it."""
    event = {
        "version": "1.0.0",
        "type": kind,
        "id": str(uuid.uuid4()),
        "payload": {"room": room, **payload},
        "event_ts": time.time(),
    }
    raw = json.dumps(event).encode()
    ts = str(int(time.time()))
    headers = {"X-Webhook-Timestamp": ts, "X-Webhook-Signature": sign(WEBHOOK_KEY, ts, raw)}
    response = await stack.http.post("/webhooks/daily", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.slow
async def test_daily_sessions_are_ready_with_webhooks_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Daily's webhooks configured too, a Daily session is ready once the bot joined
    (the runtime says so; the bot's `participant.joined` changes nothing), and the user's
    `participant.left` with the bot's own view of it end the session participant_left, exit 0.
    (Without webhooks: test_a_bot_file_runs_unchanged_on_both_backends.)"""
    secret = {"DAILY_WEBHOOK_SECRET": base64.b64encode(WEBHOOK_KEY).decode()}
    async with local_stack(tmp_path, EXAMPLE, monkeypatch, **secret) as stack:
        user = "webhook-user"
        answer = await stack.start(transport="daily", user=user)
        assert answer.status_code == 200, answer.text
        sid, room = answer.json()["sessionId"], answer.json()["dailyRoom"].rsplit("/", 1)[1]
        person = User(stack, sid, user, answer.json())
        await person.join()
        await stack.wait_state(sid, "ready", timeout=END_TIMEOUT_S, user=user)
        joined = await deliver(stack, "participant.joined", room, user_id=f"bot-{sid}")
        assert joined == {"ok": True, "ignored": "event"}
        assert (await stack.session(sid, user))["state"] == "ready"
        await person.leave()
        await deliver(stack, "participant.left", room, user_id=daily_user_id(user))
        ended = await stack.wait_state(sid, "ended", "failed", timeout=END_TIMEOUT_S, user=user)
    assert (ended["state"], ended["endReason"], ended["exitCode"]) == (
        "ended",
        "participant_left",
        0,
    )


def test_the_bot_files_are_the_ones_named() -> None:
    """The test bots exist where BOT_ENTRYPOINT will name them, each with `async def bot`."""
    for path in BOTS.values():
        assert path.is_file(), path
        assert "async def bot(runner_args" in path.read_text()
    assert os.path.isdir(DAILY_PYTHON / "daily")
