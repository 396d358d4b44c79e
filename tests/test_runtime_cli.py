"""`python -m bot_runtime` as a process: the contract, broken entry points, errors, logs, ends.

Each test starts the runtime with a contract environment whose callbacks go to a recorder, and
a bot file of its own (written to tmp_path) or the example bot. Daily sessions here use the real
daily-python against an address nobody listens on, so the join hangs as it does against an
unreachable Daily.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from testkit.bot_process import (
    BOOT_TIMEOUT_S,
    ROOT,
    SESSION_ID,
    STOP_TIMEOUT_S,
    webrtc_env,
)
from testkit.fakes.recorder import CALLBACK_TOKEN, DAILY_TOKEN, CallbackRecorder, contract_env
from testkit.net import free_port

UNREACHABLE_ROOM = "http://127.0.0.1:9/s-test1"


def runtime_env(contract: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """A process environment for the runtime: PATH, the contract, and `extra`."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(contract or {}), **extra}


async def runtime(env: dict[str, str], *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot_runtime",
        *argv,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finished(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """The exit code and everything printed, once the process exits."""
    out, err = await asyncio.wait_for(proc.communicate(), BOOT_TIMEOUT_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def json_lines(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith('{"ts"')]


def bot_file(tmp_path: Path, text: str, name: str = "team_bot.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


async def test_without_a_contract_it_exits_2_naming_the_variable(
    recorder: CallbackRecorder,
) -> None:
    """With no contract environment the runtime exits 2, naming the missing variable, and
    calls nothing back (there is no session to call back for)."""
    code, output = await finished(await runtime(runtime_env(), "--room-url", UNREACHABLE_ROOM))
    assert code == 2
    assert "missing environment variable SESSION_ID" in output
    assert recorder.calls == []


async def test_a_missing_callback_token_makes_no_callback(recorder: CallbackRecorder) -> None:
    """A missing BOT_CALLBACK_TOKEN exits 2 naming it, and calls nothing back."""
    env = contract_env(recorder.url, DAILY_ROOM_URL=UNREACHABLE_ROOM, BOT_CALLBACK_TOKEN=None)
    code, output = await finished(await runtime(runtime_env(env)))
    assert code == 2
    assert "BOT_CALLBACK_TOKEN" in output
    assert recorder.calls == []


async def test_a_contract_error_with_a_callback_ends_the_session_at_once(
    recorder: CallbackRecorder,
) -> None:
    """A malformed variable with the callback's own variables present: exit 2, and `ended`
    says contract_error with the variable's name."""
    env = contract_env(recorder.url, SESSION_MAX_DURATION_S="soon")
    code, _ = await finished(await runtime(runtime_env(env)))
    assert code == 2
    [ended] = recorder.of("ended")
    assert (ended.body["reason"], ended.body["exit_code"]) == ("contract_error", 2)
    assert "SESSION_MAX_DURATION_S" in ended.body["error"]


BROKEN = {
    "missing-file": (None, "no such file"),
    "not-async": ("def bot(runner_args):\n    pass\n", "is not an async function"),
    "no-such-function": ("async def run(runner_args):\n    pass\n", "has no function 'bot'"),
    "raises-at-import": ("raise RuntimeError('no model file')\n", "RuntimeError: no model file"),
    "syntax-error": ("async def bot(runner_args)\n", "SyntaxError"),
    "missing-dependency": ("import not_installed_anywhere\n", "ModuleNotFoundError"),
}


@pytest.mark.parametrize("kind", BROKEN)
async def test_a_broken_entry_point_fails_the_session_in_its_own_words(
    kind: str, recorder: CallbackRecorder, tmp_path: Path
) -> None:
    """Each broken entry point exits 2 at once, and `ended` says entrypoint_error with the
    problem in its own words; the bot never reports ready."""
    text, words = BROKEN[kind]
    path = tmp_path / "team_bot.py" if text is None else bot_file(tmp_path, text)
    env = contract_env(recorder.url, DAILY_ROOM_URL=UNREACHABLE_ROOM)
    code, output = await finished(await runtime(runtime_env(env, BOT_ENTRYPOINT=str(path))))
    assert code == 2, output
    [ended] = recorder.calls
    assert (ended.operation, ended.body["reason"], ended.body["exit_code"]) == (
        "ended",
        "entrypoint_error",
        2,
    )
    assert words in ended.body["error"] and str(path) in ended.body["error"]
    assert CALLBACK_TOKEN not in output


async def test_check_says_whether_the_entry_point_can_run(tmp_path: Path) -> None:
    """`--check` imports BOT_ENTRYPOINT: exit 0 for a runnable bot, 2 with the reason else."""
    good = bot_file(tmp_path, "async def bot(runner_args):\n    pass\n")
    code, output = await finished(await runtime(runtime_env(BOT_ENTRYPOINT=str(good)), "--check"))
    assert (code, "ready to run" in output) == (0, True)
    bad = bot_file(tmp_path, "def bot(runner_args):\n    pass\n", "bad_bot.py")
    code, output = await finished(await runtime(runtime_env(BOT_ENTRYPOINT=str(bad)), "--check"))
    assert (code, "is not an async function" in output) == (2, True)


async def test_an_exception_in_bot_is_exit_1_with_its_error(
    recorder: CallbackRecorder, tmp_path: Path
) -> None:
    """`bot()` raising exits 1; `ended` says error, with the exception's type and message and
    no secret of the session's."""
    path = bot_file(
        tmp_path,
        "import os\n"
        "async def bot(runner_args):\n"
        "    raise ValueError(f'no voice for token {os.environ[\"DAILY_TOKEN\"]}')\n",
    )
    env = contract_env(recorder.url, DAILY_ROOM_URL=UNREACHABLE_ROOM)
    code, output = await finished(await runtime(runtime_env(env, BOT_ENTRYPOINT=str(path))))
    assert code == 1, output
    [ended] = recorder.of("ended")
    assert ended.body == {
        "reason": "error",
        "exit_code": 1,
        "error": "ValueError: no voice for token [redacted]",
    }
    assert DAILY_TOKEN not in output


async def test_log_lines_of_loguru_and_the_stdlib_carry_the_session(
    recorder: CallbackRecorder, tmp_path: Path
) -> None:
    """A bot's loguru and standard-library lines (Pipecat's and its own) become JSON lines
    with the session's ID, its module-level logging set-up notwithstanding; `bot()` returning
    on its own is `completed`, exit 0."""
    path = bot_file(
        tmp_path,
        "import logging, sys\n"
        "from loguru import logger\n"
        "logger.remove(0)\n"
        "logger.add(sys.stderr, level='DEBUG')\n"
        "async def bot(runner_args):\n"
        "    logging.getLogger('team.stdlib').warning('from the stdlib')\n"
        "    logger.info(f'from loguru, body {runner_args.body}')\n",
    )
    env = contract_env(recorder.url, DAILY_ROOM_URL=UNREACHABLE_ROOM, SESSION_BODY='{"k": 1}')
    code, output = await finished(await runtime(runtime_env(env, BOT_ENTRYPOINT=str(path))))
    assert code == 0, output
    lines = {line["msg"]: line for line in json_lines(output)}
    assert lines["from the stdlib"]["logger"] == "team.stdlib"
    assert lines["from loguru, body {'k': 1}"]["session_id"] == SESSION_ID
    assert all(line["session_id"] == SESSION_ID for line in lines.values())
    assert [c.body for c in recorder.of("ended")] == [{"reason": "completed", "exit_code": 0}]


async def test_sigterm_during_a_hanging_join_ends_within_the_stop_timeout(
    recorder: CallbackRecorder,
) -> None:
    """SIGTERM while the example's Daily join hangs still sends ended "sigterm" and exits 0
    within the dispatcher's stop timeout; the logs are JSON with the session's ID and no
    token."""
    env = contract_env(recorder.url, DAILY_ROOM_URL=UNREACHABLE_ROOM)
    proc = await runtime(runtime_env(env), "--room-url", UNREACHABLE_ROOM)
    assert proc.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(BOOT_TIMEOUT_S):
        while not any("Joining" in line for line in lines):
            lines.append((await proc.stderr.readline()).decode())
            assert lines[-1], f"the bot exited early: {lines}"
    proc.send_signal(signal.SIGTERM)
    out, rest = await asyncio.wait_for(proc.communicate(), STOP_TIMEOUT_S)
    assert proc.returncode == 0
    assert [c.body for c in recorder.of("ended")] == [{"reason": "sigterm", "exit_code": 0}]
    assert recorder.of("ended")[0].authorization == f"Bearer {CALLBACK_TOKEN}"
    logs = "".join(lines) + rest.decode() + out.decode()
    assert CALLBACK_TOKEN not in logs and DAILY_TOKEN not in logs
    ours = json_lines(logs)
    assert ours and all(line["session_id"] == SESSION_ID for line in ours)


@pytest.mark.slow
async def test_the_idle_timeout_ends_the_session(recorder: CallbackRecorder) -> None:
    """BOT_IDLE_TIMEOUT_S reaches the example's worker (a webrtc session nobody joins): idle,
    the session ends idle_timeout, exit 0."""
    env = webrtc_env(recorder.url, free_port())
    code, output = await finished(
        await runtime(runtime_env(env, BOT_IDLE_TIMEOUT_S="1"), "--transport", "webrtc")
    )
    assert code == 0, output
    assert [c.body for c in recorder.of("ended")] == [{"reason": "idle_timeout", "exit_code": 0}]
