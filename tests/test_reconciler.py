"""The reconciler: it repairs what no supervisor follows, against the Fly and Daily emulators.

Two ways in. The real app under uvicorn, whose reconciler loop runs every RECONCILE_INTERVAL_S:
a first dispatcher starts a session and is closed, which leaves the session followed by nobody
(a dispatcher that died), and a second one on the same database must finish it. And single
passes of `Reconciler.reconcile()` built from the real parts (a "rig"), for repairs that take
several passes or a store row no running dispatcher would write; there the bots' callbacks go
to a recorder, so no dispatcher follows anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.config import Secret, Settings
from dispatcher.ids import new_session_id
from dispatcher.janitor import RoomJanitor
from dispatcher.lifecycle import EndReason
from dispatcher.machines import BOT_COMMAND, BotSpec
from dispatcher.machines.fly import FlyMachines
from dispatcher.machines.fly_api import FlyAPI
from dispatcher.reconciler import Reconciler
from dispatcher.rooms.daily import DailyRooms
from dispatcher.rooms.daily_api import DailyAPI
from dispatcher.store import ENDED, ENDING, FAILED, READY, STARTING, Event, Session, Store
from dispatcher.supervisor import EXIT_MARGIN_S, Supervisor
from dispatcher.telemetry import random_traceparent
from testkit.fakes.daily import DailyEmulator
from testkit.fakes.fly import ApiRequest, FlyEmulator, MachineRecord
from testkit.fakes.recorder import CallbackRecorder
from testkit.harness import (
    BOT_APP,
    DAILY_KEY,
    FAST_RETRY,
    FLY_TOKEN,
    Emulators,
    Stack,
    dispatcher_env,
    dispatcher_stack,
    emulators,
    fly_emulator,
    run_dispatcher,
)
from testkit.net import serve
from testkit.waits import eventually

DISPATCHER = "test-dispatcher"  # DISPATCHER_NAME in testkit.harness.dispatcher_env
LOOP = {"RECONCILE_INTERVAL_S": "0.3"}
MACHINES = f"/v1/apps/{BOT_APP}/machines"


# -- the app, twice on one database ---------------------------------------------------------


@contextlib.asynccontextmanager
async def open_store(tmp_path: Path) -> AsyncIterator[Store]:
    """The store the dispatchers of `run_dispatcher(tmp_path, ...)` share."""
    store = await Store.open(f"sqlite:///{tmp_path}/dispatcher.db")
    try:
        yield store
    finally:
        await store.close()


async def row(tmp_path: Path, sid: str) -> Session:
    async with open_store(tmp_path) as store:
        session = await store.get(sid)
    assert session is not None
    return session


async def events(tmp_path: Path, sid: str) -> list[Event]:
    async with open_store(tmp_path) as store:
        return await store.events(sid)


def states(log: list[Event]) -> list[str | None]:
    return [e.state for e in log if e.kind == "state"]


async def abandoned_session(
    tmp_path: Path,
    upstream: Emulators,
    script: dict[str, Any],
    *,
    state: str = "ready",
    env: dict[str, str] | None = None,
) -> tuple[str, MachineRecord]:
    """A session started by a dispatcher that then goes away: `state` in the store, its bot
    running, and nobody following it."""
    assert upstream.fly is not None
    async with run_dispatcher(tmp_path, upstream, env=LOOP | (env or {})) as first:
        started = await first.start({"testBot": script})
        assert started.status_code == 200, started.text
        sid = started.json()["sessionId"]
        session = await first.wait_state(sid, state)
    machine = upstream.fly.machines[session["machineId"]]
    assert (await row(tmp_path, sid)).state == state
    assert machine.state == "started"
    return sid, machine


def requests_to(fly: FlyEmulator, machine_id: str, verb: str) -> list[ApiRequest]:
    """The API requests for one machine: `stop` (POST .../stop) or `destroy` (DELETE ...)."""
    path = f"{MACHINES}/{machine_id}"
    if verb == "stop":
        return [r for r in fly.requests if r.method == "POST" and r.path == f"{path}/stop"]
    assert verb == "destroy"
    return [r for r in fly.requests if r.method == "DELETE" and r.path == path]


def inventory_lists(fly: FlyEmulator) -> int:
    """How many times the machines of this dispatcher were listed (once per reconciler pass)."""
    return sum(
        1
        for r in fly.requests
        if r.method == "GET"
        and r.path == MACHINES
        and f"metadata.dispatcher={DISPATCHER}" in r.query
    )


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["exit_event", "MonitorEvent"])
async def test_machine_exit_of_an_unfollowed_session_ends_it(tmp_path: Path, shape: str) -> None:
    """A bot that exits while no dispatcher follows its session: the reconciler ends the session
    as crashed with the exit code from Fly's events (in either shape), and deletes the room."""
    script = {"exit_after_s": 3, "exit_code": 3, "no_ended": True}
    async with emulators(fly=fly_emulator(exit_event_shape=shape)) as upstream:
        sid, machine = await abandoned_session(tmp_path, upstream, script)
        async with run_dispatcher(tmp_path, upstream, env=LOOP) as second:
            ended = await second.wait_state(sid, "ended", "failed")
            assert ended["endReason"] == "crashed" and ended["exitCode"] == 3
            assert machine.exit_events()[0]["exit_code"] == 3
            await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
            await eventually(lambda: sid not in upstream.daily.rooms, what="room deleted")

            async def marked() -> bool:
                return (await row(tmp_path, sid)).room_deleted_at is not None

            # The janitor records the delete once Daily has answered it.
            await eventually(marked, what="the room's delete recorded")
        log = await events(tmp_path, sid)
        assert states(log) == ["starting", "dispatched", "ready", "ended"]
        assert log[-1].details["exit_code"] == 3 and log[-1].details["machine_id"] == machine.id
        assert log[-1].details["requested_stop"] is False
        assert not requests_to(upstream.fly, machine.id, "stop")


@pytest.mark.slow
async def test_oom_kill_of_an_unfollowed_session(tmp_path: Path) -> None:
    """An OOM kill while nobody follows the session ends it as oom_killed (Fly's exit event)."""
    async with emulators(fly=fly_emulator()) as upstream:
        sid, machine = await abandoned_session(tmp_path, upstream, {})
        async with (
            run_dispatcher(tmp_path, upstream, env=LOOP) as second,
            httpx.AsyncClient() as http,
        ):
            assert (await second.session(sid))["state"] == "ready"
            killed = await http.post(f"{upstream.fly_url}/_emulator/machines/{machine.id}/oom")
            assert killed.status_code == 200, killed.text
            ended = await second.wait_state(sid, "ended", "failed")
            assert ended["state"] == "ended"
            assert ended["endReason"] == "oom_killed" and ended["exitCode"] == 137
            await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
            await eventually(lambda: sid not in upstream.daily.rooms, what="room deleted")
        last = (await events(tmp_path, sid))[-1]
        assert last.state == "ended" and last.details["oom_killed"] is True


@pytest.mark.slow
async def test_max_duration_of_an_unfollowed_session(tmp_path: Path) -> None:
    """Past its max duration, a session nobody follows is asked to end by the reconciler: its
    bot gets SIGTERM through Fly's stop with the grace period, and it ends as max_duration."""
    script = {"ignore_max_duration": True}
    async with emulators(fly=fly_emulator()) as upstream:
        assert upstream.fly is not None
        sid, machine = await abandoned_session(tmp_path, upstream, script)
        async with open_store(tmp_path) as store:
            await store.update(sid, expires_at=time.time() - 1)
        async with run_dispatcher(tmp_path, upstream, env=LOOP) as second:
            ended = await second.wait_state(sid, "ended", "failed")
            assert ended["state"] == "ended"
            assert ended["endReason"] == "max_duration" and ended["exitCode"] == 0
            (stop,) = requests_to(upstream.fly, machine.id, "stop")
            assert stop.body == {"signal": "SIGTERM", "timeout": "2s"}
            (exit,) = machine.exit_events()
            assert exit["requested_stop"] is True and exit["exit_code"] == 0
            assert any("sigterm" in line for line in machine.logs)
            await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
            await eventually(lambda: sid not in upstream.daily.rooms, what="room deleted")
        log = await events(tmp_path, sid)
        assert states(log) == ["starting", "dispatched", "ready", "ending", "ended"]
        assert log[-2].details == {"reason": "max_duration"}


@pytest.mark.slow
async def test_max_duration_bot_ignoring_sigterm_is_stopped_for_good(tmp_path: Path) -> None:
    """A bot that ignores SIGTERM too is killed at the end of the stop's grace period (Fly's
    SIGKILL); the session nobody followed still ends as max_duration."""
    script = {"ignore_max_duration": True, "ignore_sigterm": True}
    env = LOOP | {"BOT_STOP_TIMEOUT_S": "1"}
    async with emulators(fly=fly_emulator()) as upstream:
        assert upstream.fly is not None
        sid, machine = await abandoned_session(tmp_path, upstream, script)
        async with open_store(tmp_path) as store:
            await store.update(sid, expires_at=time.time() - 1)
        async with run_dispatcher(tmp_path, upstream, env=env) as second:
            ended = await second.wait_state(sid, "ended", "failed")
            assert ended["endReason"] == "max_duration" and ended["exitCode"] == 137
            (stop,) = requests_to(upstream.fly, machine.id, "stop")
            assert stop.body == {"signal": "SIGTERM", "timeout": "1s"}
            assert any("sigterm ignored" in line for line in machine.logs)
            (exit,) = machine.exit_events()
            assert exit["signal"] == 9 and exit["requested_stop"] is True
            await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
            await eventually(lambda: sid not in upstream.daily.rooms, what="room deleted")


async def test_machine_outliving_its_stop_is_destroyed(tmp_path: Path) -> None:
    """A stop that never takes (Fly answers ok, the bot runs on): once the session has been
    ending for longer than the grace period (and the exit margin, none here), the reconciler
    destroys the machine and the session ends as max_duration."""
    async with rig(tmp_path, exit_margin_s=0, BOT_STOP_TIMEOUT_S="1") as r:
        sid = new_session_id()
        await r.room(sid)
        machine = await r.machine(r.bot_config(sid, {"ignore_max_duration": True}), name=sid)
        await r.session(sid, READY, age_s=30)
        await r.store.update(
            sid, machine_id=machine.id, region=machine.region, expires_at=time.time() - 1
        )
        r.fly.faults.add("stop", status=200, body={"ok": True}, times=100)

        async def ended() -> bool:
            report = await r.reconciler.reconcile()
            assert not report.errors, report.errors
            session = await r.store.get(sid)
            return session is not None and not session.active

        await eventually(ended, what="the session ended")
        over = await r.store.get(sid)
        assert over is not None and over.state == ENDED
        assert over.end_reason == "max_duration" and over.exit_code == 137
        stops = requests_to(r.fly, machine.id, "stop")
        destroys = requests_to(r.fly, machine.id, "destroy")
        assert stops and destroys
        assert r.fly.requests.index(stops[0]) < r.fly.requests.index(destroys[0])
        assert not any("sigterm" in line for line in machine.logs)  # the stop never landed
        await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
        await r.janitor.join()
        assert sid not in r.daily.rooms


@pytest.mark.slow
async def test_ready_timeout_of_an_unfollowed_session(tmp_path: Path) -> None:
    """A bot that never calls ready, its dispatcher gone: the reconciler stops it after
    READY_TIMEOUT_S and the session fails as ready_timeout."""
    async with emulators(fly=fly_emulator()) as upstream:
        assert upstream.fly is not None
        sid, machine = await abandoned_session(
            tmp_path,
            upstream,
            {"skip_ready": True},
            state="dispatched",
            env={"READY_TIMEOUT_S": "30"},
        )
        env = LOOP | {"READY_TIMEOUT_S": "1"}
        async with run_dispatcher(tmp_path, upstream, env=env) as second:
            failed = await second.wait_state(sid, "ended", "failed")
            assert failed["state"] == "failed" and failed["endReason"] == "ready_timeout"
            assert failed["readyAt"] is None
            (stop,) = requests_to(upstream.fly, machine.id, "stop")
            assert stop.body == {"signal": "SIGTERM", "timeout": "2s"}
            await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
            assert machine.exit_events()[0]["requested_stop"] is True
            await eventually(lambda: sid not in upstream.daily.rooms, what="room deleted")
        log = await events(tmp_path, sid)
        assert states(log) == ["starting", "dispatched", "ending", "failed"]
        assert log[-2].details == {"reason": "ready_timeout"}


async def test_duplicate_machine_is_destroyed_and_the_session_kept(tmp_path: Path) -> None:
    """A second machine labelled with a live session's id (a clone of its machine: same config,
    same env) is destroyed; the session's own machine keeps running, the session is unaffected."""
    async with dispatcher_stack(tmp_path, env=LOOP) as stack:
        assert stack.fly is not None and stack.daily is not None
        sid = (await stack.start()).json()["sessionId"]
        session = await stack.wait_state(sid, "ready")
        own = stack.fly.machines[session["machineId"]]
        log_before = await events(tmp_path, sid)
        config = copy.deepcopy(own.config)
        # Labelled ours only once its bot runs, so that the reconciler meets a running clone.
        config["metadata"]["dispatcher"] = "not-yet"
        clone = {"name": f"{sid}-clone", "region": "iad", "config": config}
        fly_api = f"{stack.settings.fly_api_base_url}{MACHINES}"
        auth = {"Authorization": f"FlyV1 {FLY_TOKEN}"}
        async with httpx.AsyncClient(headers=auth) as fly_http:
            created = await fly_http.post(fly_api, json=clone)
            assert created.status_code == 200, created.text
            duplicate = stack.fly.machines[created.json()["id"]]
            await eventually(
                lambda: any(" ready" in line for line in duplicate.logs), what="the clone runs"
            )
            labelled = await fly_http.post(
                f"{fly_api}/{duplicate.id}/metadata/dispatcher", json={"value": DISPATCHER}
            )
            assert labelled.status_code == 204, labelled.text
        assert duplicate.metadata == own.metadata
        await eventually(lambda: duplicate.state == "destroyed", what="duplicate destroyed")
        # Destroyed outright: a graceful stop would have its bot report `ended` for the session.
        assert requests_to(stack.fly, duplicate.id, "destroy")
        assert not requests_to(stack.fly, duplicate.id, "stop")
        assert own.state == "started"
        assert not requests_to(stack.fly, own.id, "stop")
        assert not requests_to(stack.fly, own.id, "destroy")
        after = await stack.session(sid)
        assert after["state"] == "ready" and after["endReason"] is None
        assert after["machineId"] == own.id
        assert [e.state for e in await events(tmp_path, sid)] == [e.state for e in log_before]
        assert sid in stack.daily.rooms
        await end_session(stack, sid)


async def end_session(stack: Stack, sid: str) -> None:
    """DELETE the session and wait for it to end and its machine to be destroyed."""
    assert stack.fly is not None
    deleted = await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
    assert deleted.status_code == 202, deleted.text
    ended = await stack.wait_state(sid, "ended")
    assert ended["endReason"] == "deleted"
    machine = stack.fly.machines[ended["machineId"]]
    await eventually(lambda: machine.state == "destroyed", what="machine destroyed")


async def test_sqlite_instance_is_the_leader(tmp_path: Path) -> None:
    """On SQLite the single instance runs the reconciler."""
    async with dispatcher_stack(tmp_path, env=LOOP) as stack:

        async def leader() -> bool:
            health = (await stack.http.get("/healthz")).json()
            return bool(health["reconciler"] == "leader")

        await eventually(leader, what="the reconciler leads")


async def test_followed_session_is_left_alone(tmp_path: Path) -> None:
    """A ready session its dispatcher follows is not disturbed by reconciler passes: no stop,
    no destroy, no room delete, no new event."""
    # Every list answered, so that each one counts a pass (Fly allows 1 a second, burst 3).
    fly = fly_emulator(limits={"list": (20.0, 20)})
    async with dispatcher_stack(tmp_path, env=LOOP, fly=fly) as stack:
        assert stack.fly is not None and stack.daily is not None
        sid = (await stack.start()).json()["sessionId"]
        session = await stack.wait_state(sid, "ready")
        machine = stack.fly.machines[session["machineId"]]
        log_before = await events(tmp_path, sid)
        passes = inventory_lists(stack.fly)
        await eventually(
            lambda: inventory_lists(stack.fly) >= passes + 4, what="four reconciler passes"
        )
        assert (await stack.session(sid))["state"] == "ready"
        assert machine.state == "started"
        assert not [r for r in stack.fly.requests if r.path.endswith("/stop")]
        assert not [r for r in stack.fly.requests if r.method == "DELETE"]
        assert sid in stack.daily.rooms
        assert not [r for r in stack.daily.requests if r.method == "DELETE"]
        assert await events(tmp_path, sid) == log_before
        await end_session(stack, sid)


# -- single passes over the real parts --------------------------------------------------------


@dataclass
class Rig:
    """A reconciler built from the real parts against served emulators; nobody follows."""

    fly: FlyEmulator
    daily: DailyEmulator
    settings: Settings
    store: Store
    machines: FlyMachines
    rooms: DailyRooms
    reconciler: Reconciler
    janitor: RoomJanitor
    fly_http: httpx.AsyncClient

    def bot_config(self, sid: str, script: dict[str, Any] | None = None) -> dict[str, Any]:
        """The machine config the dispatcher would make for session `sid` (the test bot)."""
        plan = self.rooms.plan(sid, "user-1", time.time() + 300, {}, {})
        contract = self.rooms.bot_contract(plan)
        assert self.settings.dispatcher_url
        env = {
            "SESSION_ID": sid,
            "DISPATCHER_URL": self.settings.dispatcher_url,
            "BOT_CALLBACK_TOKEN": secrets.token_urlsafe(16),
            "SESSION_BODY": json.dumps({"testBot": script or {}}),
            "SESSION_MAX_DURATION_S": "300",
            "TRACEPARENT": random_traceparent(),
            **contract.env,
        }
        spec = BotSpec(sid, "user-1", (*BOT_COMMAND, *contract.args), env)
        return self.machines.machine_config(spec)

    async def machine(self, config: dict[str, Any], *, name: str | None = None) -> MachineRecord:
        """Create a machine at the emulator, as someone did, and wait for its bot to run."""
        body: dict[str, Any] = {"config": config, "region": "iad"}
        if name:
            body["name"] = name
        created = await self.fly_http.post(MACHINES, json=body)
        assert created.status_code == 200, created.text
        machine = self.fly.machines[created.json()["id"]]
        await eventually(
            lambda: any(" ready" in line for line in machine.logs), what="the bot runs"
        )
        return machine

    async def room(self, sid: str) -> None:
        """Create the session's room at Daily."""
        await self.rooms.create(self.rooms.plan(sid, "user-1", time.time() + 300, {}, {}))

    async def session(
        self,
        sid: str,
        state: str,
        *,
        age_s: float = 0.0,
        ended_ago_s: float | None = None,
        room_deleted: bool = False,
    ) -> Session:
        """Insert a session row as a dispatcher would have left it."""
        now = time.time()
        created = now - age_s
        ended_at = None if ended_ago_s is None else now - ended_ago_s
        session = Session(
            id=sid,
            user_id="user-1",
            state=state,
            transport="daily",
            dispatcher=DISPATCHER,
            created_at=created,
            updated_at=ended_at or created,
            expires_at=created + 300,
            room_name=sid,
            room_url=f"https://{self.daily.domain_name}.daily.co/{sid}",
            end_reason="completed" if state == ENDED else None,
            ready_at=created + 1 if state in (READY, ENDED) else None,
            ended_at=ended_at,
            room_deleted_at=ended_at if room_deleted else None,
        )
        await self.store.create_session(session, max_sessions=1000)
        return session

    async def destroy(self, machine: MachineRecord) -> None:
        """Destroy a machine the test left running, and wait until it is gone."""
        answer = await self.fly_http.delete(f"{MACHINES}/{machine.id}", params={"force": "true"})
        assert answer.status_code in (200, 404), answer.text
        await eventually(lambda: machine.state == "destroyed", what=f"{machine.id} destroyed")


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path, *, exit_margin_s: float = EXIT_MARGIN_S, **env: str
) -> AsyncIterator[Rig]:
    """The emulators, a callback recorder for the bots, and a reconciler over them (which
    gives a machine `exit_margin_s` past its stop's grace period)."""
    # Creates and lists are not what is tested here: let the tests make machines and run
    # passes faster than Fly's 1 a second (Daily's delete limit, which the janitor paces, stays).
    fly = fly_emulator(limits={"create": (20.0, 20), "list": (20.0, 20)})
    callbacks = CallbackRecorder()
    async with (
        emulators(fly=fly) as upstream,
        serve(callbacks.app()) as callbacks_url,
        contextlib.AsyncExitStack() as stack,
    ):
        assert upstream.fly_url is not None
        values = dispatcher_env(
            fly_url=upstream.fly_url,
            daily_url=upstream.daily_url,
            dispatcher_url=callbacks_url,
            db=f"sqlite:///{tmp_path}/dispatcher.db",
        )
        settings = Settings.from_env(values | env)
        store = await Store.open(settings.database_url)
        stack.push_async_callback(store.close)
        fly_http = FlyAPI.client(upstream.fly_url, FLY_TOKEN)
        stack.push_async_callback(fly_http.aclose)
        machines = FlyMachines(FlyAPI(fly_http, BOT_APP, FAST_RETRY), settings, FAST_RETRY)
        daily_http = DailyAPI.client(upstream.daily_url, DAILY_KEY)
        stack.push_async_callback(daily_http.aclose)
        rooms = DailyRooms(DailyAPI(daily_http, FAST_RETRY), Secret(DAILY_KEY), FAST_RETRY)
        await rooms.open()
        janitor = RoomJanitor(store, {"daily": rooms})
        stack.push_async_callback(janitor.aclose)
        supervisor = Supervisor(store, machines, janitor, settings)
        stack.push_async_callback(supervisor.aclose)
        reconciler = Reconciler(
            store,
            machines,
            {"daily": rooms},
            supervisor,
            janitor,
            settings,
            exit_margin_s=exit_margin_s,
        )
        stack.push_async_callback(reconciler.aclose)
        yield Rig(
            fly=fly,
            daily=upstream.daily,
            settings=settings,
            store=store,
            machines=machines,
            rooms=rooms,
            reconciler=reconciler,
            janitor=janitor,
            fly_http=fly_http,
        )


async def test_reconciler_leads_while_it_runs(tmp_path: Path) -> None:
    """`run()` takes the lead (always granted on SQLite) and passes every interval; `aclose()`
    gives the lead up."""
    async with rig(tmp_path, RECONCILE_INTERVAL_S="0.1") as r:
        assert not r.reconciler.leader and r.reconciler.passes == 0
        task = asyncio.create_task(r.reconciler.run())
        try:
            await eventually(
                lambda: r.reconciler.leader and r.reconciler.passes >= 3, what="three passes"
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await r.reconciler.aclose()
        assert not r.reconciler.leader


def iso_ago(seconds: float) -> str:
    """An RFC 3339 time `seconds` ago, as Fly writes `created_at`."""
    return datetime.fromtimestamp(time.time() - seconds, UTC).isoformat().replace("+00:00", "Z")


async def test_stuck_start_fails_and_is_cleaned_up(tmp_path: Path) -> None:
    """A session left in `starting` by a dispatcher that died mid-start (its machine made, its
    room made) fails as start_interrupted once older than START_TIMEOUT_S: the machine is
    destroyed and the room deleted. A start still in time is left alone."""
    async with rig(tmp_path, START_TIMEOUT_S="30") as r:
        stuck, fresh = new_session_id(), new_session_id()
        machines = {}
        for sid in (stuck, fresh):
            await r.room(sid)
            machines[sid] = await r.machine(r.bot_config(sid), name=sid)
        await r.session(stuck, STARTING, age_s=60)
        await r.session(fresh, STARTING, age_s=1)

        report = await r.reconciler.reconcile()
        assert report.starts_failed == 1 and report.rooms_queued == 1 and not report.errors
        await r.janitor.join()

        failed = await r.store.get(stuck)
        assert failed is not None and failed.state == FAILED
        assert failed.end_reason == EndReason.START_INTERRUPTED and failed.ended_at is not None
        assert failed.room_deleted_at is not None
        log = await r.store.events(stuck)
        assert [(e.state, e.details) for e in log if e.kind == "state"] == [
            (STARTING, {}),
            (FAILED, {"reason": EndReason.START_INTERRUPTED, "source": "reconciler"}),
        ]
        await eventually(
            lambda: machines[stuck].state == "destroyed", what="the stuck start's machine"
        )
        assert stuck not in r.daily.rooms

        in_time = await r.store.get(fresh)
        assert in_time is not None and in_time.state == STARTING
        assert machines[fresh].state == "started" and fresh in r.daily.rooms
        assert not requests_to(r.fly, machines[fresh].id, "stop")
        assert not requests_to(r.fly, machines[fresh].id, "destroy")
        await r.destroy(machines[fresh])


async def test_ending_session_is_left_to_its_goodbye(tmp_path: Path) -> None:
    """A session already `ending` is being stopped by whoever asked for its end, its bot saying
    goodbye: a pass within the stop's grace period sends no second SIGTERM. Past it (its
    dispatcher died before the stop, or the bot hangs), the pass stops the machine itself."""
    async with rig(tmp_path) as r:
        sid = new_session_id()
        await r.room(sid)
        machine = await r.machine(r.bot_config(sid), name=sid)
        await r.session(sid, READY, age_s=30)
        await r.store.update(sid, machine_id=machine.id, region=machine.region)
        ending = await r.store.transition(sid, ENDING, from_states=(READY,))
        assert ending is not None and ending.end_requested_at is not None

        first = await r.reconciler.reconcile()
        assert first.stops == 0 and not first.errors
        assert not requests_to(r.fly, machine.id, "stop")
        assert machine.state == "started"

        grace = r.settings.bot_stop_timeout_s
        await r.store.update(sid, end_requested_at=time.time() - grace - 1)
        second = await r.reconciler.reconcile()
        assert second.stops == 1 and not second.errors
        (stop,) = requests_to(r.fly, machine.id, "stop")
        assert stop.body == {"signal": "SIGTERM", "timeout": "2s"}
        await eventually(lambda: machine.state in ("stopped", "destroyed"), what="stopped")


async def test_orphan_machines_are_stopped_then_destroyed(tmp_path: Path) -> None:
    """Machines of ours that no live session owns (their session ended, or is unknown and
    older than START_TIMEOUT_S) get a stop first, then are destroyed on a later pass. Machines
    of another dispatcher, or without metadata, are never touched."""
    async with rig(tmp_path) as r:
        ended, unknown = new_session_id(), new_session_id()
        await r.session(ended, ENDED, age_s=120, ended_ago_s=60, room_deleted=True)
        # Left stopped by its stop (no auto_destroy), so that only a destroy removes it.
        config = r.bot_config(ended) | {"auto_destroy": False}
        of_ended = await r.machine(config, name=ended)
        of_unknown = await r.machine(r.bot_config(unknown), name=unknown)
        # Old, and labelled with the ended session: only their labels keep them safe.
        other = r.bot_config(ended)
        other["metadata"]["dispatcher"] = "another-dispatcher"
        of_another = await r.machine(other, name=f"{ended}-theirs")
        bare = r.bot_config(ended)
        del bare["metadata"]
        unlabelled = await r.machine(bare)
        of_another.created_at = unlabelled.created_at = iso_ago(600)

        first = await r.reconciler.reconcile()
        assert first.machines == 2 and first.stops == 1 and first.destroyed == 0
        (stop,) = requests_to(r.fly, of_ended.id, "stop")
        assert stop.body == {"signal": "SIGTERM", "timeout": "2s"}
        assert not requests_to(r.fly, of_unknown.id, "stop")  # young: maybe a start in flight
        await eventually(lambda: of_ended.state == "stopped", what="the orphan stopped")

        of_unknown.created_at = iso_ago(600)  # older than START_TIMEOUT_S now
        second = await r.reconciler.reconcile()
        assert second.destroyed == 1 and second.stops == 1
        assert requests_to(r.fly, of_ended.id, "destroy")
        await eventually(lambda: of_ended.state == "destroyed", what="the stopped orphan")
        assert len(requests_to(r.fly, of_ended.id, "stop")) == 1
        assert len(requests_to(r.fly, of_unknown.id, "stop")) == 1
        await eventually(lambda: of_unknown.state == "destroyed", what="the unknown's orphan")

        for untouched in (of_another, unlabelled):
            assert untouched.state == "started"
            assert not requests_to(r.fly, untouched.id, "stop")
            assert not requests_to(r.fly, untouched.id, "destroy")
        session = await r.store.get(ended)
        assert session is not None and session.state == ENDED
        await r.destroy(of_another)
        await r.destroy(unlabelled)


async def test_rooms_of_ended_sessions_are_deleted(tmp_path: Path) -> None:
    """The room of an ended session not marked deleted is deleted and marked; a room at Daily
    named after an ended session already marked deleted is found in Daily's list and deleted
    again. Rooms with other names, of active sessions, of sessions the store does not know, or
    of sessions that ended moments ago (left to their supervisor), are kept."""
    async with rig(tmp_path) as r:
        stale, marked, active, just_ended, unknown = (new_session_id() for _ in range(5))
        for sid in (stale, marked, active, just_ended, unknown, "lobby"):
            await r.room(sid)
        await r.session(stale, ENDED, age_s=120, ended_ago_s=60)
        await r.session(marked, FAILED, age_s=120, ended_ago_s=60, room_deleted=True)
        await r.session(active, STARTING)
        await r.session(just_ended, ENDED, age_s=30, ended_ago_s=0)

        report = await r.reconciler.reconcile()
        assert report.rooms_queued == 2 and not report.errors
        await r.janitor.join()
        assert stale not in r.daily.rooms and marked not in r.daily.rooms
        for kept in (active, just_ended, unknown, "lobby"):
            assert kept in r.daily.rooms, kept
        deleted = [q for q in r.daily.requests if q.method == "DELETE"]
        assert [q.path for q in deleted] == ["/batch/rooms"]  # both rooms in one call
        assert sorted(deleted[0].body["rooms"]) == sorted([stale, marked])
        for sid in (stale, marked):
            session = await r.store.get(sid)
            assert session is not None and session.room_deleted_at is not None
        again = await r.reconciler.reconcile()
        await r.janitor.join()
        assert again.rooms_queued == 0
        assert len([q for q in r.daily.requests if q.method == "DELETE"]) == 1


async def test_many_room_deletes_go_in_one_batch_call(tmp_path: Path) -> None:
    """Eight rooms to delete in one pass go out in one batch call of the janitor: Daily (about
    2 deletes a second, a burst of 2, a batch counted as one) never answers 429."""
    async with rig(tmp_path) as r:
        sids = [new_session_id() for _ in range(8)]
        for sid in sids:
            await r.room(sid)
            await r.session(sid, ENDED, age_s=120, ended_ago_s=60)

        report = await r.reconciler.reconcile()
        assert report.rooms_queued == len(sids) and not report.errors
        await r.janitor.join()
        assert not set(sids) & set(r.daily.rooms)
        deleted = [q for q in r.daily.requests if q.method == "DELETE"]
        assert [sorted(q.body["rooms"]) for q in deleted] == [sorted(sids)]
        assert r.daily.limiter.refused.get("delete_room", 0) == 0
        for sid in sids:
            session = await r.store.get(sid)
            assert session is not None and session.room_deleted_at is not None


@pytest.mark.slow
async def test_room_delete_retries_are_paced_too(tmp_path: Path) -> None:
    """A batch delete that fails (503) is retried, each retry in its own turn: the retries
    never hit Daily's delete limit either."""
    async with rig(tmp_path) as r:
        sids = [new_session_id() for _ in range(4)]
        for sid in sids:
            await r.room(sid)
            await r.session(sid, ENDED, age_s=120, ended_ago_s=60)
        r.daily.faults.add("delete_rooms", status=503, times=3)

        await r.reconciler.reconcile()
        await r.janitor.join()
        assert r.daily.faults.fired == [("delete_rooms", 503)] * 3
        assert not set(sids) & set(r.daily.rooms)
        assert r.daily.limiter.refused.get("delete_room", 0) == 0


@pytest.mark.slow
async def test_failed_room_delete_is_recorded_and_retried(tmp_path: Path) -> None:
    """A room delete that fails (Daily answers 500 throughout) is recorded in the session's log
    and left unmarked; a later pass deletes the room."""
    async with rig(tmp_path) as r:
        sid = new_session_id()
        await r.room(sid)
        await r.session(sid, ENDED, age_s=120, ended_ago_s=60)
        r.daily.faults.add("delete_rooms", status=500, times=1000)

        first = await r.reconciler.reconcile()
        await r.janitor.join()
        assert first.rooms_queued == 1 and sid in r.daily.rooms
        session = await r.store.get(sid)
        assert session is not None and session.room_deleted_at is None
        failures = [e for e in await r.store.events(sid) if e.kind == "cleanup_failed"]
        assert len(failures) == 1 and failures[0].details["what"] == "room_delete"

        r.daily.faults.clear()
        second = await r.reconciler.reconcile()
        await r.janitor.join()
        assert second.rooms_queued == 1 and sid not in r.daily.rooms
        session = await r.store.get(sid)
        assert session is not None and session.room_deleted_at is not None


async def test_sessions_of_another_dispatcher_are_left_alone(tmp_path: Path) -> None:
    """Two dispatcher apps may share one database: a pass repairs its own sessions only, even
    one whose machine it cannot find and whose time is up."""
    async with rig(tmp_path, START_TIMEOUT_S="30") as r:
        theirs, stuck = new_session_id(), new_session_id()
        now = time.time()
        other = Session(
            id=theirs,
            user_id="user-1",
            state=READY,
            transport="daily",
            dispatcher="another-dispatcher",
            created_at=now - 600,
            updated_at=now - 600,
            expires_at=now - 300,
            machine_id="0000000000aaaa",
            ready_at=now - 599,
        )
        await r.store.create_session(other, max_sessions=1000)
        starting = dataclasses.replace(
            other, id=stuck, state=STARTING, machine_id=None, ready_at=None
        )
        await r.store.create_session(starting, max_sessions=1000)

        report = await r.reconciler.reconcile()
        assert report.sessions == 0 and report.repaired == 0 and not report.errors
        for sid, state in ((theirs, READY), (stuck, STARTING)):
            kept = await r.store.get(sid)
            assert kept is not None and kept.state == state
        assert not [q for q in r.fly.requests if "0000000000aaaa" in q.path]
