"""The on-call commands (`dispatcher sessions ...`, `dispatcher trace`) on sessions run against
the emulators, with the dispatcher's own environment, in-process and as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.cli import main
from testkit.fakes import TESTBOT_DIR
from testkit.fakes.fly import FlyEmulator
from testkit.harness import (
    Stack,
    dispatcher_env,
    emulators,
    fly_emulator,
    run_dispatcher,
)
from testkit.waits import eventually


@contextlib.asynccontextmanager
async def oncall_stack(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str] | None = None,
    fly: FlyEmulator | None = None,
    *,
    local: bool = False,
) -> AsyncIterator[tuple[Stack, dict[str, str]]]:
    """A dispatcher on the emulators (`local`: with local bots); its environment is also this
    process's (for the CLI)."""
    async with (
        emulators(fly=None if local else fly or fly_emulator()) as urls,
        run_dispatcher(tmp_path, urls, env=env, local=local) as stack,
    ):
        values = (
            dispatcher_env(
                fly_url=urls.fly_url,
                daily_url=urls.daily_url,
                dispatcher_url=stack.url,
                db=f"sqlite:///{tmp_path}/dispatcher.db",
            )
            | ({"LOCAL_BOT_DIR": str(TESTBOT_DIR)} if local else {})
            | (env or {})
        )
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        yield stack, values


async def cli(*argv: str) -> tuple[int, str]:
    """`dispatcher ARGV` in-process (in a thread: the emulators answer on this loop)."""
    out = io.StringIO()

    def call() -> int:
        with contextlib.redirect_stdout(out):
            return main(list(argv))

    code = await asyncio.to_thread(call)
    return code, out.getvalue()


async def cli_json(*argv: str) -> Any:
    code, out = await cli(*argv, "--json")
    assert code == 0, out
    return json.loads(out)


def steps(trace: dict[str, Any]) -> list[str]:
    return [s["step"] for s in trace["steps"]]


def step(trace: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in trace["steps"] if s["step"] == name)


def assert_ordered(names: list[str], *expected: str) -> None:
    positions = [names.index(n) for n in expected]
    assert positions == sorted(positions), names


async def assert_table_names_steps(trace: dict[str, Any], sid: str) -> None:
    code, table = await cli("trace", sid)
    assert code == 0
    assert f"trace {trace['session']['traceId']}" in table.splitlines()[0]
    for name in steps(trace):
        assert name in table, (name, table)


async def test_trace_of_a_normal_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ready, then DELETE: the store's states, Fly's launch/start/exit, the room; also run as
    `python -m dispatcher trace` in a process of its own; a purged machine is said so."""
    async with oncall_stack(tmp_path, monkeypatch) as (stack, env):
        sid = (await stack.start()).json()["sessionId"]
        await stack.wait_state(sid, "ready")
        await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
        session = await stack.wait_state(sid, "ended")

        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dispatcher",
            "trace",
            sid,
            "--json",
            env={"PATH": os.environ["PATH"], **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        trace = json.loads(out)
        names = steps(trace)
        assert_ordered(
            names,
            "state starting",
            "machine launch (created)",
            "state dispatched",
            "state ready",
            "state ending",
            "machine exit (stopped)",
            "state ended",
        )
        assert step(trace, "state ending")["details"] == {"reason": "deleted", "by": "user-1"}
        assert step(trace, "machine exit (stopped)")["details"]["exit_code"] == 0
        assert any(s["source"] == "daily" and s["step"].startswith("room ") for s in trace["steps"])
        assert trace["session"]["machineId"] == session["machineId"]
        # The trace id to look the session up by in the tracing backend and the logs: its
        # bot's TRACEPARENT's.
        assert stack.fly is not None
        machine = stack.fly.machines[session["machineId"]]
        assert trace["session"]["traceId"] == machine.config["env"]["TRACEPARENT"].split("-")[1]
        assert trace["session"]["endRequestedAt"] is not None
        times = [s["at"] for s in trace["steps"]]
        assert times == sorted(times)
        assert trace["steps"][0]["sincePrevious"] is None
        assert all(s["sinceRequest"] is not None for s in trace["steps"])
        await assert_table_names_steps(trace, sid)

        assert stack.fly is not None
        stack.fly.machines.pop(session["machineId"])
        purged = await cli_json("trace", sid)
        assert not [s for s in purged["steps"] if s["source"] == "fly"]
        assert any("no longer knows machine" in note for note in purged["notes"])
        assert "state ended" in steps(purged)


@pytest.mark.parametrize("shape", ["exit_event", "MonitorEvent"])
async def test_trace_of_a_crash_before_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    """A bot that exits 3 before ready: Fly's exit event with code 3 (in either of its shapes),
    then the failed state."""
    fly = fly_emulator(exit_event_shape=shape)
    async with oncall_stack(tmp_path, monkeypatch, fly=fly) as (stack, _):
        sid = (await stack.start({"testBot": {"exit_before_ready": 3}})).json()["sessionId"]
        await stack.wait_state(sid, "failed")
        trace = await cli_json("trace", sid)
        names = steps(trace)
        assert "state ready" not in names
        assert_ordered(names, "state starting", "machine start (started)", "machine exit (stopped)")
        assert_ordered(names, "machine exit (stopped)", "state failed")
        exit = step(trace, "machine exit (stopped)")["details"]
        assert exit["exit_code"] == 3 and exit["requested_stop"] is False
        assert step(trace, "state failed")["details"]["exit_code"] == 3
        assert trace["session"]["exitCode"] == 3
        await assert_table_names_steps(trace, sid)
        code, table = await cli("trace", sid)
        assert code == 0 and "exit_code=3" in table
        print(table)  # docs/operations.md's example comes from this output (pytest -s)


@pytest.mark.slow
async def test_trace_of_a_session_ended_by_max_duration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bot that outlives its time: ending with max_duration, Fly's stop, a requested exit."""
    env = {"SESSION_MAX_DURATION_S": "2"}
    async with oncall_stack(tmp_path, monkeypatch, env) as (stack, _):
        sid = (await stack.start({"testBot": {"ignore_max_duration": True}})).json()["sessionId"]
        await stack.wait_state(sid, "ended", timeout=30)
        trace = await cli_json("trace", sid)
        names = steps(trace)
        assert_ordered(
            names,
            "state ready",
            "state ending",
            "machine stop (stopping)",
            "machine exit (stopped)",
            "state ended",
        )
        assert step(trace, "state ending")["details"]["reason"] == "max_duration"
        assert step(trace, "machine exit (stopped)")["details"]["requested_stop"] is True
        assert trace["session"]["endReason"] == "max_duration"
        await assert_table_names_steps(trace, sid)


async def test_show_and_trace_give_the_bots_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error of the bot's ended report is in `sessions show` and `trace`, JSON and text:
    on the session, in its summary and on the bot's ended step, on one line."""
    error = "ValueError: no such voice\n  known voices: alloy, echo"
    one_line = "ValueError: no such voice\\n  known voices: alloy, echo"
    async with oncall_stack(tmp_path, monkeypatch) as (stack, _):
        body = {"testBot": {"skip_ready": True, "no_ended": True}}
        sid = (await stack.start(body)).json()["sessionId"]
        ready = await stack.http.post(
            f"/internal/sessions/{sid}/ready", headers=stack.bot_headers(sid)
        )
        assert ready.status_code == 200
        ended = await stack.bot_ended(sid, reason="crashed", exit_code=1, error=error)
        assert ended.status_code == 200, ended.text
        # Its bot still runs: the follow stops it after the stop's grace period. Read once all
        # is over (its room deleted too), so that every reading below sees the same trace.
        await stack.wait_state(sid, "failed", "ended")
        assert stack.daily is not None
        await eventually(lambda: sid not in stack.daily.rooms, what="its room deleted")

        shown = await cli_json("sessions", "show", sid)
        assert shown["session"]["error"] == error
        (ending,) = [e for e in shown["events"] if e["state"] == "ending"]
        assert ending["details"] == {
            "source": "bot",
            "reason": "crashed",
            "exit_code": 1,
            "error": error,
        }
        code, text = await cli("sessions", "show", sid)
        assert code == 0
        assert f"error:          {one_line}" in text.splitlines()
        assert f"error={one_line}" in text

        trace = await cli_json("trace", sid)
        assert trace["session"]["error"] == error
        assert step(trace, "state ending")["details"]["error"] == error
        code, table = await cli("trace", sid)
        assert code == 0
        assert table.splitlines()[1] == f"error: {one_line}"
        (row,) = [line for line in table.splitlines() if "state ending" in line]
        assert row.endswith(f"source=bot reason=crashed exit_code=1 error={one_line}")
        await assert_table_names_steps(trace, sid)


@pytest.mark.slow
async def test_sessions_list_show_and_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sessions list` filters, `sessions show`, `sessions stop` ends a running session as the
    operator (its machine destroyed), and an unknown id exits 1."""
    async with oncall_stack(tmp_path, monkeypatch) as (stack, _):
        first = (await stack.start(user="user-1")).json()["sessionId"]
        second = (await stack.start(user="user-2")).json()["sessionId"]
        await stack.wait_state(first, "ready")
        await stack.wait_state(second, "ready", user="user-2")

        assert {s["sessionId"] for s in await cli_json("sessions", "list")} == {first, second}
        mine = await cli_json("sessions", "list", "--user", "user-2")
        assert [s["sessionId"] for s in mine] == [second]
        assert len(await cli_json("sessions", "list", "--state", "ready", "--since", "1h")) == 2
        assert await cli_json("sessions", "list", "--state", "ended") == []
        assert len(await cli_json("sessions", "list", "--limit", "1")) == 1
        code, table = await cli("sessions", "list")
        assert code == 0 and first in table and second in table and "reason" in table

        code, out = await cli("sessions", "stop", first)
        assert code == 0 and "ready -> ending" in out and "SIGTERM" in out
        ended = await stack.wait_state(first, "ended")
        assert ended["endReason"] == "deleted"
        assert stack.fly is not None
        machine = stack.fly.machines[ended["machineId"]]
        await eventually(lambda: machine.state == "destroyed", what="machine destroyed")
        code, out = await cli("sessions", "stop", first)
        assert code == 0 and "already ended" in out

        shown = await cli_json("sessions", "show", first)
        assert shown["session"]["state"] == "ended"
        ending = [e for e in shown["events"] if e["state"] == "ending"]
        assert ending[0]["details"] == {"reason": "deleted", "by": "operator"}
        code, text = await cli("sessions", "show", first)
        assert code == 0 and "by=operator" in text
        ended_list = await cli_json("sessions", "list", "--state", "ended")
        assert [s["sessionId"] for s in ended_list] == [first]

        for command in (("sessions", "show"), ("sessions", "stop"), ("trace",)):
            code, out = await cli(*command, "s-unknown")
            assert code == 1 and "no session s-unknown" in out

        await cli("sessions", "stop", second)
        await stack.wait_state(second, "ended", user="user-2")


def test_durations() -> None:
    """`--since` takes seconds, minutes, hours and days."""
    from dispatcher.oncall import duration

    assert [duration(d) for d in ("90s", "30m", "1h", "2d")] == [90, 1800, 3600, 172800]
    with pytest.raises(Exception, match="not a duration"):
        duration("1 week")
