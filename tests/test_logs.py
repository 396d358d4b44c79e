"""The dispatcher's logs: JSON lines carrying the session (and machine and trace) of the work
that logged them, from context variables; and a readable format when asked."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from dispatcher.logs import JsonFormatter, TextFormatter, bind, configure_logging, session_context
from testkit.fakes import TESTBOT_DIR
from testkit.harness import Stack, dispatcher_stack
from testkit.procs import DispatcherProcess
from testkit.waits import eventually

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Captured(logging.Handler):
    """Every record, as the JSON formatter writes it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def line_of(formatter: logging.Formatter, message: str = "hello %s", *args: Any) -> str:
    record = logging.LogRecord("dispatcher.x", logging.WARNING, __file__, 1, message, args, None)
    return formatter.format(record)


def test_json_lines_carry_the_context() -> None:
    outside = json.loads(line_of(JsonFormatter(), "hello %s", "there"))
    assert outside["msg"] == "hello there" and outside["level"] == "WARNING"
    assert outside["logger"] == "dispatcher.x" and outside["ts"].endswith("+00:00")
    assert not {"session_id", "machine_id", "trace_id", "span_id"} & set(outside)
    with session_context("s-1", traceparent=TRACEPARENT):
        inside = json.loads(line_of(JsonFormatter()))
        bind(machine_id="m-1")
        bound = json.loads(line_of(JsonFormatter()))
    after = json.loads(line_of(JsonFormatter()))
    assert inside["session_id"] == "s-1" and "machine_id" not in inside
    assert inside["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert inside["span_id"] == "b7ad6b7169203331"
    assert bound["machine_id"] == "m-1"
    assert "session_id" not in after and "trace_id" not in after


def test_a_recording_span_gives_the_records_its_ids() -> None:
    """Inside a span of the session's trace, records carry that span's id (the session's
    traceparent does not replace the live span)."""
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        ctx = span.get_span_context()
        own = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"
        with session_context("s-2", traceparent=own):
            line = json.loads(line_of(JsonFormatter()))
        with session_context("s-3", traceparent=TRACEPARENT):
            other = json.loads(line_of(JsonFormatter()))
    assert (line["trace_id"], line["span_id"]) == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    # Another session's trace becomes the parent: its records carry that trace.
    assert other["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    provider.shutdown()


def test_text_lines_for_people() -> None:
    with session_context("s-1", machine_id="m-1"):
        text = line_of(TextFormatter())
    assert text.endswith(" WARNING dispatcher.x: hello %s  session_id=s-1 machine_id=m-1")
    assert "WARNING dispatcher.x: hello" in line_of(TextFormatter())
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_configure_logging_routes_libraries_too() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("INFO", "json", stream)
        with session_context("s-9"):
            logging.getLogger("httpx").info("HTTP Request: GET http://x")
            logging.getLogger("dispatcher.y").debug("not at INFO")
        (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert line["logger"] == "httpx" and line["session_id"] == "s-9"
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


async def test_the_service_logs_json_unless_asked_for_text(tmp_path: Path) -> None:
    """A real `dispatcher serve`: JSON lines by default, lines for people with
    LOG_FORMAT=text; a bad LOG_FORMAT is a configuration error naming the variable."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/d.db", "LOCAL_BOT_DIR": str(TESTBOT_DIR)}
    bad = subprocess.run(  # noqa: ASYNC221 (a one-shot exit, not a server)
        [sys.executable, "-m", "dispatcher", "serve"],
        env={"PATH": os.environ["PATH"], "LOG_FORMAT": "xml"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "LOG_FORMAT must be one of json, text" in bad.stderr
    for kind in ("json", "text"):
        async with DispatcherProcess(env | {"LOG_FORMAT": kind}, tmp_path) as proc:
            await proc.start()
        lines = [x for x in proc.log_text().splitlines() if "dispatcher ready" in x]
        assert len(lines) == 1, proc.log_tail()
        if kind == "json":
            line = json.loads(lines[0])
            assert line["logger"] == "dispatcher.app" and line["level"] == "INFO"
        else:
            assert " INFO    dispatcher.app: dispatcher ready: machines=local" in lines[0]


async def test_every_record_of_a_session_carries_its_session_id(
    tmp_path: Path, captured: Captured
) -> None:
    """Two sessions against the emulators (one ready then deleted, one crashing before
    ready), tracing off: every record the dispatcher and its HTTP client log for them names
    the session, and carries its trace id (the bot's TRACEPARENT's); the records logged once
    its machine is known name the machine too."""
    # The reconciler and the follow's watch each make one pass at start-up, then none.
    env = {"RECONCILE_INTERVAL_S": "3600", "FOLLOW_INTERVAL_S": "600"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        assert stack.fly is not None
        # The reconciler's first pass (its records belong to no session) ends with Daily's
        # room list; from then on, only the sessions' work logs.
        await eventually(
            lambda: any("/rooms?limit=100" in x["msg"] for x in captured.lines),
            what="the reconciler's first pass",
        )
        captured.lines.clear()
        first = await stack.start()
        assert first.status_code == 200, first.text
        ready = first.json()["sessionId"]
        await stack.wait_state(ready, "ready")
        assert (await stack.http.delete(f"/sessions/{ready}", headers=stack.headers())).is_success
        # Its room deleted before the next session starts: a call of one room runs in that
        # session's context (a batch of several rooms, in none).
        daily = stack.daily
        assert daily is not None
        await eventually(
            lambda: ready in {r.name for r in daily.deleted}, timeout=60, what="room deleted"
        )
        crash = await stack.start({"testBot": {"exit_before_ready": 3}})
        crashed = crash.json()["sessionId"]
        await stack.wait_state(crashed, "failed")
        await stack.wait_state(ready, "ended")
        await eventually(
            lambda: {r.name for r in daily.deleted} >= {ready, crashed}, what="both rooms deleted"
        )
        machines = {m.name: m for m in stack.fly.machines.values()}
        lines = [x for x in captured.lines if ours(x, stack)]

    traces = {sid: machines[sid].config["env"]["TRACEPARENT"].split("-")[1] for sid in machines}
    assert set(traces) == {ready, crashed}
    assert len(lines) > 10, lines
    for line in lines:
        sid = line.get("session_id")
        assert sid in traces, line
        assert line.get("trace_id") == traces[sid], line
        if "machine_id" in line:
            assert line["machine_id"] == machines[sid].id, line
    assert any(
        x["session_id"] == ready and x["msg"].startswith("session dispatched to new machine")
        for x in lines
    )
    # What the follow of each session logs, once its machine is known, names the machine.
    for sid in traces:
        ends = [x for x in lines if x["session_id"] == sid and x["msg"].startswith("session ")]
        assert ends and all(x.get("machine_id") == machines[sid].id for x in ends), ends
        calls = [x for x in lines if x["session_id"] == sid and x["logger"] == "httpx"]
        assert any("/machines/" in x["msg"] and "/wait" in x["msg"] for x in calls)
        assert any("DELETE" in x["msg"] and "/batch/rooms" in x["msg"] for x in calls)


def ours(line: dict[str, Any], stack: Stack) -> bool:
    """A record of the dispatcher or its HTTP client (not the test's client, not the
    emulators' servers)."""
    if line["logger"] == "httpx":
        return stack.url not in line["msg"]
    return line["logger"].startswith("dispatcher")
