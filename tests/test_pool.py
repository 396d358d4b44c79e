"""The warm pool against the emulators, with the test bot's pooled mode: claims, misses that
fall back to a cold create, replenishment (after an image change too), a pooled machine that
fails to start, claims raced by two instances, and the assignment endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from dispatcher.auth import new_callback_token
from dispatcher.config import Settings
from dispatcher.machines import MachineInfo, MachineRef
from dispatcher.metrics import Metrics
from dispatcher.pool import Pool
from dispatcher.pool.repairs import WARM_TIMEOUT_S
from dispatcher.store import AVAILABLE, CLAIMED, RETIRED, WARMING, PoolRows, Store
from testkit.fakes import TESTBOT_DIR
from testkit.fakes.common import Fault
from testkit.fakes.fly import FlyEmulator
from testkit.harness import (
    BOT_IMAGE,
    Stack,
    dispatcher_stack,
    emulators,
    fly_emulator,
    run_dispatcher,
)
from testkit.waits import eventually
from tests.test_oncall import cli, cli_json, oncall_stack

OTHER_IMAGE = "registry.fly.io/pipecat-bots:test-2"
POOL_ENV = {"POOL_SIZE": "2", "POOL_INTERVAL_S": "0.1", "FLY_REGION": "iad"}


def pool_machines(fly: FlyEmulator, *, live: bool = True) -> list[Any]:
    """The emulator's pool machines (labelled `pool`), destroyed ones left out when `live`."""
    return [
        m
        for m in fly.machines.values()
        if (m.config.get("metadata") or {}).get("pool") == "true"
        and not (live and m.state in ("destroying", "destroyed"))
    ]


async def pool_rows(stack: Stack) -> list[Any]:
    store = await Store.open(stack.settings.database_url)
    try:
        return await PoolRows(store, stack.settings.dispatcher_name).all()
    finally:
        await store.close()


async def available(stack: Stack, count: int, image: str = BOT_IMAGE) -> list[str]:
    """Wait until `count` machines of `image` are available; their ids."""
    ids: list[str] = []

    async def enough() -> bool:
        nonlocal ids
        rows = await pool_rows(stack)
        ids = [r.machine_id for r in rows if r.state == AVAILABLE and r.image == image]
        return len(ids) >= count

    await eventually(enough, timeout=20, what=f"{count} available pool machines")
    return ids


async def machine_of(stack: Stack, sid: str) -> str:
    return str((await stack.session(sid))["machineId"])


async def test_a_start_claims_a_pool_machine_and_the_pool_refills(tmp_path: Path) -> None:
    """A pool of 2 in iad: a start takes the oldest, its bot fetches its assignment (the test
    bot calls back with the token in it: ready), the pool makes one more; the session ends and
    its machine is destroyed like a cold one."""
    async with dispatcher_stack(tmp_path, env=POOL_ENV) as stack:
        assert stack.fly is not None
        ready_ids = await available(stack, 2)
        answer = await stack.start()
        assert answer.status_code == 200, answer.text
        sid = answer.json()["sessionId"]
        session = await stack.wait_state(sid, "ready")
        assert session["machineId"] == ready_ids[0]
        assert session["region"] == "iad"
        # No cold create for it: the pool's own creates only, with skip_launch.
        creates = [
            r for r in stack.fly.requests if r.method == "POST" and r.path.endswith("/machines")
        ]
        assert all(r.body.get("skip_launch") is True for r in creates)
        assert all("SESSION_ID" not in r.body["config"]["env"] for r in creates)
        refilled = await available(stack, 2)
        assert ready_ids[0] not in refilled
        assert (await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())).is_success
        await stack.wait_state(sid, "ended")
        await eventually(
            lambda: stack.fly is not None and stack.fly.machines[ready_ids[0]].state == "destroyed",
            what="the session's machine destroyed",
        )
        metrics = (await stack.http.get("/metrics")).text
    assert "dispatcher_pool_claims_total 1.0" in metrics
    assert 'dispatcher_pool_machines{region="iad",state="available"} 2.0' in metrics


async def test_an_empty_pool_falls_back_to_a_cold_create(tmp_path: Path) -> None:
    """A pool of 1: of two starts at once, one gets the pool machine and one a cold create
    (named after its session); both bots get ready."""
    env = POOL_ENV | {"POOL_SIZE": "1", "POOL_INTERVAL_S": "60"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        assert stack.fly is not None
        (pooled,) = await available(stack, 1)
        answers = await asyncio.gather(stack.start(), stack.start())
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        sids = [a.json()["sessionId"] for a in answers]
        sessions = [await stack.wait_state(sid, "ready") for sid in sids]
        machines = {s["machineId"] for s in sessions}
        assert pooled in machines and len(machines) == 2
        (cold,) = machines - {pooled}
        assert stack.fly.machines[cold].name in sids
        metrics = (await stack.http.get("/metrics")).text
    assert "dispatcher_pool_claims_total 1.0" in metrics
    assert "dispatcher_pool_misses_total 1.0" in metrics


@pytest.mark.slow
async def test_a_pool_machine_that_fails_to_start_is_replaced(tmp_path: Path) -> None:
    """Fly answers the first start 500: that machine is destroyed and the next one started.
    When every start fails, the session still gets a cold machine."""
    env = POOL_ENV | {"POOL_INTERVAL_S": "60"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        fly = stack.fly
        assert fly is not None
        first, second = await available(stack, 2)
        fly.faults.add("start", Fault(500))
        answer = await stack.start()
        assert answer.status_code == 200, answer.text
        sid = answer.json()["sessionId"]
        assert (await stack.wait_state(sid, "ready"))["machineId"] == second
        await eventually(lambda: fly.machines[first].state == "destroyed", what="bad one gone")
        assert [r.machine_id for r in await pool_rows(stack)] == [second]

    (tmp_path / "all-fail").mkdir()
    async with dispatcher_stack(tmp_path / "all-fail", env=env) as stack:
        fly = stack.fly
        assert fly is not None
        ids = await available(stack, 2)
        fly.faults.add("start", Fault(500, times=2))
        answer = await stack.start()
        assert answer.status_code == 200, answer.text
        sid = answer.json()["sessionId"]
        machine = (await stack.wait_state(sid, "ready"))["machineId"]
        assert machine not in ids and fly.machines[machine].name == sid
        metrics = (await stack.http.get("/metrics")).text
    assert "dispatcher_pool_start_failures_total 2.0" in metrics


@pytest.mark.slow
async def test_a_new_image_replaces_the_pool(tmp_path: Path) -> None:
    """The dispatcher restarted with another BOT_IMAGE: the old image's pool machines are
    destroyed and new ones made; a start gets one of the new image."""
    fly = fly_emulator(images={BOT_IMAGE: TESTBOT_DIR, OTHER_IMAGE: TESTBOT_DIR})
    async with emulators(fly=fly) as urls:
        async with run_dispatcher(tmp_path, urls, env=POOL_ENV) as stack:
            old = set(await available(stack, 2))
        env = POOL_ENV | {"BOT_IMAGE": OTHER_IMAGE}
        async with run_dispatcher(tmp_path, urls, env=env) as stack:
            new = set(await available(stack, 2, image=OTHER_IMAGE))
            await eventually(
                lambda: all(fly.machines[m].state == "destroyed" for m in old),
                what="the old image's machines destroyed",
            )
            answer = await stack.start()
            sid = answer.json()["sessionId"]
            session = await stack.wait_state(sid, "ready")
    assert not old & new
    assert session["machineId"] in new
    assert fly.machines[session["machineId"]].config["image"] == OTHER_IMAGE


@pytest.mark.slow
async def test_two_instances_never_claim_one_machine(tmp_path: Path, pg_database_url: str) -> None:
    """Two dispatchers on one PostgreSQL database and one pool of 2: 6 starts split over
    both, at once; exactly 2 pooled on distinct machines, 4 cold, every bot ready on a machine
    of its own."""
    env = POOL_ENV | {
        "DATABASE_URL": pg_database_url,
        "POOL_INTERVAL_S": "60",
        "MAX_SESSIONS_PER_USER": "10",
    }
    async with emulators(fly=fly_emulator()) as urls, contextlib.AsyncExitStack() as stack:
        one = await stack.enter_async_context(run_dispatcher(tmp_path, urls, env=env))
        two = await stack.enter_async_context(run_dispatcher(tmp_path, urls, env=env))
        pooled = set(await available(one, 2))
        answers = await asyncio.gather(*(s.start() for s in (one, two) * 3))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        sids = [a.json()["sessionId"] for a in answers]
        sessions = [await one.wait_state(sid, "ready") for sid in sids]
    machines = [s["machineId"] for s in sessions]
    assert len(set(machines)) == 6
    assert set(machines) & pooled == pooled


async def test_claims_race_on_the_store(store: Store) -> None:
    """20 concurrent claims of 3 machines: 3 distinct winners, 17 misses (SQLite and
    PostgreSQL: SKIP LOCKED)."""
    rows = PoolRows(store, "d")
    for i in range(3):
        await rows.add(
            f"m{i}", region="iad", image="img", state=AVAILABLE, token_hash="h", version=None
        )
    results = await asyncio.gather(
        *(rows.claim(region="iad", image="img", session_id=f"s{i}", body="{}") for i in range(20))
    )
    won = [r for r in results if r is not None]
    assert sorted(r.machine_id for r in won) == ["m0", "m1", "m2"]
    assert len({r.session_id for r in won}) == 3
    assert all(r.state == CLAIMED for r in won)
    assert await rows.claim(region="iad", image="img", session_id="late", body="{}") is None
    assert await rows.claim(region="ord", image="img", session_id="x", body="{}") is None


async def test_the_assignment_endpoint_refuses_strangers(tmp_path: Path) -> None:
    """Only a pool machine's own token gets an answer: 401 otherwise; an unclaimed machine
    gets 204 after `wait`; a bad `wait` 400; a retired machine 410."""
    env = POOL_ENV | {"POOL_INTERVAL_S": "60", "POOL_SIZE": "1"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        (machine,) = await available(stack, 1)
        path = f"/internal/machines/{machine}/assignment"
        store = await Store.open(stack.settings.database_url)
        try:
            rows = PoolRows(store, stack.settings.dispatcher_name)
            token, token_hash = new_callback_token()
            await rows.add(
                "m-test",
                region="iad",
                image=BOT_IMAGE,
                state=AVAILABLE,
                token_hash=token_hash,
                version=None,
            )
            mine = "/internal/machines/m-test/assignment"
            bearer = {"Authorization": f"Bearer {token}"}
            assert (await stack.http.get(path, headers=bearer)).status_code == 401
            assert (await stack.http.get(path)).status_code == 401
            # A machine the pool does not know yet (its bot asked before its create answered).
            nope = await stack.http.get("/internal/machines/nope/assignment", headers=bearer)
            assert nope.status_code == 204
            assert (await stack.http.get(mine + "?wait=0", headers=bearer)).status_code == 204
            bad = await stack.http.get(mine + "?wait=99", headers=bearer)
            assert bad.status_code == 400 and bad.json()["code"] == "invalid-wait"
            await rows.move("m-test", RETIRED, from_states=(AVAILABLE,))
            gone = await stack.http.get(mine + "?wait=0", headers=bearer)
            assert gone.status_code == 410 and gone.json()["code"] == "pool-machine-retired"
        finally:
            await store.close()


async def test_suspended_pool_machines_are_loaded_before_a_claim(tmp_path: Path) -> None:
    """POOL_MODE=suspended: a pool machine boots, its bot asks for an assignment (it has
    loaded everything), the pool suspends it (its process frozen, not restarted); a claim
    resumes it and the same process picks the session up and gets ready."""
    env = POOL_ENV | {"POOL_MODE": "suspended", "POOL_SIZE": "1", "POOL_INTERVAL_S": "60"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        fly = stack.fly
        assert fly is not None
        (machine,) = await available(stack, 1)
        record = fly.machines[machine]
        assert record.state == "suspended"
        pid = record.process.pid if record.process else None
        assert pid is not None
        creates = [r for r in fly.requests if r.method == "POST" and r.path.endswith("/machines")]
        assert [r.body.get("skip_launch") for r in creates] == [False]
        answer = await stack.start()
        assert answer.status_code == 200, answer.text
        sid = answer.json()["sessionId"]
        session = await stack.wait_state(sid, "ready")
        assert session["machineId"] == machine
        assert record.process is not None and record.process.pid == pid


async def test_running_pool_machines_wait_booted_and_a_claim_starts_nothing(
    tmp_path: Path,
) -> None:
    """POOL_MODE=running: a pool machine boots and stays started; its bot's first ask offers
    it (never suspended); a claim answers the ask it keeps making, with no start or resume
    call to Fly, and the same process serves the session. A running machine that stops while
    idle is retired and replaced."""
    env = POOL_ENV | {"POOL_MODE": "running", "POOL_SIZE": "1", "RECONCILE_INTERVAL_S": "0.2"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        fly = stack.fly
        assert fly is not None
        (machine,) = await available(stack, 1)
        record = fly.machines[machine]
        assert record.state == "started"
        assert record.process is not None
        pid = record.process.pid
        creates = [r for r in fly.requests if r.method == "POST" and r.path.endswith("/machines")]
        assert [r.body.get("skip_launch") for r in creates] == [False]
        answer = await stack.start()
        assert answer.status_code == 200, answer.text
        sid = answer.json()["sessionId"]
        session = await stack.wait_state(sid, "ready")
        assert session["machineId"] == machine
        assert record.process is not None and record.process.pid == pid
        calls = [r.path for r in fly.requests if r.method == "POST"]
        assert not [p for p in calls if p.endswith(("/start", "/suspend"))], calls
        assert not [r for r in fly.requests if "/suspend" in r.path]
        # The pool refills with another running machine; one that stops while idle is replaced.
        (spare,) = await available(stack, 1)
        assert spare != machine
        spare_process = fly.machines[spare].process
        assert spare_process is not None
        os.killpg(spare_process.pid, signal.SIGKILL)

        async def replaced() -> bool:
            rows = await pool_rows(stack)
            idle = [r.machine_id for r in rows if r.state in (AVAILABLE, WARMING)]
            return spare not in idle and len(idle) == 1

        await eventually(replaced, timeout=30, what="the stopped machine replaced")


async def test_pool_status_for_on_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dispatcher pool status`: the machines by region and state (with Fly's own state), the
    starts served from the pool and cold, and this instance's error counters; as text too."""
    env = POOL_ENV | {"POOL_INTERVAL_S": "60", "POOL_SIZE": "2"}
    async with oncall_stack(tmp_path, monkeypatch, env) as (stack, _):
        assert stack.fly is not None
        first, second = await available(stack, 2)
        stack.fly.faults.add("start", Fault(500))
        answer = await stack.start()
        sid = answer.json()["sessionId"]
        await stack.wait_state(sid, "ready")
        status = await cli_json("pool", "status")
        code, text = await cli("pool", "status")
    assert status["size"] == 2 and status["mode"] == "stopped" and status["image"] == BOT_IMAGE
    assert status["machines"] == {"iad/claimed": 1}
    assert (status["claims"], status["misses"]) == (1, 0)
    assert status["recycle"] is False
    assert status["thisInstance"] == {
        "startFailures": 1.0,
        "replenishErrors": 0.0,
        "recycled": 0.0,
        "recycleFailures": 0.0,
    }
    (row,) = status["pool"]
    assert (row["machineId"], row["sessionId"], row["flyState"]) == (second, sid, "started")
    assert code == 0
    assert "within 1h: 1 starts from the pool, 0 cold" in text
    assert "1 pool machines failed to start" in text and "recycled" not in text
    assert second in text and first not in text


async def test_pool_tokens_stay_in_their_machines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool machine's POOL_TOKEN is in its create request's env and nowhere else: not in a
    log record, not in the database (which keeps its SHA-256), not in an answer."""
    caplog.set_level(logging.DEBUG)
    env = POOL_ENV | {"POOL_INTERVAL_S": "60", "POOL_SIZE": "1"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        fly = stack.fly
        assert fly is not None
        (machine,) = await available(stack, 1)
        answer = await stack.start()
        sid = answer.json()["sessionId"]
        await stack.wait_state(sid, "ready")
        assert (await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())).is_success
        await stack.wait_state(sid, "ended")
        token = fly.machines[machine].config["env"]["POOL_TOKEN"]
        requests = json.dumps([r._asdict() for r in fly.requests], default=str)
    assert len(token) >= 32
    assert requests.count(token) == 1
    logs = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert token not in logs
    assert token not in answer.text
    files = sorted(tmp_path.glob("dispatcher.db*"))  # noqa: ASYNC240 (the app is closed)
    database = b"".join(p.read_bytes() for p in files)
    assert database and token.encode() not in database


class Destroys:
    """The machine backend as far as `Pool.validate` uses it: destroys, recorded."""

    def __init__(self) -> None:
        self.destroyed: list[str] = []

    async def destroy(self, ref: MachineRef) -> None:
        self.destroyed.append(ref.id)


async def test_the_reconcilers_pool_repairs(store: Store) -> None:
    """Each repair of `Pool.validate`, on SQLite and PostgreSQL: a warming machine found
    suspended is offered; one that never got warm is retired; a row whose machine is gone is
    dropped; a machine claimed by a start that died is destroyed; a pool machine without a row
    is destroyed once old enough (not while young); sound rows are left alone."""
    settings = Settings.from_env({"START_TIMEOUT_S": "120"})
    rows = PoolRows(store, settings.dispatcher_name)
    machines = Destroys()
    pool = Pool(rows, machines, settings, None, Metrics(), dispatcher_url="http://d")  # type: ignore[arg-type]
    for machine_id, state in [
        ("suspended-warm", WARMING),
        ("cold-warm", WARMING),
        ("gone", AVAILABLE),
        ("dead-claim", AVAILABLE),
        ("live-claim", AVAILABLE),
        ("fine", AVAILABLE),
    ]:
        await rows.add(
            machine_id, region="iad", image="img", state=state, token_hash="h", version=None
        )
    await rows.claim(region="iad", image="img", session_id="s-dead", body="{}")  # oldest: gone
    for machine_id, sid in (("dead-claim", "s-dead"), ("live-claim", "s-live")):
        await rows.move(machine_id, CLAIMED, from_states=(AVAILABLE,), session_id=sid)
    later = time.time() + WARM_TIMEOUT_S + 1

    def info(machine_id: str, state: str = "stopped", *, age: float = 3600.0) -> MachineInfo:
        return MachineInfo(machine_id, None, state, True, "iad", None, later - age, pool=True)

    inventory = [
        info("suspended-warm", "suspended"),
        info("cold-warm", "started"),
        info("dead-claim", "started"),
        info("live-claim", "started"),
        info("fine"),
        info("orphan"),
        info("young-orphan", age=10),
    ]
    repairs = await pool.validate(inventory, {"s-live"}, later)
    left = {r.machine_id: r.state for r in await rows.all()}
    assert left == {"suspended-warm": AVAILABLE, "live-claim": CLAIMED, "fine": AVAILABLE}
    assert sorted(machines.destroyed) == ["cold-warm", "dead-claim", "orphan"]
    assert repairs == 5
