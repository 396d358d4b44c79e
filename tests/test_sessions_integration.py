"""Whole sessions: the real dispatcher under uvicorn against the Fly and Daily emulators."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import httpx
import jwt
import pytest

from dispatcher.upstream import RetryPolicy
from testkit.harness import (
    BOT_APP,
    BOT_IMAGE,
    DAILY_KEY,
    FAST_RETRY,
    SECRETS,
    Stack,
    daily_emulator,
    dispatcher_stack,
    emulators,
    fly_emulator,
    run_dispatcher,
)
from testkit.waits import eventually


def live_machines(stack: Stack) -> list[object]:
    assert stack.fly is not None
    return [m for m in stack.fly.machines.values() if m.state != "destroyed"]


async def test_whole_session(tmp_path: Path) -> None:
    """/start -> machine process -> ready -> DELETE -> ended, room deleted, machine destroyed."""
    async with dispatcher_stack(tmp_path) as stack:
        assert stack.fly is not None and stack.daily is not None
        response = await stack.start({"greeting": "hi"})
        assert response.status_code == 200, response.text
        answer = response.json()
        sid = answer["sessionId"]
        assert set(answer) == {"dailyRoom", "dailyToken", "sessionId"}
        assert answer["dailyRoom"] == f"https://{stack.daily.domain_name}.daily.co/{sid}"

        room = stack.daily.rooms[sid]
        assert room.privacy == "private"
        assert room.properties["max_participants"] == 2
        assert room.properties["eject_at_room_exp"] is True
        user = stack.daily.join(sid, answer["dailyToken"])
        assert user["owner"] is False and user["userId"] == "user-1"

        session = await stack.wait_state(sid, "ready")
        assert session["machineId"] and session["region"] == "iad"
        machine = stack.fly.machines[session["machineId"]]
        assert machine.name == sid

        deleted = await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
        assert deleted.status_code == 202
        assert deleted.json()["state"] == "ending"
        ended = await stack.wait_state(sid, "ended")
        assert ended["endReason"] == "deleted" and ended["exitCode"] == 0
        await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
        daily = stack.daily
        await eventually(lambda: sid not in daily.rooms, what="room deleted (by the janitor)")
        assert any(line.startswith("testbot") and "ready" in line for line in machine.logs)


async def test_machine_config_carries_the_bot_contract(tmp_path: Path) -> None:
    """The machine is created with the bot contract, pinned image, no restarts and no secrets."""
    async with dispatcher_stack(tmp_path) as stack:
        assert stack.fly is not None
        response = await stack.start({"persona": "pirate"})
        sid = response.json()["sessionId"]
        (machine,) = stack.fly.machines.values()
        config = machine.config
        assert config["image"] == BOT_IMAGE
        assert config["init"]["cmd"] == [
            "python",
            "-m",
            "bot_runtime",
            "--room-url",
            config["env"]["DAILY_ROOM_URL"],
        ]
        assert config["restart"] == {"policy": "no"}
        assert config["auto_destroy"] is True
        assert config["metadata"]["session_id"] == sid
        assert config["metadata"]["dispatcher"] == "test-dispatcher"
        assert config["guest"] == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 1024}
        assert config["stop_config"] == {"signal": "SIGTERM", "timeout": "2s"}
        assert "services" not in config
        env = config["env"]
        assert env["BOT_TRANSPORT"] == "daily"
        assert set(env) == {
            "SESSION_ID",
            "BOT_TRANSPORT",
            "DAILY_ROOM_URL",
            "DAILY_TOKEN",
            "DISPATCHER_URL",
            "BOT_CALLBACK_TOKEN",
            "SESSION_BODY",
            "SESSION_MAX_DURATION_S",
            "TRACEPARENT",
        }
        assert json.loads(env["SESSION_BODY"]) == {"persona": "pirate"}
        bot_claims = jwt.decode(env["DAILY_TOKEN"], DAILY_KEY, algorithms=["HS256"])
        assert bot_claims["o"] is True and bot_claims["r"] == sid
        assert env["DAILY_TOKEN"] != response.json()["dailyToken"]
        everything_sent = json.dumps([r._asdict() for r in stack.fly.requests], default=str)
        for secret in SECRETS:
            assert secret not in everything_sent
        assert "--token" not in json.dumps(config["init"])
        await stack.wait_state(sid, "ready")


async def test_crash_before_ready(tmp_path: Path) -> None:
    """A bot that exits before ready fails the session with its exit code; the room goes."""
    async with dispatcher_stack(tmp_path) as stack:
        assert stack.daily is not None
        sid = (await stack.start({"testBot": {"exit_before_ready": 3}})).json()["sessionId"]
        session = await stack.wait_state(sid, "failed")
        assert session["exitCode"] == 3
        assert session["readyAt"] is None
        await eventually(lambda: sid not in stack.daily.rooms, what="room deleted")
        await eventually(lambda: not live_machines(stack), what="machine destroyed")


@pytest.mark.parametrize("shape", ["exit_event", "MonitorEvent"])
async def test_exit_code_is_read_from_either_event_shape(tmp_path: Path, shape: str) -> None:
    """A bot that exits 3 before ready without reporting it fails its session with exit code 3,
    read from Fly's exit event whichever shape (`exit_event` or `MonitorEvent`) carries it."""
    fly = fly_emulator(exit_event_shape=shape)
    async with dispatcher_stack(tmp_path, fly=fly) as stack:
        script = {"exit_before_ready": 3, "no_ended": True}
        sid = (await stack.start({"testBot": script})).json()["sessionId"]
        session = await stack.wait_state(sid, "failed")
        assert session["endReason"] == "exited_before_ready"
        assert session["exitCode"] == 3


async def test_ready_timeout(tmp_path: Path) -> None:
    """No ready callback in time: the machine is stopped and destroyed, the session fails."""
    async with dispatcher_stack(tmp_path, env={"READY_TIMEOUT_S": "1"}) as stack:
        assert stack.fly is not None
        sid = (await stack.start({"testBot": {"skip_ready": True}})).json()["sessionId"]
        session = await stack.wait_state(sid, "failed")
        assert session["endReason"] == "ready_timeout"
        (machine,) = stack.fly.machines.values()
        await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
        assert machine.exit_events()[0]["requested_stop"] is True


@pytest.mark.slow
@pytest.mark.parametrize("ignores_sigterm", [False, True])
async def test_max_duration_stops_the_bot(tmp_path: Path, ignores_sigterm: bool) -> None:
    """At SESSION_MAX_DURATION_S the bot gets SIGTERM through Fly's stop with the grace period,
    then is stopped for good (Fly's SIGKILL after the grace); the session ends max_duration."""
    script = {"ignore_max_duration": True, "ignore_sigterm": ignores_sigterm}
    env = {"SESSION_MAX_DURATION_S": "2", "BOT_STOP_TIMEOUT_S": "1", "READY_TIMEOUT_S": "2"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        assert stack.fly is not None and stack.daily is not None
        sid = (await stack.start({"testBot": script})).json()["sessionId"]
        await stack.wait_state(sid, "ready")
        session = await stack.wait_state(sid, "ended")
        assert session["endReason"] == "max_duration"
        (machine,) = stack.fly.machines.values()
        stops = [r for r in stack.fly.requests if r.path.endswith(f"/{machine.id}/stop")]
        assert stops and stops[0].body == {"signal": "SIGTERM", "timeout": "1s"}
        (exit,) = machine.exit_events()
        assert exit["requested_stop"] is True
        assert session["exitCode"] == (137 if ignores_sigterm else 0)
        await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
        await eventually(lambda: sid not in stack.daily.rooms, what="room deleted")


@pytest.mark.slow
async def test_followers_survive_a_fly_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every Fly call answering 503 for longer than one call's retries during live sessions:
    the follow waits the outage out (its watch refused pass after pass), and then ends every
    session itself (no reconciler pass runs), after a DELETE, the bot's own exit, or a bot
    killed during the outage, each with its exit code from Fly's events."""
    env = {"RECONCILE_INTERVAL_S": "3600"}  # its one pass runs at start-up, before any session
    async with dispatcher_stack(tmp_path, env=env) as stack:
        fly = stack.fly
        assert fly is not None
        scripts = {"deleted": {}, "exits": {"no_ended": True}, "killed": {}}
        sids = {
            k: (await stack.start({"testBot": v})).json()["sessionId"] for k, v in scripts.items()
        }
        machines = {}
        for kind, sid in sids.items():
            session = await stack.wait_state(sid, "ready")
            machines[kind] = fly.machines[session["machineId"]]

        began = len(fly.requests)
        fly.faults.begin_outage(status=503)

        def refused_lists() -> int:
            """The watch's list calls since the outage began (all refused)."""
            path = f"/v1/apps/{BOT_APP}/machines"
            return sum(1 for r in fly.requests[began:] if r.method == "GET" and r.path == path)

        await eventually(
            lambda: refused_lists() >= 2 * FAST_RETRY.attempts,
            what="the watch refused for longer than one call's retries",
        )
        killed = machines["killed"]
        assert killed.process is not None
        os.killpg(killed.process.pid, signal.SIGKILL)
        await eventually(lambda: killed.state == "destroyed", what="killed machine destroyed")
        fly.faults.end_outage()

        deleted = await stack.http.delete(f"/sessions/{sids['deleted']}", headers=stack.headers())
        assert deleted.status_code == 202, deleted.text
        exits = machines["exits"].process
        assert exits is not None
        os.killpg(exits.pid, signal.SIGTERM)
        ends = {kind: await stack.wait_state(sid, "ended", "failed") for kind, sid in sids.items()}
        assert {k: (s["state"], s["endReason"], s["exitCode"]) for k, s in ends.items()} == {
            "deleted": ("ended", "deleted", 0),
            "exits": ("ended", "completed", 0),
            "killed": ("ended", "crashed", 137),
        }
        await eventually(
            lambda: all(m.state == "destroyed" for m in machines.values()), what="all destroyed"
        )
        await eventually(lambda: not set(sids.values()) & set(stack.daily.rooms), what="no rooms")
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures]


@pytest.mark.slow
async def test_a_ready_timeout_during_a_fly_outage_still_stops_the_bot(tmp_path: Path) -> None:
    """A bot not ready in time while every Fly call answers 503: its follower keeps asking Fly
    to stop it past one call's retries, and once Fly is back the bot is stopped and the session
    fails as ready_timeout through its follower."""
    env = {"RECONCILE_INTERVAL_S": "3600", "READY_TIMEOUT_S": "1"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        fly = stack.fly
        assert fly is not None
        started = await stack.start({"testBot": {"skip_ready": True}})
        assert started.status_code == 200, started.text
        sid = started.json()["sessionId"]
        fly.faults.begin_outage(status=503)
        (machine,) = fly.machines.values()
        stop_path = f"/v1/apps/{BOT_APP}/machines/{machine.id}/stop"
        await eventually(
            lambda: sum(r.path == stop_path for r in fly.requests) >= FAST_RETRY.attempts,
            what="the stop refused as often as one call's retries allow",
        )
        fly.faults.end_outage()
        session = await stack.wait_state(sid, "failed")
        assert session["endReason"] == "ready_timeout"
        await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
        assert machine.exit_events()[0]["requested_stop"] is True


async def test_fly_429_then_success(tmp_path: Path) -> None:
    """A 429 from Fly's create is retried after Retry-After and the start succeeds once."""
    fly = fly_emulator()
    fly.faults.add(
        "create", status=429, headers={"Retry-After": "1"}, body={"error": "rate limited"}
    )
    async with dispatcher_stack(tmp_path, fly=fly) as stack:
        response = await stack.start()
        assert response.status_code == 200, response.text
        assert len(fly.machines) == 1
        assert ("create", 429) in fly.faults.fired


async def test_create_that_succeeded_but_answered_500(tmp_path: Path) -> None:
    """A create that made the machine but answered 500 leaves exactly one machine, adopted."""
    fly = fly_emulator()
    fly.faults.add("create", status=500, apply_first=True)
    async with dispatcher_stack(tmp_path, fly=fly) as stack:
        response = await stack.start()
        assert response.status_code == 200, response.text
        sid = response.json()["sessionId"]
        assert len(fly.machines) == 1
        (machine,) = fly.machines.values()
        session = await stack.wait_state(sid, "ready")
        assert session["machineId"] == machine.id


async def test_create_dropped_connection_is_not_duplicated(tmp_path: Path) -> None:
    """A create whose connection dropped after the machine was made still yields one machine."""
    fly = fly_emulator()
    fly.faults.add("create", status=0, apply_first=True)
    async with dispatcher_stack(tmp_path, fly=fly) as stack:
        response = await stack.start()
        assert response.status_code == 200, response.text
        assert len(fly.machines) == 1


async def test_daily_failing_leaves_nothing_behind(tmp_path: Path) -> None:
    """Daily failing on room create answers 502 JSON; the machine is destroyed, no room stays."""
    daily = daily_emulator()
    daily.faults.add("create_room", status=500, times=100)
    async with dispatcher_stack(tmp_path, daily=daily) as stack:
        assert stack.fly is not None
        response = await stack.start()
        assert response.status_code == 502
        assert response.json()["code"] == "upstream-error"
        assert not daily.rooms
        await eventually(lambda: not live_machines(stack), what="machines destroyed")
        assert len(stack.fly.machines) == 1


async def test_room_created_but_answered_500_is_adopted(tmp_path: Path) -> None:
    """A room create that succeeded but answered 500 is adopted on retry, not duplicated."""
    daily = daily_emulator()
    daily.faults.add("create_room", status=500, apply_first=True)
    async with dispatcher_stack(tmp_path, daily=daily) as stack:
        response = await stack.start()
        assert response.status_code == 200, response.text
        assert list(daily.rooms) == [response.json()["sessionId"]]


@pytest.mark.slow
async def test_fly_failing_deletes_the_room(tmp_path: Path) -> None:
    """Fly failing for good answers 502 and deletes the room that was made meanwhile."""
    fly = fly_emulator()
    fly.faults.add("create", status=503, times=100)
    async with dispatcher_stack(tmp_path, fly=fly) as stack:
        assert stack.daily is not None
        response = await stack.start()
        assert response.status_code == 502
        body = response.json()
        assert body["code"] == "upstream-error" and "fly" in body["detail"]
        assert not live_machines(stack)
        daily = stack.daily
        await eventually(lambda: not daily.rooms, what="room deleted (queued by the janitor)")


async def test_capacity_missing_in_first_region(tmp_path: Path) -> None:
    """insufficient_capacity in the first region of FLY_REGION moves on to the second."""
    fly = fly_emulator(regions={"iad": 0, "ord": None})
    async with dispatcher_stack(tmp_path, fly=fly) as stack:
        response = await stack.start()
        assert response.status_code == 200, response.text
        session = await stack.wait_state(response.json()["sessionId"], "ready")
        assert session["region"] == "ord"


async def test_no_capacity_anywhere_is_502(tmp_path: Path) -> None:
    """With no capacity in any region the start fails with 502 and nothing is left."""
    fly = fly_emulator(regions={"iad": 0, "ord": 0})
    async with dispatcher_stack(tmp_path, fly=fly) as stack:
        assert stack.daily is not None
        response = await stack.start()
        assert response.status_code == 502
        daily = stack.daily
        await eventually(lambda: not daily.rooms, what="room deleted (queued by the janitor)")


@pytest.mark.slow
async def test_upstream_timeout_is_504(tmp_path: Path) -> None:
    """Daily not answering in time gives 504 JSON and leaves nothing behind."""
    daily = daily_emulator()
    daily.faults.add("create_room", status=500, delay_s=2, times=100)
    retry = RetryPolicy(attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1)
    async with dispatcher_stack(
        tmp_path, daily=daily, retry=retry, upstream_timeout_s=0.5
    ) as stack:
        response = await stack.start()
        assert response.status_code == 504, response.text
        assert response.json()["code"] == "upstream-timeout"
        assert not daily.rooms
        await eventually(lambda: not live_machines(stack), what="machines destroyed")


async def test_restarted_dispatcher_follows_running_sessions(tmp_path: Path) -> None:
    """A dispatcher restart leaves the bot running; the new instance follows it to its end."""
    async with emulators(fly=fly_emulator()) as upstream:
        assert upstream.fly is not None
        async with run_dispatcher(tmp_path, upstream) as first:
            sid = (await first.start()).json()["sessionId"]
            await first.wait_state(sid, "ready")
        (machine,) = upstream.fly.machines.values()
        assert machine.state == "started" and machine.exit_events() == []
        async with run_dispatcher(tmp_path, upstream) as second:
            assert (await second.session(sid))["state"] == "ready"
            await second.http.delete(f"/sessions/{sid}", headers=second.headers())
            ended = await second.wait_state(sid, "ended")
            assert ended["endReason"] == "deleted"
            await eventually(lambda: machine.state == "destroyed", what="destroyed")
            daily = upstream.daily
            await eventually(lambda: sid not in daily.rooms, what="room deleted (by the janitor)")


async def test_machine_exit_is_noticed_after_a_restart(tmp_path: Path) -> None:
    """A bot that exits while no dispatcher runs is noticed by the next one, which ends it."""
    script = {"testBot": {"exit_after_s": 1, "exit_code": 0, "no_ended": True}}
    async with emulators(fly=fly_emulator()) as upstream:
        assert upstream.fly is not None
        async with run_dispatcher(tmp_path, upstream) as first:
            sid = (await first.start(script)).json()["sessionId"]
            await first.wait_state(sid, "ready")
        (machine,) = upstream.fly.machines.values()
        await eventually(lambda: machine.state == "destroyed", what="bot exited")
        async with run_dispatcher(tmp_path, upstream) as second:
            ended = await second.wait_state(sid, "ended")
            assert ended["endReason"] == "completed" and ended["exitCode"] == 0
            await eventually(lambda: sid not in upstream.daily.rooms, what="room deleted")


async def test_start_finishes_when_the_client_goes_away(tmp_path: Path) -> None:
    """A client that disconnects mid-start leaves a whole session, never a half-made one."""
    fly = fly_emulator()
    fly.latency.per_op["create"] = 1.0
    async with dispatcher_stack(tmp_path, fly=fly) as stack:
        with pytest.raises(httpx.ReadTimeout):
            await stack.http.post(
                "/start", json={}, headers=stack.headers(), timeout=httpx.Timeout(0.3)
            )
        await eventually(lambda: len(fly.machines) == 1, what="machine created")
        (machine,) = fly.machines.values()
        sid = machine.config["env"]["SESSION_ID"]
        await stack.wait_state(sid, "ready")

        async def adopted() -> bool:
            return (await stack.session(sid))["machineId"] == machine.id

        await eventually(adopted, what="machine recorded on the session")
        await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
        assert (await stack.wait_state(sid, "ended"))["endReason"] == "deleted"


@pytest.mark.slow
async def test_daily_down_at_start_up_does_not_stop_the_dispatcher(tmp_path: Path) -> None:
    """A Daily outage while the dispatcher starts: it serves, /readyz says so, starts wait for
    Daily and work once it answers."""
    daily = daily_emulator()
    daily.faults.add("domain", status=503, times=1000)
    async with dispatcher_stack(tmp_path, daily=daily) as stack:
        ready = await stack.http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["rooms"] != "ok"
        refused = await stack.start()
        assert refused.status_code == 502 and refused.json()["code"] == "upstream-error"
        daily.faults.clear()
        started = await stack.start()
        assert started.status_code == 200, started.text
        assert started.json()["dailyRoom"].endswith("/" + started.json()["sessionId"])
        await stack.wait_state(started.json()["sessionId"], "ready")
