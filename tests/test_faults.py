"""Fault injection: the short chaos run (testkit/chaos.py; the long one is bench/faults.py), and
the failures it found, each pinned down on its own."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from pathlib import Path

import httpx
import pytest

from dispatcher.upstream import RetryPolicy
from testkit.chaos import FAULT_WEIGHTS, OOM, SIGKILL, run_chaos
from testkit.fakes.common import Fault
from testkit.harness import (
    dispatcher_process,
    dispatcher_stack,
    emulators,
    fly_emulator,
)
from testkit.waits import eventually
from tests.test_procs import headers


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_chaos_short(tmp_path: Path) -> None:
    """32 sessions, 8 at a time, under every fault kind and one SIGKILL with a restart: nothing
    lost, leaked or doubled, once the reconciler has settled."""
    report = await run_chaos(tmp_path, sessions=32, concurrency=8, seed=20261121, kills=1)
    summary = report.table() + "\n" + "\n".join(report.details)
    for kind in (*FAULT_WEIGHTS, SIGKILL, OOM):
        assert report.injected[kind] > 0, f"{kind} never fired:\n{summary}"
    for kind in ("crash before ready", "exit non-zero after ready", "ready timeout"):
        assert report.played[kind] > 0, f"no {kind} bot was played:\n{summary}"
    assert report.settled, summary
    assert report.lost == [], summary
    assert report.stuck == [], summary
    assert report.leaked_machines == [], summary
    assert report.leaked_rooms == [], summary
    assert report.duplicates == {}, summary
    assert report.client_errors == [], summary
    assert len(report.accepted) >= report.sessions // 2, summary


def sessions_in(db: Path) -> list[tuple[str, str, str | None, str | None]]:
    """(id, state, end_reason, machine_id) of every session, read straight from SQLite."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT id, state, end_reason, machine_id FROM sessions").fetchall()


async def test_ambiguous_create_of_a_bot_that_exited_at_once_is_adopted(tmp_path: Path) -> None:
    """A create that succeeded but answered 500, for a bot that crashed and was auto-destroyed
    before the lookup: the destroyed machine is adopted (the session fails with its exit code),
    never replaced by a second machine."""
    fly = fly_emulator()
    fly.faults.add("create", Fault(500, apply_first=True))
    # The lookup after the 500 comes 1.5 s later: the bot has crashed and its machine is gone.
    retry = RetryPolicy(attempts=5, initial_backoff_s=1.5, max_backoff_s=1.5, deadline_s=10)
    async with dispatcher_stack(tmp_path, fly=fly, retry=retry) as stack:
        started = await stack.start({"testBot": {"exit_before_ready": 3}})
        assert started.status_code == 200, started.text
        sid = started.json()["sessionId"]
        session = await stack.wait_state(sid, "failed")
    assert session["endReason"] in ("crashed", "exited_before_ready")
    assert session["exitCode"] == 3
    mine = [m for m in fly.machines.values() if m.metadata.get("session_id") == sid]
    assert len(mine) == 1 and mine[0].id == session["machineId"]


@pytest.mark.slow
async def test_a_start_that_fails_after_its_bot_called_ready_fails(tmp_path: Path) -> None:
    """The create succeeded but answered 500, the bot called ready during the retries, then the
    lookups kept failing: the start answers 502 and the session is failed, not left ready."""
    fly = fly_emulator(rate_limits=False)
    fly.faults.add("create", Fault(500, apply_first=True))
    fly.faults.add("list", Fault(503, times=40))
    retry = RetryPolicy(attempts=5, initial_backoff_s=0.1, max_backoff_s=0.1, deadline_s=10)
    # The follow's watch lists too: once at start-up only, so that the faults meet the lookups.
    env = {"FOLLOW_INTERVAL_S": "600"}
    async with dispatcher_stack(tmp_path, fly=fly, retry=retry, env=env) as stack:
        started = await stack.start({"testBot": {}})
        assert started.status_code == 502, started.text
    [(_, state, reason, _)] = sessions_in(tmp_path / "dispatcher.db")
    assert (state, reason) == ("failed", "machine_create_failed")


async def test_a_delete_whose_stop_took_effect_before_its_answer_was_lost(tmp_path: Path) -> None:
    """Fly performed the stop and dropped the answer; the bot exited and its machine was
    auto-destroyed, so the retried stop gets 412: the DELETE still answers 202."""
    fly = fly_emulator()
    async with dispatcher_stack(tmp_path, fly=fly) as stack:
        started = await stack.start({"testBot": {}})
        assert started.status_code == 200, started.text
        sid = started.json()["sessionId"]
        await stack.wait_state(sid, "ready")
        fly.faults.add("stop", Fault(0, apply_first=True, delay_s=1.0))
        deleted = await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
        assert deleted.status_code == 202, deleted.text
        session = await stack.wait_state(sid, "ended")
    assert session["endReason"] == "deleted"
    assert [m.state for m in fly.machines.values()] == ["destroyed"]


@pytest.mark.slow
@pytest.mark.parametrize("meanwhile", ["ready", "deleted"])
async def test_a_start_that_died_with_its_dispatcher_after_a_callback_is_failed(
    tmp_path: Path, meanwhile: str
) -> None:
    """SIGKILL while a create hangs, after the bot called ready or the client deleted the
    session (so it left `starting` with no machine recorded): after the restart the reconciler
    fails it as start_interrupted and removes its machine and room."""
    fly = fly_emulator()
    fly.faults.add("create", Fault(504, apply_first=True, delay_s=3))
    async with emulators(fly=fly) as urls:
        env = {"START_TIMEOUT_S": "2", "RECONCILE_INTERVAL_S": "0.2", "BOT_STOP_TIMEOUT_S": "1"}
        db = f"sqlite:///{tmp_path}/d.db"
        async with (
            dispatcher_process(urls, tmp_path, db=db, env=env) as proc,
            httpx.AsyncClient(base_url=proc.url, timeout=10) as http,
        ):
            await proc.start()
            body = {"createDailyRoom": True, "body": {"testBot": {"ready_delay_s": 0.3}}}
            pending = asyncio.ensure_future(http.post("/start", json=body, headers=headers()))
            await eventually(lambda: fly.machines, what="the machine created")
            [sid] = [row[0] for row in sessions_in(tmp_path / "d.db")]
            if meanwhile == "deleted":
                deleted = await http.delete(f"/sessions/{sid}", headers=headers())
                assert deleted.status_code == 202, deleted.text
            wanted = {"ready": "ready", "deleted": "ending"}[meanwhile]
            await eventually(
                lambda: sessions_in(tmp_path / "d.db")[0][1] == wanted, what=f"{sid} {wanted}"
            )
            proc.kill()
            assert await proc.wait(10) == -signal.SIGKILL
            with pytest.raises(httpx.TransportError):
                await pending
            await proc.restart()
            await eventually(
                lambda: sessions_in(tmp_path / "d.db")[0][1:3] == ("failed", "start_interrupted"),
                timeout=15,
                what=f"{sid} failed",
            )
            await eventually(
                lambda: all(m.state == "destroyed" for m in fly.machines.values()),
                timeout=15,
                what="its machine destroyed",
            )
            await eventually(lambda: not urls.daily.rooms, timeout=15, what="its room deleted")
