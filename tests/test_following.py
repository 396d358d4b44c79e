"""Following sessions at a cost that grows with sessions started and ended, not with sessions
alive (dispatcher/supervisor.py): the bot's `ended` callback, the leader's batched watch for
machines that exit without a word, and the timers' one sweep.

Nothing here times anything: each test waits for its condition and asserts on what the Fly
emulator received (which requests, how many) and what the store recorded."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.config import Settings
from dispatcher.deadlines import Deadlines
from dispatcher.machines.fly import FlyMachines
from dispatcher.machines.fly_api import FlyAPI
from testkit.fakes.fly import ApiRequest, FlyEmulator
from testkit.harness import (
    BOT_APP,
    BOT_IMAGE,
    FAST_RETRY,
    FLY_TOKEN,
    Stack,
    dispatcher_env,
    dispatcher_stack,
    emulators,
    fly_emulator,
)
from testkit.waits import eventually

MACHINES = f"/v1/apps/{BOT_APP}/machines"
# No reconciler pass after the one at start-up: what ends a session here is the follow.
NO_RECONCILER = {"RECONCILE_INTERVAL_S": "3600"}


def is_watch(request: ApiRequest) -> bool:
    """A page of the watch: the summary list of the dispatcher's machines."""
    return request.method == "GET" and request.path == MACHINES and "summary=true" in request.query


def about(request: ApiRequest, machine_id: str, tail: str = "") -> bool:
    """A request about one machine (`tail`: its sub-resource, e.g. "/wait")."""
    return request.path == f"{MACHINES}/{machine_id}{tail}"


async def ready_session(stack: Stack, script: dict[str, Any] | None = None) -> tuple[str, str]:
    """Start a session (its test bot scripted) and wait for ready: its id and machine id."""
    answer = await stack.start({"testBot": script or {}})
    assert answer.status_code == 200, answer.text
    sid = answer.json()["sessionId"]
    session = await stack.wait_state(sid, "ready")
    return sid, session["machineId"]


def watches(fly: FlyEmulator, since: int = 0) -> int:
    return sum(1 for r in fly.requests[since:] if is_watch(r))


async def test_the_ended_callback_ends_the_session_with_no_watch_and_no_long_poll(
    tmp_path: Path,
) -> None:
    """A bot that calls `ended` and exits: its session is finished through the callback alone
    (no watch pass and no reconciler pass after start-up), by one wait for that machine's
    exit made after the callback; nothing was asked about the machine while it was live."""
    env = NO_RECONCILER | {"FOLLOW_INTERVAL_S": "600"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        fly = stack.fly
        assert fly is not None
        sid, machine_id = await ready_session(stack)
        live_since = len(fly.requests)
        ended = await stack.bot_ended(sid, reason="completed", exit_code=0)
        assert ended.status_code == 200, ended.text
        callback_at = len(fly.requests)
        assert not [r for r in fly.requests[live_since:callback_at] if about(r, machine_id)]
        # Then it leaves, as a bot does after its report.
        process = fly.machines[machine_id].process
        assert process is not None
        os.killpg(process.pid, signal.SIGTERM)
        session = await stack.wait_state(sid, "ended", "failed")
        assert (session["state"], session["endReason"], session["exitCode"]) == (
            "ended",
            "completed",
            0,
        )
        after = fly.requests[callback_at:]
        assert sum(about(r, machine_id, "/wait") for r in after) == 1
        assert watches(fly, live_since) == 0


async def test_a_silent_crash_is_noticed_by_the_first_watch_after_it(tmp_path: Path) -> None:
    """A bot killed without a word (SIGKILL, no `ended`): a watch list after the kill misses
    its machine (the first, or the second if one was already on its way), which is then asked
    itself once (its state, then its events), and the session ends crashed with exit code 137.
    No wait was ever made for it. That is the bound: one FOLLOW_INTERVAL_S (paced to a list
    every 2 s at most on Fly) plus one list call."""
    async with dispatcher_stack(tmp_path, env=NO_RECONCILER) as stack:
        fly = stack.fly
        assert fly is not None
        sid, machine_id = await ready_session(stack, {"no_ended": True})
        process = fly.machines[machine_id].process
        assert process is not None
        killed_at = len(fly.requests)
        os.killpg(process.pid, signal.SIGKILL)
        session = await stack.wait_state(sid, "ended", "failed")
        assert (session["state"], session["endReason"], session["exitCode"]) == (
            "ended",
            "crashed",
            137,
        )
        since_kill = fly.requests[killed_at:]
        first_get = next(i for i, r in enumerate(since_kill) if about(r, machine_id))
        assert since_kill[first_get].method == "GET"
        assert 1 <= sum(1 for r in since_kill[:first_get] if is_watch(r)) <= 2
        assert sum(about(r, machine_id, "/events") for r in since_kill) == 1
        assert not [r for r in fly.requests if about(r, machine_id, "/wait")]


async def test_an_oom_kill_is_read_from_the_machines_events(tmp_path: Path) -> None:
    """A machine killed by the OOM killer (no callback): the watch notices it, its exit is read
    once from its events, and the session ends oom_killed with exit code 137."""
    async with dispatcher_stack(tmp_path, env=NO_RECONCILER) as stack:
        fly = stack.fly
        assert fly is not None
        sid, machine_id = await ready_session(stack, {"no_ended": True})
        url = f"{stack.settings.fly_api_base_url}/_emulator/machines/{machine_id}/oom"
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.post(url)).status_code == 200
        session = await stack.wait_state(sid, "ended", "failed")
        assert (session["endReason"], session["exitCode"]) == ("oom_killed", 137)
        assert sum(about(r, machine_id, "/events") for r in fly.requests) == 1
        await eventually(
            lambda: fly.machines[machine_id].state == "destroyed", what="its machine destroyed"
        )


@pytest.mark.parametrize("sessions", [1, 4])
async def test_idle_sessions_cost_one_list_a_watch_whatever_their_number(
    tmp_path: Path, sessions: int
) -> None:
    """N ready sessions doing nothing: over four watch passes Fly receives the watch's four
    list calls (one page each) and nothing else, for one session as for four."""
    env = NO_RECONCILER | {"MAX_SESSIONS_PER_USER": "10"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        fly = stack.fly
        assert fly is not None
        for _ in range(sessions):
            await ready_session(stack)
        # From the first watch after every session is ready (their start's calls are over).
        mark = len(fly.requests)
        await eventually(lambda: watches(fly, mark) >= 1, what="a watch pass")
        began = next(i for i in range(mark, len(fly.requests)) if is_watch(fly.requests[i]))
        await eventually(lambda: watches(fly, began) >= 5, timeout=30, what="four more passes")
        window = fly.requests[began:]
        last = max(i for i, r in enumerate(window) if is_watch(r))
        assert [r for r in window[:last] if not is_watch(r)] == []
        assert watches(fly, began) >= 5


async def test_the_watch_reads_every_page_of_the_list(tmp_path: Path) -> None:
    """`live_ids` follows `fly-next-cursor` page by page (pages of 2 here): the dispatcher's
    machines not destroyed, never another dispatcher's."""
    fly = fly_emulator(rate_limits=False)
    async with emulators(fly=fly) as urls:
        assert urls.fly_url is not None
        settings = Settings.from_env(
            dispatcher_env(
                fly_url=urls.fly_url,
                daily_url=urls.daily_url,
                dispatcher_url="http://127.0.0.1:9",
                db=f"sqlite:///{tmp_path}/d.db",
            )
        )
        http = FlyAPI.client(urls.fly_url, FLY_TOKEN)
        try:
            api = FlyAPI(http, BOT_APP, FAST_RETRY)
            machines = FlyMachines(api, settings, FAST_RETRY, page_size=2)

            async def create(dispatcher: str) -> str:
                config = {"image": BOT_IMAGE, "metadata": {"dispatcher": dispatcher}}
                made = await api.create({"config": config, "skip_launch": True})
                return made.id

            ours = [await create(settings.dispatcher_name) for _ in range(5)]
            await create("another-dispatcher")
            await api.destroy(ours[0])
            await eventually(
                lambda: fly.machines[ours[0]].state == "destroyed", what="one of them destroyed"
            )
            began = len(fly.requests)
            assert await machines.live_ids() == set(ours[1:])
        finally:
            await http.aclose()
    pages = [r for r in fly.requests[began:] if r.path == MACHINES]
    assert len(pages) == 2
    assert all("limit=2" in r.query and "summary=true" in r.query for r in pages)
    assert "cursor=" not in pages[0].query and "cursor=" in pages[1].query


def test_deadlines_are_overdue_once_and_a_reschedule_replaces_the_earlier() -> None:
    """The timers' index: `overdue(now)` gives each key due by then once, earliest first; a
    later `schedule` of a key replaces its deadline, and `cancel` forgets it."""
    deadlines = Deadlines()
    deadlines.schedule("a", 10.0)
    deadlines.schedule("b", 5.0)
    deadlines.schedule("c", 7.0)
    deadlines.schedule("a", 20.0)
    deadlines.cancel("c")
    assert deadlines.overdue(4.0) == []
    assert deadlines.overdue(10.0) == ["b"]
    assert deadlines.overdue(10.0) == []
    assert len(deadlines) == 1
    assert deadlines.overdue(30.0) == ["a"]
    assert len(deadlines) == 0
