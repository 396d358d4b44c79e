"""The test bot image plays the bot contract offline, scripted by SESSION_BODY's `testBot`."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from testkit.fakes import TESTBOT_DIR
from testkit.fakes.recorder import (
    CALLBACK_TOKEN,
    DAILY_TOKEN,
    ROOM_URL,
    TRACEPARENT,
    CallbackRecorder,
    contract_env,
)
from testkit.waits import eventually
from tests.test_bot_pool import DROP, HANG, AssignmentServer


class BotProcess:
    """The test bot run as its image would be: `python -m bot_runtime --room-url URL`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(
        cls,
        env: Mapping[str, str],
        room_url: str = ROOM_URL,
        script: dict[str, Any] | None = None,
        argv: Sequence[str] | None = None,
    ) -> BotProcess:
        """Start it with the contract `env` and an optional `testBot` script; `argv` replaces
        `--room-url room_url` (a pooled machine has none)."""
        full_env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(TESTBOT_DIR),
            **env,
        }
        if script is not None:
            full_env["SESSION_BODY"] = json.dumps({"testBot": script})
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot_runtime",
            *(("--room-url", room_url) if argv is None else argv),
            cwd=TESTBOT_DIR,
            env=full_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def wait_for_line(self, fragment: str, timeout_s: float = 10.0) -> str:
        """The first stdout line containing `fragment` (failing with what it printed instead)."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while line := (await self.proc.stdout.readline()).decode():
                    self.lines.append(line.rstrip("\n"))
                    if fragment in line:
                        return line
        except TimeoutError:
            pass
        raise AssertionError(f"no line with {fragment!r} in: {self.output()}")

    async def exit_code(self, timeout_s: float = 10.0) -> int:
        """Wait for it to exit; its exit code (stdout read to the end)."""
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout_s)
        self.lines += out.decode().splitlines()
        assert not err, err.decode()
        assert self.proc.returncode is not None
        return self.proc.returncode

    def output(self) -> str:
        """Everything it printed."""
        return "\n".join(self.lines)


async def test_default_session_ready_then_sigterm(recorder: CallbackRecorder) -> None:
    """By default it calls ready, waits, and on SIGTERM calls ended "sigterm" and exits 0."""
    bot = await BotProcess.start(contract_env(recorder.url))
    await bot.wait_for_line("ready status=204")
    ready = await recorder.wait_for("ready")
    assert ready.session_id == "s-test1"
    assert ready.authorization == f"Bearer {CALLBACK_TOKEN}"
    assert ready.traceparent == TRACEPARENT
    assert ready.body == {}
    bot.proc.send_signal(signal.SIGTERM)
    assert await bot.exit_code() == 0
    ended = recorder.of("ended")
    assert [c.body for c in ended] == [{"reason": "sigterm", "exit_code": 0}]
    assert ended[0].authorization == f"Bearer {CALLBACK_TOKEN}"
    assert "testbot session=s-test1 ready status=204" in bot.output()
    assert CALLBACK_TOKEN not in bot.output()
    assert DAILY_TOKEN not in bot.output()


async def test_exit_before_ready(recorder: CallbackRecorder) -> None:
    """`exit_before_ready` exits with that code without ready, after ended "crashed"."""
    bot = await BotProcess.start(contract_env(recorder.url), script={"exit_before_ready": 7})
    assert await bot.exit_code() == 7
    assert recorder.of("ready") == []
    assert [c.body for c in recorder.of("ended")] == [{"reason": "crashed", "exit_code": 7}]


async def test_skip_ready_then_sigterm(recorder: CallbackRecorder) -> None:
    """`skip_ready` never calls ready, yet still ends cleanly on SIGTERM."""
    bot = await BotProcess.start(contract_env(recorder.url), script={"skip_ready": True})
    await bot.wait_for_line("ready skipped")
    bot.proc.send_signal(signal.SIGTERM)
    assert await bot.exit_code() == 0
    assert recorder.of("ready") == []
    assert [c.body for c in recorder.of("ended")] == [{"reason": "sigterm", "exit_code": 0}]


@pytest.mark.parametrize(
    ("code", "reason"), [(5, "crashed"), (0, "completed")], ids=["crash", "clean"]
)
async def test_exit_after_ready(recorder: CallbackRecorder, code: int, reason: str) -> None:
    """`exit_after_s` exits that long after ready with `exit_code`, ended "crashed"/"completed"."""
    script = {"exit_after_s": 0.05, "exit_code": code, "ready_delay_s": 0}
    bot = await BotProcess.start(contract_env(recorder.url), script=script)
    assert await bot.exit_code() == code
    assert len(recorder.of("ready")) == 1
    assert [c.body for c in recorder.of("ended")] == [{"reason": reason, "exit_code": code}]


async def test_max_duration(recorder: CallbackRecorder) -> None:
    """With no signal, it ends itself at SESSION_MAX_DURATION_S with ended "max_duration"."""
    bot = await BotProcess.start(contract_env(recorder.url, SESSION_MAX_DURATION_S="1"))
    assert await bot.exit_code() == 0
    assert [c.body for c in recorder.of("ended")] == [{"reason": "max_duration", "exit_code": 0}]


async def test_ignore_sigterm_and_no_ended(recorder: CallbackRecorder) -> None:
    """`ignore_sigterm` keeps it running after SIGTERM; `no_ended` keeps it from calling ended."""
    script = {"ignore_sigterm": True, "no_ended": True, "exit_after_s": 0.5}
    bot = await BotProcess.start(contract_env(recorder.url), script=script)
    await bot.wait_for_line("ready status=204")
    bot.proc.send_signal(signal.SIGTERM)
    await bot.wait_for_line("sigterm ignored")
    assert bot.proc.returncode is None
    assert await bot.exit_code() == 0
    assert recorder.of("ended") == []
    assert "ended skipped reason=completed" in bot.output()


@pytest.mark.parametrize(
    "missing", ["SESSION_ID", "DAILY_TOKEN", "SESSION_MAX_DURATION_S", "TRACEPARENT"]
)
async def test_missing_variable_is_a_bad_contract(recorder: CallbackRecorder, missing: str) -> None:
    """A missing contract variable exits 3, with ended "bad_contract" when it can be sent."""
    bot = await BotProcess.start(contract_env(recorder.url, **{missing: None}))
    assert await bot.exit_code() == 3
    assert f"bad_contract missing={missing}" in bot.output()
    assert recorder.of("ready") == []
    if missing == "SESSION_ID":
        assert recorder.calls == []
    else:
        assert [c.body for c in recorder.of("ended")] == [
            {"reason": "bad_contract", "exit_code": 3}
        ]


async def test_room_url_mismatch_is_a_bad_contract(recorder: CallbackRecorder) -> None:
    """A `--room-url` other than DAILY_ROOM_URL exits 3 with ended "bad_contract"."""
    bot = await BotProcess.start(contract_env(recorder.url), room_url=ROOM_URL + "-other")
    assert await bot.exit_code() == 3
    assert "bad_contract room_url_mismatch" in bot.output()
    assert [c.body for c in recorder.of("ended")] == [{"reason": "bad_contract", "exit_code": 3}]


async def test_callbacks_retry_server_errors(recorder: CallbackRecorder) -> None:
    """A 503 from the dispatcher is retried, and the callback then gets through."""
    recorder.statuses = [503]
    bot = await BotProcess.start(contract_env(recorder.url), script={"ready_delay_s": 0})
    await bot.wait_for_line("ready status=204")
    bot.proc.send_signal(signal.SIGTERM)
    assert await bot.exit_code() == 0
    assert len(recorder.of("ready")) == 2
    assert "ready attempt=1 failed=503" in bot.output()


# Pooled: POOL_TOKEN and no SESSION_ID, then the assignment's long poll (tests/test_bot_pool.py).

POOL_TOKEN = "pool-secret-token-0123456789"
MACHINE_ID = "3d8d9e7b5e1118"


@pytest.fixture
async def assignments() -> AsyncIterator[AssignmentServer]:
    """An assignment server on loopback."""
    server = AssignmentServer()
    async with server.serving():
        yield server


async def start_pooled(server: AssignmentServer, **extra: str) -> BotProcess:
    """The test bot as a pooled machine: no session, no command line."""
    env = {
        "DISPATCHER_URL": server.url,
        "POOL_TOKEN": POOL_TOKEN,
        "BOT_TRANSPORT": "daily",
        "FLY_MACHINE_ID": MACHINE_ID,
        **extra,
    }
    return await BotProcess.start(env, argv=())


def daily_assignment(recorder: CallbackRecorder, script: dict[str, Any]) -> dict[str, Any]:
    """Session s-test1 over Daily, scripted by `script`."""
    env = contract_env(recorder.url, SESSION_BODY=json.dumps({"testBot": script}))
    return {"env": env, "args": ["--room-url", ROOM_URL]}


async def test_pooled_boots_then_plays_its_assignment(
    recorder: CallbackRecorder, assignments: AssignmentServer
) -> None:
    """After its simulated boot it asks with its token at its machine's path, asks again
    after a 204, then plays the assigned session (its script from the assigned SESSION_BODY)
    with the assigned callback token; no token is printed."""
    assignments.script = [204]
    bot = await start_pooled(assignments, TESTBOT_BOOT_S="0.1")
    await bot.wait_for_line("boot_s=0.1")
    await bot.wait_for_line("asking")
    await assignments.polled(2)
    assignments.assign(daily_assignment(recorder, {"ready_delay_s": 0}))
    await bot.wait_for_line("ready status=204")
    bot.proc.send_signal(signal.SIGTERM)
    assert await bot.exit_code() == 0
    for poll in assignments.polls:
        assert poll.path == f"/internal/machines/{MACHINE_ID}/assignment"
        assert poll.authorization == f"Bearer {POOL_TOKEN}"
        assert poll.query["wait"] == ["5"]
    ready = recorder.of("ready")
    assert [c.authorization for c in ready] == [f"Bearer {CALLBACK_TOKEN}"]
    assert [c.body for c in recorder.of("ended")] == [{"reason": "sigterm", "exit_code": 0}]
    assert "assigned session=s-test1" in bot.output()
    assert POOL_TOKEN not in bot.output()
    assert CALLBACK_TOKEN not in bot.output()


@pytest.mark.parametrize(
    ("answer", "code", "line"),
    [(410, 0, "retired"), (401, 2, "pool_refused status=401"), (404, 2, "status=404")],
    ids=["retired", "unauthorized", "unknown-machine"],
)
async def test_pooled_final_answers_exit_without_callbacks(
    recorder: CallbackRecorder, assignments: AssignmentServer, answer: int, code: int, line: str
) -> None:
    """410 exits 0, 401 and 404 exit 2; none calls back or asks again."""
    assignments.script = [answer]
    bot = await start_pooled(assignments)
    assert await bot.exit_code() == code
    assert line in bot.output()
    assert len(assignments.polls) == 1
    assert recorder.calls == []


async def test_pooled_retries_errors_and_dropped_connections(
    recorder: CallbackRecorder, assignments: AssignmentServer
) -> None:
    """A 503 and a connection closed without an answer are asked again; the assignment that
    follows is played."""
    assignments.script = [503, DROP]
    bot = await start_pooled(assignments)
    await assignments.polled(3)
    assignments.assign(daily_assignment(recorder, {"exit_after_s": 0, "ready_delay_s": 0}))
    assert await bot.exit_code() == 0
    assert "assignment attempt=1 failed=503" in bot.output()
    assert "assignment attempt=2 failed=" in bot.output()
    assert [c.body for c in recorder.of("ended")] == [{"reason": "completed", "exit_code": 0}]


@pytest.mark.parametrize("boot_s", ["0", "30"], ids=["waiting", "booting"])
async def test_pooled_sigterm_before_assignment_exits_0(
    recorder: CallbackRecorder, assignments: AssignmentServer, boot_s: str
) -> None:
    """SIGTERM during the boot or the long poll exits 0 at once without a callback."""
    bot = await start_pooled(assignments, TESTBOT_BOOT_S=boot_s)
    await bot.wait_for_line(f"boot_s={float(boot_s)}")
    if boot_s == "0":
        await assignments.polled()
    bot.proc.send_signal(signal.SIGTERM)
    assert await bot.exit_code() == 0
    assert "sigterm before assignment" in bot.output()
    assert recorder.calls == []
    assert len(assignments.polls) == (1 if boot_s == "0" else 0)


def stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T in /proc/<pid>/stat)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize("poll", ["hangs", "fails"])
async def test_pooled_frozen_while_waiting_asks_again_once_resumed(
    recorder: CallbackRecorder, assignments: AssignmentServer, poll: str
) -> None:
    """Frozen (SIGSTOP) with a poll whose connection never answers, then resumed (SIGCONT),
    it notices the pause, asks again and plays the assignment. The same when the poll failed
    while it was frozen (its connection closed, as a socket timeout does after a long freeze):
    the failure is the pause's."""
    assignments.script = [HANG]
    bot = await start_pooled(assignments)
    await assignments.polled()
    bot.proc.send_signal(signal.SIGSTOP)
    try:
        assignments.assign(daily_assignment(recorder, {"exit_after_s": 0, "ready_delay_s": 0}))
        if poll == "fails":
            # Only once the kernel has stopped it: a close seen before would be a plain error.
            await eventually(lambda: stopped(bot.proc.pid), what="the bot stopped")
            await assignments.hang_up()
        await asyncio.sleep(2.0)  # A freeze longer than the pause threshold (1 s).
    finally:
        bot.proc.send_signal(signal.SIGCONT)
    assert await bot.exit_code() == 0
    assert "paused s=" in bot.output()
    assert len(assignments.polls) == 2
    assert len(recorder.of("ready")) == 1
