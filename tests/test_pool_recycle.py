"""POOL_RECYCLE: a pool machine whose session ended goes back to the pool (stopped, a new
POOL_TOKEN through Fly's update) rather than being destroyed; the previous session's bot,
which saw the old token, is refused the next assignment; a machine that cannot be recycled is
destroyed; the session's end never waits for any of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dispatcher.config import Settings
from dispatcher.env import ConfigError
from dispatcher.machines import MachineExit, MachineRef
from dispatcher.metrics import Metrics
from dispatcher.pool import Pool
from dispatcher.store import AVAILABLE, CLAIMED, RECYCLING, PoolRows, Store
from testkit.fakes.common import Fault
from testkit.fakes.fly import FlyEmulator
from testkit.harness import Stack, dispatcher_stack, fly_emulator
from testkit.waits import eventually
from tests.test_oncall import cli, cli_json, oncall_stack
from tests.test_pool import POOL_ENV, available, pool_rows

RECYCLE_ENV = POOL_ENV | {"POOL_SIZE": "1", "POOL_INTERVAL_S": "60", "POOL_RECYCLE": "true"}


def updates(fly: FlyEmulator, machine: str) -> list[Any]:
    """Fly update calls (`POST /machines/{id}`) of a machine."""
    return [r for r in fly.requests if r.method == "POST" and r.path.endswith(f"/{machine}")]


async def end(stack: Stack, sid: str) -> None:
    """DELETE the session and wait until it has ended."""
    assert (await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())).is_success
    await stack.wait_state(sid, "ended")


async def assignment(stack: Stack, machine: str, token: str) -> int:
    """The status of an assignment request with `token`, not held."""
    answer = await stack.http.get(
        f"/internal/machines/{machine}/assignment?wait=0",
        headers={"Authorization": f"Bearer {token}"},
    )
    return answer.status_code


@pytest.mark.parametrize("light", [False, True], ids=["process", "light"])
async def test_a_recycled_machine_serves_the_next_session_and_the_old_token_is_refused(
    tmp_path: Path, light: bool
) -> None:
    """A pool of 1 with POOL_RECYCLE: the first session's machine is not destroyed when the
    session ends: once stopped it is updated (a new POOL_TOKEN, `skip_launch`), available
    again, and the second session boots on it afresh. The first session's POOL_TOKEN, all its
    bot ever saw, gets 401 from then on, before and after the second claim. The same with
    light machines (their assignment poll, as bench/start_rate.py uses them)."""
    fly = fly_emulator(light_machines=light)
    async with dispatcher_stack(tmp_path, env=RECYCLE_ENV, fly=fly) as stack:
        fly = stack.fly
        assert fly is not None
        (machine,) = await available(stack, 1)
        record = fly.machines[machine]
        assert record.config["auto_destroy"] is False
        old_token = record.config["env"]["POOL_TOKEN"]
        first = (await stack.start()).json()["sessionId"]
        assert (await stack.wait_state(first, "ready"))["machineId"] == machine
        await end(stack, first)
        assert await available(stack, 1) == [machine]
        assert record.state == "stopped"
        (update,) = updates(fly, machine)
        assert update.body["skip_launch"] is True
        new_token = record.config["env"]["POOL_TOKEN"]
        assert new_token != old_token and len(new_token) >= 32
        assert await assignment(stack, machine, old_token) == 401
        assert await assignment(stack, machine, new_token) == 204
        second = (await stack.start()).json()["sessionId"]
        assert (await stack.wait_state(second, "ready"))["machineId"] == machine
        assert await assignment(stack, machine, old_token) == 401
        (row,) = await pool_rows(stack)
        assert (row.state, row.session_id) == (CLAIMED, second)
        db = await Store.open(stack.settings.database_url)
        try:
            kinds = [e.kind for e in await db.events(first)]
        finally:
            await db.close()
        assert "machine_recycled" in kinds
        metrics = (await stack.http.get("/metrics")).text
    assert "dispatcher_pool_recycled_total 1.0" in metrics
    assert "dispatcher_pool_recycle_failures_total 0.0" in metrics
    # Never a second machine: the one pool machine served both sessions.
    assert len(fly.machines) == 1


async def test_pool_status_counts_recycled_machines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dispatcher pool status` with POOL_RECYCLE: says the pool recycles, and how many machines
    this instance recycled and could not, as JSON and as text."""
    async with oncall_stack(tmp_path, monkeypatch, RECYCLE_ENV) as (stack, _):
        (machine,) = await available(stack, 1)
        sid = (await stack.start()).json()["sessionId"]
        await stack.wait_state(sid, "ready")
        await end(stack, sid)
        assert await available(stack, 1) == [machine]
        status = await cli_json("pool", "status")
        code, text = await cli("pool", "status")
    assert status["recycle"] is True
    assert status["machines"] == {"iad/available": 1}
    assert status["thisInstance"]["recycled"] == 1.0
    assert status["thisInstance"]["recycleFailures"] == 0.0
    assert code == 0
    assert "(stopped, recycling)" in text
    assert "1 recycled, 0 could not be (destroyed)" in text


async def test_a_machine_that_cannot_be_recycled_is_destroyed(tmp_path: Path) -> None:
    """Fly refuses the update: the machine is destroyed and its row dropped; the pool makes
    another on its next pass; the session had ended all the same."""
    async with dispatcher_stack(tmp_path, env=RECYCLE_ENV | {"POOL_INTERVAL_S": "0.2"}) as stack:
        fly = stack.fly
        assert fly is not None
        (machine,) = await available(stack, 1)
        fly.faults.add("update", Fault(500, times=10))
        sid = (await stack.start()).json()["sessionId"]
        await stack.wait_state(sid, "ready")
        await end(stack, sid)
        await eventually(
            lambda: fly.machines[machine].state == "destroyed", what="the machine destroyed"
        )
        (spare,) = await available(stack, 1)
        assert spare != machine
        metrics = (await stack.http.get("/metrics")).text
    assert "dispatcher_pool_recycle_failures_total 1.0" in metrics
    assert "dispatcher_pool_recycled_total 0.0" in metrics


async def test_without_pool_recycle_the_machine_is_destroyed_as_before(tmp_path: Path) -> None:
    """POOL_RECYCLE unset: pool machines are made with auto_destroy, never updated, and the
    machine of an ended session is destroyed."""
    env = RECYCLE_ENV | {"POOL_RECYCLE": "false"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        fly = stack.fly
        assert fly is not None
        (machine,) = await available(stack, 1)
        assert fly.machines[machine].config["auto_destroy"] is True
        sid = (await stack.start()).json()["sessionId"]
        await stack.wait_state(sid, "ready")
        await end(stack, sid)
        await eventually(
            lambda: fly.machines[machine].state == "destroyed", what="the machine destroyed"
        )
        assert not updates(fly, machine)


def test_pool_recycle_is_fly_only() -> None:
    with pytest.raises(ConfigError, match="POOL_RECYCLE needs the fly machine backend"):
        Settings.from_env({"POOL_RECYCLE": "true"})
    assert Settings.from_env({}).pool_recycle is False


class Backend:
    """A pool backend whose machine never stops in time, or stops and takes its update."""

    def __init__(self, *, stops: bool) -> None:
        self.stops = stops
        self.destroyed: list[str] = []
        self.rotated: list[dict[str, str]] = []

    async def wait_exit(self, ref: MachineRef, timeout_s: float) -> MachineExit | None:
        return MachineExit(exit_code=0) if self.stops else None

    async def rotate(self, ref: MachineRef, env: dict[str, str]) -> MachineRef:
        self.rotated.append(env)
        return MachineRef(ref.id, ref.region, "v2", pooled=True)

    async def destroy(self, ref: MachineRef) -> None:
        self.destroyed.append(ref.id)

    def pool_image(self) -> str:
        return "img"


@pytest.mark.parametrize("stops", [True, False])
async def test_recycling_on_the_store(store: Store, stops: bool) -> None:
    """`Pool.recycle` on SQLite and PostgreSQL: only a machine claimed by the ended session is
    taken; its token hash is replaced at once; a machine that stops comes back available with
    its new version, one that does not stop in time is destroyed and its row dropped."""
    settings = Settings.from_env(
        {
            "MACHINE_BACKEND": "fly",
            "FLY_API_TOKEN": "t",
            "FLY_BOT_APP": "bots",
            "BOT_IMAGE": "registry.fly.io/bots:v1",
            "DAILY_API_KEY": "k",
            "DISPATCHER_URL": "http://d",
            "DISPATCHER_AUTH": "none",
            "POOL_RECYCLE": "true",
            "BOT_STOP_TIMEOUT_S": "1",
        }
    )
    rows = PoolRows(store, settings.dispatcher_name)
    backend = Backend(stops=stops)
    pool = Pool(rows, backend, settings, None, Metrics(), dispatcher_url="http://d")  # type: ignore[arg-type]
    await rows.add("m1", region="iad", image="img", state=AVAILABLE, token_hash="old", version="v1")
    await rows.claim(region="iad", image="img", session_id="s-1", body="{}")
    ref = MachineRef("m1", "iad", "v1", pooled=True)
    assert not await pool.recycling.recycle("s-other", ref)
    assert not await pool.recycling.recycle("s-1", MachineRef("unknown"))
    assert await pool.recycling.recycle("s-1", ref)
    row = await rows.get("m1")
    assert row is not None and row.token_hash != "old"
    assert row.state in (RECYCLING, AVAILABLE)
    assert not await pool.recycling.recycle("s-1", ref)  # once

    async def settled() -> bool:
        current = await rows.get("m1")
        return current is None or current.state == AVAILABLE

    await eventually(settled, what="the recycle settled")
    row = await rows.get("m1")
    if stops:
        assert row is not None and (row.state, row.version, row.session_id) == (
            AVAILABLE,
            "v2",
            None,
        )
        assert backend.rotated[0]["POOL_TOKEN"] and not backend.destroyed
    else:
        assert row is None and backend.destroyed == ["m1"] and not backend.rotated
    await pool.aclose()
