"""The warm pool of the local backend: bot processes started ahead of sessions, loaded, each
waiting for its assignment as a pooled Fly machine does (the test bot's pooled mode here).

Claims raced by sessions started at once (no worker serves two), an exhausted pool falling
back to cold starts, a worker dying while idle replaced, an edited bot rolling the pool over,
MAX_SESSIONS as the host's capacity in bot processes, and workers dying with their dispatcher
however it stops. No timings: every wait is for a condition.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.machines.local import LocalMachines
from dispatcher.store import AVAILABLE, CLAIMED, WARMING, PoolRows, Store
from testkit.fakes import TESTBOT_DIR
from testkit.harness import Stack, dispatcher_stack
from testkit.procs import DispatcherProcess, alive, bot_pids, pool_worker_pids
from testkit.waits import eventually
from tests.test_oncall import cli, cli_json, oncall_stack

POOL = {"POOL_SIZE": "1", "POOL_INTERVAL_S": "0.1", "RECONCILE_INTERVAL_S": "0.2"}
WAIT_S = 60.0


async def pool_rows(stack: Stack) -> list[Any]:
    store = await Store.open(stack.settings.database_url)
    try:
        return await PoolRows(store, stack.settings.dispatcher_name).all()
    finally:
        await store.close()


async def idle_workers(stack: Stack, count: int) -> list[str]:
    """Wait until `count` workers are loaded and waiting (available), and no more are idle;
    their ids."""
    ids: list[str] = []

    async def enough() -> bool:
        nonlocal ids
        rows = await pool_rows(stack)
        ids = [r.machine_id for r in rows if r.state == AVAILABLE]
        idle = [r for r in rows if r.state in (AVAILABLE, WARMING)]
        return len(ids) == count == len(idle)

    await eventually(enough, timeout=WAIT_S, what=f"{count} idle pool workers")
    return ids


async def dispatched(stack: Stack, sid: str) -> dict[str, Any]:
    """The details of the session's `dispatched` event (its machine, and whether pooled)."""
    store = await Store.open(stack.settings.database_url)
    try:
        events = await store.events(sid)
    finally:
        await store.close()
    (event,) = [e for e in events if e.kind == "state" and e.state == "dispatched"]
    return event.details


async def offer(stack: Stack, sid: str) -> httpx.Response:
    """The session's offer through the dispatcher's proxy, as the page sends it."""
    return await stack.http.post(
        f"/sessions/{sid}/api/offer",
        json={"sdp": "v=0", "type": "offer"},
        headers=stack.headers(),
    )


@pytest.mark.parametrize("transport", ["webrtc", "daily"])
async def test_a_session_gets_a_loaded_worker_and_the_pool_refills(
    tmp_path: Path, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool of 1: a session of either transport the local backend offers takes the loaded
    worker (webrtc: the port it was started with is the session's bot address); the pool
    makes another; the session ends, and its worker process exits (one session each). The log
    says where the worker runs: on this host (a local bot has no region)."""
    caplog.set_level(logging.INFO, logger="dispatcher")
    async with dispatcher_stack(tmp_path, env=POOL, local=True) as stack:
        (worker,) = await idle_workers(stack, 1)
        script = {"testBot": {"ready_on_offer": transport == "webrtc"}}
        answer = await stack.start(body=script, transport=transport)
        assert answer.status_code == 200, answer.text
        sid = answer.json()["sessionId"]
        details = await dispatched(stack, sid)
        assert (details["machine_id"], details["pooled"]) == (worker, True)
        if transport == "webrtc":
            answered = await offer(stack, sid)
            assert answered.status_code == 200, answered.text
        session = await stack.wait_state(sid, "ready", timeout=WAIT_S)
        assert session["machineId"] == worker
        pids = bot_pids(sid, worker)
        assert len(pids) == 1
        (spare,) = await idle_workers(stack, 1)
        assert spare != worker
        assert (await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())).is_success
        await stack.wait_state(sid, "ended", timeout=WAIT_S)
        await eventually(lambda: not alive(pids[0]), timeout=WAIT_S, what="the worker's exit")
        assert await idle_workers(stack, 1) == [spare]
    lines = [r.getMessage() for r in caplog.records]
    assert f"pool machine {worker} made on this host" in lines
    assert f"session dispatched to pool machine {worker} on this host" in lines


async def test_sessions_started_at_once_never_share_a_worker(tmp_path: Path) -> None:
    """A pool of 2 and five sessions started at once: two claim a worker each, never the same
    one, the other three start cold (an empty pool is a cold start, never an error); all five
    get ready on five different bot processes."""
    env = POOL | {"POOL_SIZE": "2", "POOL_INTERVAL_S": "60"}
    async with dispatcher_stack(tmp_path, env=env, local=True) as stack:
        workers = set(await idle_workers(stack, 2))
        users = [f"user-{i}" for i in range(5)]
        answers = await asyncio.gather(*(stack.start(user=user) for user in users))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        sids = [a.json()["sessionId"] for a in answers]
        sessions = [
            await stack.wait_state(sid, "ready", timeout=WAIT_S, user=user)
            for sid, user in zip(sids, users, strict=True)
        ]
        machines = [s["machineId"] for s in sessions]
        assert len(set(machines)) == 5
        assert workers <= set(machines)
        pooled = [(await dispatched(stack, sid))["pooled"] for sid in sids]
        assert sorted(pooled) == [False, False, False, True, True]
        claims = [r for r in await pool_rows(stack) if r.state == CLAIMED]
        assert sorted(r.session_id for r in claims) == sorted(
            sid for sid, p in zip(sids, pooled, strict=True) if p
        )
        metrics = (await stack.http.get("/metrics")).text
    assert "dispatcher_pool_claims_total 2.0" in metrics
    assert "dispatcher_pool_misses_total 3.0" in metrics


async def test_a_worker_that_dies_while_idle_is_replaced(tmp_path: Path) -> None:
    """A worker killed while it waits for a session is forgotten and another one started;
    the next session gets the new one."""
    async with dispatcher_stack(tmp_path, env=POOL, local=True) as stack:
        (worker,) = await idle_workers(stack, 1)
        (pid,) = bot_pids("-", worker)
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: not alive(pid), timeout=WAIT_S, what="the killed worker gone")

        async def replaced() -> bool:
            rows = await pool_rows(stack)
            return worker not in {r.machine_id for r in rows} and any(
                r.state == AVAILABLE for r in rows
            )

        await eventually(replaced, timeout=WAIT_S, what="the dead worker replaced")
        (spare,) = await idle_workers(stack, 1)
        answer = await stack.start()
        assert answer.status_code == 200, answer.text
        session = await stack.wait_state(answer.json()["sessionId"], "ready", timeout=WAIT_S)
        assert session["machineId"] == spare


async def test_an_edited_bot_rolls_the_pool_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers loaded an older version of the bot's code: once its entry point's folder
    changes, they are retired (their processes end) and workers of the new code replace them;
    a session never gets a worker of the old code."""
    bot_dir = tmp_path / "bot"
    shutil.copytree(TESTBOT_DIR, bot_dir)
    entry = bot_dir / "bot.py"
    entry.write_text("async def bot(runner_args):\n    pass\n")
    monkeypatch.setenv("BOT_ENTRYPOINT", "bot.py")
    env = POOL | {"POOL_SIZE": "2", "LOCAL_BOT_DIR": str(bot_dir)}
    async with dispatcher_stack(tmp_path, env=env, local=True) as stack:
        old = await idle_workers(stack, 2)
        old_pids = [pid for worker in old for pid in bot_pids("-", worker)]
        assert len(old_pids) == 2
        (old_image,) = {r.image for r in await pool_rows(stack)}
        entry.write_text("async def bot(runner_args):\n    return 'v2'\n")

        async def rolled() -> bool:
            rows = await pool_rows(stack)
            fresh = [r for r in rows if r.state == AVAILABLE and r.image != old_image]
            return len(fresh) == 2 and not {r.machine_id for r in rows} & set(old)

        await eventually(rolled, timeout=WAIT_S, what="the pool rolled over")
        await eventually(
            lambda: not [pid for pid in old_pids if alive(pid)],
            timeout=WAIT_S,
            what="the old workers' processes gone",
        )
        answer = await stack.start()
        assert answer.status_code == 200, answer.text
        session = await stack.wait_state(answer.json()["sessionId"], "ready", timeout=WAIT_S)
        assert session["machineId"] not in old


def test_the_pool_image_follows_the_entry_point_and_its_folder(tmp_path: Path) -> None:
    """The hash that rolls the pool over changes with BOT_ENTRYPOINT's value, with its file,
    and with a sibling module of its folder; not with anything else."""
    (tmp_path / "bot.py").write_text("one")
    (tmp_path / "helper.py").write_text("helper")
    (tmp_path / "notes.txt").write_text("notes")
    machines = LocalMachines(bot_dir=str(tmp_path), base_env={"BOT_ENTRYPOINT": "bot.py"})
    first = machines.pool_image()
    assert machines.pool_image() == first
    (tmp_path / "notes.txt").write_text("other notes")
    assert machines.pool_image() == first
    (tmp_path / "helper.py").write_text("helper 2")
    second = machines.pool_image()
    assert second != first
    (tmp_path / "bot.py").write_text("two")
    assert machines.pool_image() not in (first, second)
    other = LocalMachines(bot_dir=str(tmp_path), base_env={"BOT_ENTRYPOINT": "bot.py:main"})
    assert other.pool_image().rsplit(":", 1)[1] != machines.pool_image().rsplit(":", 1)[1]
    # Another dispatcher process never claims this one's workers.
    again = LocalMachines(bot_dir=str(tmp_path), base_env={"BOT_ENTRYPOINT": "bot.py"})
    assert again.pool_image() != machines.pool_image()


async def test_workers_count_against_max_sessions(tmp_path: Path) -> None:
    """MAX_SESSIONS is the host's capacity in bot processes: with MAX_SESSIONS=2 and a pool of
    2, each live session leaves room for one idle worker less, so that sessions and idle
    workers together never pass 2; once the sessions end the pool is full again."""
    env = POOL | {"POOL_SIZE": "2", "MAX_SESSIONS": "2", "MAX_SESSIONS_PER_USER": "2"}
    async with dispatcher_stack(tmp_path, env=env, local=True) as stack:
        await idle_workers(stack, 2)
        first = (await stack.start()).json()["sessionId"]
        await stack.wait_state(first, "ready", timeout=WAIT_S)
        await idle_workers(stack, 1)
        second = (await stack.start()).json()["sessionId"]
        await stack.wait_state(second, "ready", timeout=WAIT_S)

        async def none_idle() -> bool:
            rows = await pool_rows(stack)
            return not [r for r in rows if r.state in (AVAILABLE, WARMING)]

        await eventually(none_idle, timeout=WAIT_S, what="no idle worker at capacity")
        assert len(pool_worker_pids(stack.settings.dispatcher_url or "")) == 2
        refused = await stack.start()
        assert refused.status_code == 429, refused.text
        for sid in (first, second):
            assert (await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())).is_success
            await stack.wait_state(sid, "ended", timeout=WAIT_S)
        await idle_workers(stack, 2)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
async def test_workers_never_outlive_their_dispatcher(tmp_path: Path, how: str) -> None:
    """Idle workers and a worker serving a session end with their dispatcher, whether it is
    killed (the kernel's leash: PR_SET_PDEATHSIG) or stopped (SIGTERM, Ctrl-C's SIGINT)."""
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/d.db",
        "LOCAL_BOT_DIR": str(TESTBOT_DIR),
        "POOL_SIZE": "2",
        "POOL_INTERVAL_S": "0.1",
        "BOT_STOP_TIMEOUT_S": "60",
    }
    async with DispatcherProcess(env, tmp_path) as proc:
        await proc.start()
        async with httpx.AsyncClient(base_url=proc.url, trust_env=False, timeout=30) as http:
            sid = (await http.post("/start", json={})).json()["sessionId"]

            async def ready() -> bool:
                return bool((await http.get(f"/sessions/{sid}")).json()["state"] == "ready")

            await eventually(ready, timeout=WAIT_S, what="the session ready")
            # The session's worker, and two idle ones (the pool refilled).
            await eventually(
                lambda: len(pool_worker_pids(proc.url)) == 3, timeout=WAIT_S, what="3 workers"
            )
            pids = pool_worker_pids(proc.url)
        proc.signal(getattr(signal, how))
        await proc.wait(WAIT_S)
        await eventually(
            lambda: not [pid for pid in pids if alive(pid)],
            timeout=WAIT_S,
            what="every worker gone with the dispatcher",
        )


async def test_pool_status_names_the_local_pools_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dispatcher pool status` for a local pool: its "image" is the bot code's hash, known to
    the serving process only, so the status shows the newest worker's, and that worker as
    running the current code."""
    async with oncall_stack(tmp_path, monkeypatch, POOL, local=True) as (stack, _):
        store = await Store.open(stack.settings.database_url)
        try:
            rows = PoolRows(store, stack.settings.dispatcher_name)

            async def one_available() -> bool:
                return [r.state for r in await rows.all()] == [AVAILABLE]

            await eventually(one_available, timeout=60, what="a worker available")
            (row,) = await rows.all()
        finally:
            await store.close()
        status = await cli_json("pool", "status")
        code, text = await cli("pool", "status")
    assert code == 0 and row.image.startswith("local:")
    assert status["image"] == row.image and status["pool"][0]["image"] == row.image
    assert f"image {row.image};" in text
    assert "current" in text.splitlines()[-1]
