"""A pooled bot boots and loads everything, then long-polls its assignment and runs that session.

The real bot runs pooled (POOL_TOKEN, no SESSION_ID) against `AssignmentServer`, a scripted
stand-in for the dispatcher's `GET /internal/machines/{id}/assignment`; the session it is
assigned is a webrtc one (offline), whose callbacks go to the callback recorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from bot_runtime.outcome import EXIT_CONFIG
from bot_runtime.pool import (
    Assignment,
    AssignmentClient,
    AssignmentError,
    AssignmentWaiter,
    PoolEnv,
    is_pooled,
)
from testkit.bot_process import (
    BOOT_TIMEOUT_S,
    ROOT,
    SESSION_ID,
    BotProcess,
    webrtc_env,
)
from testkit.fakes.recorder import CALLBACK_TOKEN, TRACEPARENT, CallbackRecorder
from testkit.net import free_port
from testkit.otlp_collector import OtlpCollector
from testkit.waits import eventually
from tests.bots import OWN_TRANSPORT
from tests.fixtures.peer import Peer, Speaker, utterance

POOL_TOKEN = "pool-secret-token-0123456789"
MACHINE_ID = "148ed193b95e89"
ASSIGNMENT_PATH = f"/internal/machines/{MACHINE_ID}/assignment"
DROP = "drop"  # close the connection without an answer
HANG = "hang"  # never answer (a connection that died while the machine was frozen)
Answer = int | str | dict[str, Any]


@dataclass
class Poll:
    """One request the assignment server received."""

    path: str
    query: dict[str, list[str]]
    authorization: str | None


@dataclass
class AssignmentServer:
    """The dispatcher's assignment endpoint over raw HTTP/1.1, scripted.

    `script` is answered first, in order: a status (errors with a JSON body), a 200's body,
    DROP or HANG. Then it behaves as the dispatcher: the assignment once `assign`ed, else a
    204 after the request's `wait`. `on_poll` runs as each request arrives.
    """

    script: list[Answer] = field(default_factory=list)
    polls: list[Poll] = field(default_factory=list)
    on_poll: Callable[[Poll], None] | None = None
    url: str = ""
    _assignment: dict[str, Any] | None = None
    _assigned: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    def assign(self, body: dict[str, Any]) -> None:
        """Answer this assignment from now on."""
        self._assignment = body
        self._assigned.set()

    async def hang_up(self) -> None:
        """Close every connection being held (a HANG), without an answer."""
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def polled(self, count: int = 1, timeout_s: float = BOOT_TIMEOUT_S) -> Poll:
        """The `count`-th request, once it has arrived."""
        async with asyncio.timeout(timeout_s):
            while len(self.polls) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.polls[count - 1]

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        """Listen on loopback; yields the dispatcher URL."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._handlers.add(task)
            try:
                await self._handle(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self._handlers.discard(task)
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self.url
        finally:
            server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *lines = head.split("\r\n")
        target = urlsplit(request_line.split(" ")[1])
        headers = dict(line.split(":", 1) for line in lines if ":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        poll = Poll(target.path, parse_qs(target.query), headers.get("authorization"))
        self.polls.append(poll)
        if self.on_poll is not None:
            self.on_poll(poll)
        self._arrived.set()
        answer = self.script.pop(0) if self.script else None
        if answer == DROP:
            return
        if answer == HANG:
            await asyncio.Event().wait()
        if answer is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._assigned.wait(), float(poll.query["wait"][0]))
            answer = self._assignment or 204
        status, body = (200, answer) if isinstance(answer, dict) else (int(answer), None)
        if body is None and status != 204:
            body = {"detail": f"status {status}", "code": ERROR_CODES.get(status, "error")}
        raw = b"" if body is None else json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n".encode()
            + raw
        )
        await writer.drain()


ERROR_CODES = {410: "pool-machine-retired", 401: "unauthorized", 404: "machine-not-found"}


@pytest.fixture
async def assignments() -> AsyncIterator[AssignmentServer]:
    """An assignment server on loopback."""
    server = AssignmentServer()
    async with server.serving():
        yield server


def session_env(recorder: CallbackRecorder, port: int) -> dict[str, str]:
    """The contract env of a webrtc session s-test1, as an assignment's `env`."""
    return webrtc_env(recorder.url, port)


def assignment(recorder: CallbackRecorder, port: int) -> dict[str, Any]:
    """An assignment's body: session s-test1 over webrtc on `port`."""
    return {"env": session_env(recorder, port), "args": ["--transport", "webrtc"]}


async def start_pooled(
    bots: list[BotProcess], server: AssignmentServer, tmp_path: Path, **extra: str
) -> BotProcess:
    """Start the real bot as a pooled machine (no session yet; Daily its machine's transport)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DISPATCHER_URL": server.url,
        "POOL_TOKEN": POOL_TOKEN,
        "BOT_TRANSPORT": "daily",
        "FLY_MACHINE_ID": MACHINE_ID,
        "FLY_REGION": "cdg",
        **extra,
    }
    with (tmp_path / "stdout.log").open("w") as out, (tmp_path / "stderr.log").open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot_runtime", cwd=ROOT, env=env, stdout=out, stderr=err
        )
    bot = BotProcess(proc, free_port(), tmp_path, httpx.AsyncClient(timeout=30))
    bots.append(bot)
    return bot


def log_lines(bot: BotProcess) -> list[dict[str, Any]]:
    """The bot's JSON log lines."""
    text = (bot.logs / "stderr.log").read_text()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def stop_session(bot: BotProcess, recorder: CallbackRecorder) -> None:
    """SIGTERM the bot's running session: it must end "sigterm" and exit 0."""
    assert await bot.listening(), bot.output()
    bot.proc.send_signal(signal.SIGTERM)
    assert await bot.exit_code() == 0, bot.output()
    ended = await recorder.wait_for("ended")
    assert ended.body == {"reason": "sigterm", "exit_code": 0}
    assert ended.authorization == f"Bearer {CALLBACK_TOKEN}"


@pytest.mark.slow
async def test_preloads_then_runs_its_assignment(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    assignments: AssignmentServer,
    tmp_path: Path,
) -> None:
    """The bot loads Pipecat, the bot's module and VAD before its first poll, asks with its
    token at its machine's path, asks again after 204s, then runs the assigned session: a peer
    connects (ready with the assigned callback token), SIGTERM ends it (ended). Log lines
    carry machine_id and `pooled`, the session's fields only from the assignment on; no token
    appears in the output."""
    seen_at_first_poll: list[str] = []
    assignments.script = [204, 204]
    bot = await start_pooled(bots, assignments, tmp_path)
    assignments.on_poll = lambda _poll: seen_at_first_poll.append(bot.output())
    await assignments.polled(3)
    assert "Preloaded in" in seen_at_first_poll[0]
    assignments.assign(assignment(recorder, bot.port))

    peer = Peer(Speaker(utterance()))
    try:
        assert await bot.listening(), bot.output()
        await peer.connect(bot)
        ready = await recorder.wait_for("ready", timeout_s=30)
        assert ready.session_id == SESSION_ID
        assert ready.authorization == f"Bearer {CALLBACK_TOKEN}"
        assert ready.traceparent == TRACEPARENT
        # SIGTERM while the peer is still there: closing it first would end the session
        # "participant_left" whenever the bot saw the close before the signal.
        await stop_session(bot, recorder)
    finally:
        await peer.close()

    for poll in assignments.polls:
        assert poll.path == ASSIGNMENT_PATH
        assert poll.authorization == f"Bearer {POOL_TOKEN}"
        assert 1 <= int(poll.query["wait"][0]) <= 25
    lines = log_lines(bot)
    preloaded = next(i for i, line in enumerate(lines) if line["msg"].startswith("Preloaded"))
    assigned = next(i for i, line in enumerate(lines) if line["msg"].startswith("Assignment"))
    assert preloaded < assigned
    for line in lines[:assigned]:
        assert line["machine_id"] == MACHINE_ID and line["pooled"] is True, line
        assert "session_id" not in line, line
    for line in lines[assigned:]:
        assert line["session_id"] == SESSION_ID and line["machine_id"] == MACHINE_ID, line
    assert POOL_TOKEN not in bot.output()
    assert CALLBACK_TOKEN not in bot.output()


async def test_retired_machine_exits_0_without_callbacks(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    assignments: AssignmentServer,
    tmp_path: Path,
) -> None:
    """A 410 pool-machine-retired ends the bot with exit 0 and no callback."""
    assignments.script = [204, 410]
    bot = await start_pooled(bots, assignments, tmp_path)
    assert await bot.exit_code(BOOT_TIMEOUT_S) == 0, bot.output()
    assert len(assignments.polls) == 2
    assert recorder.calls == []
    assert "pool-machine-retired" in bot.output()


@pytest.mark.parametrize(
    "answer",
    [401, 404, {"env": {"SESSION_ID": 7}}, {"args": []}],
    ids=["401", "404", "env-not-strings", "no-env"],
)
async def test_refused_or_malformed_exits_2_without_callbacks(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    assignments: AssignmentServer,
    tmp_path: Path,
    answer: Answer,
) -> None:
    """A refused token, an unknown machine or a malformed assignment: exit 2, no callback,
    no second poll."""
    assignments.script = [answer]
    bot = await start_pooled(bots, assignments, tmp_path)
    assert await bot.exit_code(BOOT_TIMEOUT_S) == EXIT_CONFIG, bot.output()
    assert len(assignments.polls) == 1
    assert recorder.calls == []
    assert "misconfigured" in bot.output()
    assert POOL_TOKEN not in bot.output()


@pytest.mark.slow
async def test_server_errors_and_dropped_connections_are_retried(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    assignments: AssignmentServer,
    tmp_path: Path,
) -> None:
    """A 503, a 429 and a connection closed without an answer are asked again, and the
    assignment that follows runs."""
    assignments.script = [503, DROP, 429]
    bot = await start_pooled(bots, assignments, tmp_path)
    await assignments.polled(4)
    assignments.assign(assignment(recorder, bot.port))
    await stop_session(bot, recorder)
    assert bot.output().count("asking again in") == 3


@pytest.mark.slow
async def test_sigterm_while_waiting_exits_0_without_callbacks(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    assignments: AssignmentServer,
    tmp_path: Path,
) -> None:
    """SIGTERM while a poll is outstanding ends the bot with exit 0 and no callback."""
    bot = await start_pooled(bots, assignments, tmp_path)
    await assignments.polled()
    bot.proc.send_signal(signal.SIGTERM)
    assert await bot.exit_code() == 0, bot.output()
    assert recorder.calls == []
    assert "Stopped (sigterm) before any assignment" in bot.output()


@pytest.mark.slow
async def test_frozen_while_waiting_asks_again_once_resumed(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    assignments: AssignmentServer,
    tmp_path: Path,
) -> None:
    """A bot frozen (SIGSTOP) with its poll outstanding, whose connection never answers,
    notices the pause once resumed (SIGCONT), asks again and runs the assignment."""
    assignments.script = [HANG]
    bot = await start_pooled(bots, assignments, tmp_path)
    await assignments.polled()
    bot.proc.send_signal(signal.SIGSTOP)
    try:
        assignments.assign(assignment(recorder, bot.port))
        await asyncio.sleep(2.0)  # A freeze longer than the pause threshold (1 s).
    finally:
        bot.proc.send_signal(signal.SIGCONT)
    await stop_session(bot, recorder)
    assert len(assignments.polls) == 2
    assert "Paused for" in bot.output()


@pytest.mark.slow
async def test_traces_of_a_pooled_session_join_its_traceparent(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    assignments: AssignmentServer,
    tmp_path: Path,
    otlp_collector: OtlpCollector,
) -> None:
    """With tracing configured on the machine (the example bot's ENABLE_TRACING, set up at
    boot), the assigned session's spans are in its TRACEPARENT's trace, each carrying the
    session's and the machine's IDs, as a cold bot's."""
    bot = await start_pooled(
        bots,
        assignments,
        tmp_path,
        ENABLE_TRACING="1",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_collector.endpoint,
        LOG_LEVEL="DEBUG",
    )
    await assignments.polled()
    assignments.assign(assignment(recorder, bot.port))
    # Pipecat begins the conversation's span once the pipeline has started, in a task of its
    # own that may trail the port opening: stop the session after that.
    await eventually(
        lambda: "Started tracing for Conversation" in bot.output(),
        timeout=BOOT_TIMEOUT_S,
        what="the conversation's tracing to begin",
    )
    await stop_session(bot, recorder)
    spans = otlp_collector.spans()
    trace_id = TRACEPARENT.split("-")[1]
    assert {s["trace_id"] for s in spans} == {trace_id}, spans
    assert {"conversation", "bot.ended"} <= {s["name"] for s in spans}
    for span in spans:
        assert span["attributes"]["session.id"] == SESSION_ID
        assert span["attributes"]["fly.machine.id"] == MACHINE_ID


@pytest.mark.slow
async def test_the_bots_module_is_imported_before_the_first_poll(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    assignments: AssignmentServer,
    tmp_path: Path,
) -> None:
    """A pooled bot imports the team's module (its module-level work runs) before it asks for
    a session, once: the module's marker is written before the first poll, and no later."""
    marker = tmp_path / "imported"
    polls_marker: list[bool] = []
    assignments.on_poll = lambda _poll: polls_marker.append(marker.exists())
    bot = await start_pooled(
        bots,
        assignments,
        tmp_path,
        BOT_ENTRYPOINT=f"{OWN_TRANSPORT}:bot",
        BOT_IMPORT_MARKER=str(marker),
    )
    await assignments.polled(2)
    assignments.assign(assignment(recorder, bot.port))
    await stop_session(bot, recorder)
    assert polls_marker[0] is True
    assert len(marker.read_text().splitlines()) == 1


async def test_a_broken_entry_point_fails_its_session_at_once(
    bots: list[BotProcess],
    recorder: CallbackRecorder,
    assignments: AssignmentServer,
    tmp_path: Path,
) -> None:
    """A pooled bot whose module raises at import still waits for its session, then ends it
    at once: exit 2, `ended` with entrypoint_error and the error's own words."""
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no model file')\n")
    bot = await start_pooled(bots, assignments, tmp_path, BOT_ENTRYPOINT=str(broken))
    await assignments.polled()
    assignments.assign(assignment(recorder, bot.port))
    assert await bot.exit_code(BOOT_TIMEOUT_S) == EXIT_CONFIG, bot.output()
    ended = await recorder.wait_for("ended")
    assert (ended.body["reason"], ended.body["exit_code"]) == ("entrypoint_error", 2)
    assert "RuntimeError: no model file" in ended.body["error"]
    assert recorder.of("ready") == []


# The assignment client and its waiter alone, over httpx.MockTransport.

POOL = PoolEnv(dispatcher_url="http://dispatcher", machine_id="m 1", pool_token=POOL_TOKEN)


def client_of(*answers: httpx.Response | Exception) -> tuple[AssignmentClient, list[httpx.Request]]:
    """A client whose dispatcher answers `answers` in order (an exception: a network error)."""
    requests: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    http = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    return AssignmentClient(POOL, http, wait_s=3), requests


def test_pooled_means_a_pool_token_and_no_session() -> None:
    """Pooled mode needs POOL_TOKEN without SESSION_ID; a SESSION_ID means a cold start."""
    assert is_pooled({"POOL_TOKEN": "t"})
    assert not is_pooled({"POOL_TOKEN": "t", "SESSION_ID": "s-1"})
    assert not is_pooled({"SESSION_ID": "s-1"})
    assert not is_pooled({"POOL_TOKEN": " "})
    assert POOL_TOKEN not in repr(POOL)


async def test_client_asks_with_its_token_and_reads_the_answers() -> None:
    """One poll per call: the machine's quoted path, `wait`, the bearer token; 204 is None,
    200 an Assignment, 410 a retirement, 401 final, 503 and network errors retryable."""
    client, requests = client_of(
        httpx.Response(204),
        httpx.Response(200, json={"env": {"SESSION_ID": "s-1"}, "args": ["--room-url", "u"]}),
        httpx.Response(410, json={"detail": "image changed", "code": "pool-machine-retired"}),
        httpx.Response(401, json={"detail": "bad token", "code": "unauthorized"}),
        httpx.Response(503),
        httpx.ConnectError("refused"),
    )
    assert await client.poll() is None
    assert await client.poll() == Assignment({"SESSION_ID": "s-1"}, ("--room-url", "u"))
    errors = []
    for _ in range(4):
        with pytest.raises(AssignmentError) as caught:
            await client.poll()
        errors.append(caught.value)
    assert [(e.status, e.retryable, e.retired) for e in errors] == [
        (410, False, True),
        (401, False, False),
        (503, True, False),
        (None, True, False),
    ]
    assert errors[0].code == "pool-machine-retired"
    assert str(requests[0].url) == "http://dispatcher/internal/machines/m%201/assignment?wait=3"
    assert all(r.headers["authorization"] == f"Bearer {POOL_TOKEN}" for r in requests)
    assert all(POOL_TOKEN not in str(e) for e in errors)


async def test_waiter_asks_through_errors_until_assigned() -> None:
    """204s and retryable errors are asked again (with a backoff) until the assignment."""
    client, requests = client_of(
        httpx.Response(204),
        httpx.Response(500),
        httpx.ReadTimeout("slow"),
        httpx.Response(200, json={"env": {"SESSION_ID": "s-1"}}),
    )
    waiter = AssignmentWaiter(client, lambda: None, backoff_initial_s=0.01, backoff_max_s=0.02)
    assert await waiter.wait() == Assignment({"SESSION_ID": "s-1"})
    assert len(requests) == 4


async def test_waiter_stops_when_asked() -> None:
    """A stop request ends the wait (None) while a poll is outstanding."""
    stop: list[str] = []
    release = asyncio.Event()

    async def hold(_request: httpx.Request) -> httpx.Response:
        stop.append("sigterm")
        await release.wait()
        return httpx.Response(204)

    http = httpx.AsyncClient(transport=httpx.MockTransport(hold))
    waiter = AssignmentWaiter(
        AssignmentClient(POOL, http), lambda: stop[0] if stop else None, tick_s=0.01
    )
    assert await asyncio.wait_for(waiter.wait(), 10) is None


async def test_a_late_tick_abandons_the_poll() -> None:
    """A poll outstanding across a pause of the whole process (here: the event loop blocked,
    as SIGSTOP would) is abandoned at once and asked again, though its connection is silent."""
    polls = 0

    async def answer(_request: httpx.Request) -> httpx.Response:
        nonlocal polls
        polls += 1
        if polls == 1:
            await asyncio.sleep(0.05)  # The watch ticks...
            time.sleep(0.3)  # noqa: ASYNC251 (...then the process stops for a while)
            await asyncio.Event().wait()  # A connection that never answers.
        return httpx.Response(200, json={"env": {"SESSION_ID": "s-1"}})

    http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    waiter = AssignmentWaiter(AssignmentClient(POOL, http), lambda: None, tick_s=0.01, pause_s=0.1)
    assert await asyncio.wait_for(waiter.wait(), 10) == Assignment({"SESSION_ID": "s-1"})
    assert polls == 2
