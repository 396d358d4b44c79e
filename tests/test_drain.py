"""Graceful drain of a dispatcher process on SIGTERM (cli.DrainingServer, SessionService.drain).

The dispatcher runs as a real child process (testkit/procs.py) against the Fly and Daily emulators
served in this process. The Fly emulator's create answers are held back by a gate until the test
releases them (the machine itself is made at once, as when Fly's answer is slow), so the starts
are in flight for as long as the test needs, with no sleeps.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from dispatcher.store import Store
from testkit.fakes.common import Latency
from testkit.fakes.fly import FlyEmulator
from testkit.harness import (
    JWT_SECRET,
    daily_emulator,
    dispatcher_process,
    emulators,
    fly_emulator,
)
from testkit.waits import eventually

STARTS = 50
DRAIN_TIMEOUT_S = 20.0
# After the drain uvicorn closes its listeners, gives open connections up to
# timeout_graceful_shutdown (5 s, cli.py) and runs the lifespan's shutdown. Not a timed
# assertion: how long a test waits for the process to exit on its own, on a loaded machine.
SHUTDOWN_ALLOWANCE_S = 60.0


class HeldCreates(Latency):
    """Emulator latency that holds every Fly create answer until `release()` (also on leaving
    the context: the emulator's server waits for its open requests when it stops)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = 0
        self._released = asyncio.Event()

    def release(self) -> None:
        self._released.set()

    async def __aenter__(self) -> HeldCreates:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    async def sleep(self, op: str) -> None:
        if op != "create":
            await super().sleep(op)
            return
        self.held += 1
        try:
            await self._released.wait()
        finally:
            self.held -= 1


def headers(user: str) -> dict[str, str]:
    token = jwt.encode({"sub": user, "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


def creates(fly: FlyEmulator) -> int:
    """How many create requests the Fly emulator received."""
    return sum(1 for r in fly.requests if r.method == "POST" and r.path.endswith("/machines"))


def machines_of(fly: FlyEmulator, session_id: str) -> list[Any]:
    return [m for m in fly.machines.values() if m.metadata.get("session_id") == session_id]


def bot_running(machine: Any) -> bool:
    """Whether the machine's bot process is alive."""
    proc = machine.process
    return machine.state == "started" and proc is not None and proc.returncode is None


def drain_env(**extra: str) -> dict[str, str]:
    return {
        "FLY_CREATE_RATE": "1000",
        "FLY_CREATE_BURST": "1000",
        "MAX_SESSIONS": "200",
        "MAX_SESSIONS_PER_USER": "200",
        "READY_TIMEOUT_S": "120",
        "DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        **extra,
    }


async def healthz(http: httpx.AsyncClient) -> dict[str, Any]:
    answer = await http.get("/healthz")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


async def wait_draining(http: httpx.AsyncClient) -> None:
    async def draining() -> bool:
        return bool((await healthz(http))["draining"])

    await eventually(draining, timeout=10, what="the dispatcher draining")


@pytest.mark.slow
async def test_sigterm_during_50_starts(tmp_path: Path) -> None:
    """SIGTERM during 50 starts in flight: while it drains /readyz and new starts answer 503
    `draining`; all 50 starts finish with 200; the process exits (-15) within the drain time;
    every session is dispatched or ready with exactly one machine, and the bots outlive the
    dispatcher and its restart. Then all 50 are deleted on the restarted dispatcher."""
    gate = HeldCreates()
    fly = fly_emulator(limits={"create": (1000.0, 1000)})
    fly.latency = gate
    db = f"sqlite:///{tmp_path}/dispatcher.db"
    users = [f"drain-user-{i}" for i in range(STARTS)]
    async with (
        emulators(fly=fly, daily=daily_emulator(rate_limits=False)) as urls,
        gate,
        dispatcher_process(urls, tmp_path, db=db, env=drain_env()) as proc,
        httpx.AsyncClient(base_url=proc.url, timeout=60, trust_env=False) as http,
    ):
        await proc.start()
        assert (await healthz(http))["draining"] is False
        assert (await http.get("/readyz")).status_code == 200

        store = await Store.open(db)
        starts = [
            asyncio.create_task(
                http.post("/start", json={"createDailyRoom": True}, headers=headers(user))
            )
            for user in users
        ]
        try:
            await eventually(
                lambda: gate.held == STARTS, timeout=30, what=f"{STARTS} creates in flight"
            )
            # Each start reserved its session; none has its machine yet (a bot that booted
            # meanwhile may have called ready already).
            reserved = await store.list_sessions(limit=1000)
            assert len(reserved) == STARTS
            assert all(s.state in ("starting", "ready") for s in reserved), reserved
            assert all(s.machine_id is None for s in reserved), reserved

            proc.terminate()
            await wait_draining(http)

            ready = await http.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["code"] == "draining"
            refused = await http.post(
                "/start", json={"createDailyRoom": True}, headers=headers("late-user")
            )
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "draining"
            assert int(refused.headers["retry-after"]) >= 1
            # The drain waits for the starts in flight: none could answer yet.
            assert proc.running
            assert not any(task.done() for task in starts)

            gate.release()
            answers = await asyncio.gather(*starts)
            for answer in answers:
                assert answer.status_code == 200, answer.text
            session_ids = {answer.json()["sessionId"] for answer in answers}
            assert len(session_ids) == STARTS

            returncode = await proc.wait(DRAIN_TIMEOUT_S + SHUTDOWN_ALLOWANCE_S)
            assert returncode == -signal.SIGTERM
            assert "drain time is up" not in proc.log_text()

            # No 51st session or machine for the refused start.
            assert creates(fly) == STARTS
            sessions = {s.id: s for s in await store.list_sessions(limit=1000)}
            assert set(sessions) == session_ids
            pids = {}
            for sid, session in sessions.items():
                assert session.state in ("dispatched", "ready"), session
                made = machines_of(fly, sid)
                assert len(made) == 1, made
                assert made[0].id == session.machine_id
                assert bot_running(made[0]), made[0]
                pids[sid] = made[0].process.pid
            assert len(fly.machines) == STARTS

            # A restart never touches running bots.
            await proc.restart()
            assert (await healthz(http))["draining"] is False
            for sid in session_ids:
                (machine,) = machines_of(fly, sid)
                assert bot_running(machine) and machine.process.pid == pids[sid]

            owner = {sid: s.user_id for sid, s in sessions.items()}
            deleted = await asyncio.gather(
                *(
                    http.delete(f"/sessions/{sid}", headers=headers(owner[sid]))
                    for sid in session_ids
                )
            )
            for answer in deleted:
                assert answer.status_code == 202, answer.text

            async def all_ended() -> bool:
                states = {s.state for s in await store.list_sessions(limit=1000)}
                assert "failed" not in states, states
                return states == {"ended"}

            await eventually(all_ended, timeout=60, what="every session ended")
            await eventually(
                lambda: all(m.state == "destroyed" for m in fly.machines.values()),
                timeout=30,
                what="every machine destroyed",
            )
            proc.terminate()
            assert await proc.wait(DRAIN_TIMEOUT_S + SHUTDOWN_ALLOWANCE_S) == -signal.SIGTERM
        finally:
            await store.close()
            for task in starts:
                task.cancel()
            await asyncio.gather(*starts, return_exceptions=True)
    log = proc.log_text()
    assert f"draining: {STARTS} starts in flight" in log, proc.log_tail()
    assert "drain time is up" not in log


async def test_sigterm_with_nothing_in_flight_exits_promptly(tmp_path: Path) -> None:
    """With no start in flight the drain is over at once: the process exits (-15) long before
    a long DRAIN_TIMEOUT_S."""
    async with emulators(fly=fly_emulator()) as urls:
        env = drain_env(DRAIN_TIMEOUT_S="600")
        db = f"sqlite:///{tmp_path}/d.db"
        async with dispatcher_process(urls, tmp_path, db=db, env=env) as proc:
            await proc.start()
            proc.terminate()
            assert await proc.wait(30) == -signal.SIGTERM
    log = proc.log_text()
    assert "draining: 0 starts in flight" in log
    assert "dispatcher stopped" in log


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["second-sigterm", "drain-timeout"])
async def test_a_drain_cut_short(tmp_path: Path, cut: str) -> None:
    """A start that never finishes does not hold the process: a second SIGTERM during a long
    drain stops it without waiting for the start (`second-sigterm`), and a drain whose time is
    up stops it within DRAIN_TIMEOUT_S (`drain-timeout`). After a restart the reconciler fails
    the interrupted start and destroys the machine that was made for it."""
    drain_s = 600.0 if cut == "second-sigterm" else 3.0
    gate = HeldCreates()
    # Lists unthrottled: the restarted dispatcher's reconciler lists machines every 0.3 s.
    fly = fly_emulator(limits={"list": (1000.0, 1000)})
    fly.latency = gate
    db = f"sqlite:///{tmp_path}/d.db"
    async with emulators(fly=fly) as urls, gate:
        env = drain_env(DRAIN_TIMEOUT_S=str(drain_s))
        async with (
            dispatcher_process(urls, tmp_path, db=db, env=env) as proc,
            httpx.AsyncClient(base_url=proc.url, timeout=60, trust_env=False) as http,
        ):
            await proc.start()
            store = await Store.open(db)
            start = asyncio.create_task(
                http.post("/start", json={"createDailyRoom": True}, headers=headers("user-1"))
            )
            try:
                await eventually(lambda: gate.held == 1, what="a create in flight")
                proc.terminate()
                await wait_draining(http)
                if cut == "second-sigterm":
                    # Bot callbacks are still taken while draining: the bot, booted before its
                    # create answered, calls ready.
                    async def bot_ready() -> bool:
                        sessions = await store.list_sessions()
                        return len(sessions) == 1 and sessions[0].state == "ready"

                    await eventually(bot_ready, timeout=20, what="the bot's ready callback")
                    assert proc.running and not start.done()
                    proc.terminate()
                    assert await proc.wait(30) == -signal.SIGTERM
                else:
                    assert await proc.wait(drain_s + SHUTDOWN_ALLOWANCE_S) == -signal.SIGTERM
                    assert "drain time is up with starts in flight" in proc.log_text()
                try:
                    answer = await start
                except httpx.TransportError:
                    pass
                else:
                    assert answer.status_code != 200, answer.text
                gate.release()

                (session,) = await store.list_sessions()
                assert session.active and session.machine_id is None, session
                (machine,) = machines_of(fly, session.id)

                # START_TIMEOUT_S=1: the restarted dispatcher's reconciler sees a start that
                # never finished, fails it and destroys its machine.
                proc.env |= {"START_TIMEOUT_S": "1", "RECONCILE_INTERVAL_S": "0.3"}
                await proc.restart()

                async def failed() -> bool:
                    current = await store.get(session.id)
                    assert current is not None
                    return current.state == "failed"

                await eventually(failed, timeout=30, what="the interrupted start failed")
                current = await store.get(session.id)
                assert current is not None and current.end_reason == "start_interrupted"
                await eventually(
                    lambda: machine.state == "destroyed", timeout=20, what="its machine destroyed"
                )
                proc.terminate()
                assert await proc.wait(30) == -signal.SIGTERM
            finally:
                await store.close()
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
