"""How sessions of the local machine backend end, in-process: the backend forgets a bot once its
session is over, a bot's own exit code wins over the stop signal the dispatcher sent it, and a
bot the backend never knew is reported as lost.

The bots here are small scripts written for each test (a `bot_runtime` package in tmp_path,
given as LOCAL_BOT_DIR), standard library only, that play the one misbehaviour under test.
"""

from __future__ import annotations

import json
import logging
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dispatcher.env import DISPATCHER_SECRETS, EnvReader
from dispatcher.machines import BotSpec, MachineExit, MachineRef
from dispatcher.machines.local import LocalMachines
from dispatcher.store import Event, Store
from dispatcher.telemetry import Tracing
from testkit.harness import dispatcher_stack, emulators, run_dispatcher
from testkit.waits import eventually

# Reconciler passes every 0.2 s; a grace long enough that a bot ending on a loaded machine is
# never SIGKILLed before it has reported.
LOOP = {"RECONCILE_INTERVAL_S": "0.2", "BOT_STOP_TIMEOUT_S": "60"}

# A bot that calls `ready`, then plays SESSION_BODY's `mode`:
#   ended_first   reports `ended` (participant_left, exit 0) on its own, then waits with
#                 SIGTERM's default action: the dispatcher's later stop kills it (143);
#   stop_first    waits for SIGTERM, reports `ended` (sigterm, exit 0), then dies of a
#                 second SIGTERM (as a bot whose handler is gone once it has ended).
SCRIPTED_BOT = """
import json, os, signal, urllib.request

env = os.environ
stopped = []
signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))


def callback(operation, body):
    url = f"{env['DISPATCHER_URL'].rstrip('/')}/internal/sessions/{env['SESSION_ID']}/{operation}"
    headers = {"Authorization": f"Bearer {env['BOT_CALLBACK_TOKEN']}",
               "Content-Type": "application/json"}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        print(f"scripted bot: {operation} -> {response.status}", flush=True)


mode = json.loads(env.get("SESSION_BODY") or "{}").get("mode")
callback("ready", {})
if mode == "ended_first":
    callback("ended", {"reason": "participant_left", "exit_code": 0})
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        signal.pause()
while not stopped:
    signal.pause()
callback("ended", {"reason": "sigterm", "exit_code": 0})
signal.signal(signal.SIGTERM, signal.SIG_DFL)
os.kill(os.getpid(), signal.SIGTERM)
"""


def scripted_bot(tmp_path: Path) -> Path:
    """A folder whose `python -m bot_runtime` is SCRIPTED_BOT."""
    package = tmp_path / "scripted" / "bot_runtime"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(textwrap.dedent(SCRIPTED_BOT))
    return package.parent


async def events_of(tmp_path: Path, sid: str) -> list[Event]:
    store = await Store.open(f"sqlite:///{tmp_path}/dispatcher.db")
    try:
        return await store.events(sid)
    finally:
        await store.close()


async def test_destroy_forgets_an_exited_bot() -> None:
    """Once destroyed, an exited bot process is gone from the inventory, and its exit is
    still told to whoever asks."""
    machines = LocalMachines()
    ref = await machines.launch(
        BotSpec(session_id="s-1", user="u", cmd=("python", "-c", "raise SystemExit(3)"), env={})
    )
    assert await machines.wait_exit(ref, 30) == MachineExit(exit_code=3)
    await machines.destroy(ref)
    assert await machines.inventory() == []
    assert await machines.exited(ref) == MachineExit(exit_code=3)
    assert await machines.wait_exit(ref, 0) == MachineExit(exit_code=3)
    assert machines.address(ref) is None
    await machines.aclose()


async def test_a_local_bot_inherits_none_of_the_dispatchers_secrets(tmp_path: Path) -> None:
    """A local bot gets the dispatcher's environment less every credential the dispatcher
    reads (the webhook secret included), and its own session variables."""
    secrets_given = {name: f"value-of-{name}" for name in DISPATCHER_SECRETS}
    machines = LocalMachines(base_env={**secrets_given, "PATH": os.environ["PATH"], "KEPT": "1"})
    out = tmp_path / "env.json"
    dump = f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"
    spec = BotSpec(session_id="s-1", user="u", cmd=("python", "-c", dump), env={"OWN": "2"})
    ref = await machines.launch(spec)
    assert await machines.wait_exit(ref, 30) == MachineExit(exit_code=0)
    await machines.aclose()
    seen = json.loads(out.read_text())
    assert "DAILY_WEBHOOK_SECRET" in DISPATCHER_SECRETS
    assert not DISPATCHER_SECRETS & set(seen)
    assert seen["KEPT"] == "1" and seen["OWN"] == "2"


def test_a_secret_setting_must_be_listed_as_one() -> None:
    """The environment reader refuses to read a secret it does not know as the dispatcher's:
    a new credential cannot reach local bots by being forgotten."""
    reader = EnvReader({"NEW_TOKEN": "x" * 32})
    with pytest.raises(AssertionError, match="DISPATCHER_SECRETS"):
        reader.secret("NEW_TOKEN")


async def test_a_bot_the_backend_never_started_is_lost() -> None:
    """A machine id this backend did not launch (a bot of an earlier dispatcher process) has an
    unknown end: `lost`, with no exit code."""
    machines = LocalMachines()
    ref = MachineRef("local-0123456789ab", "local")
    assert await machines.exited(ref) == MachineExit(lost=True)
    assert await machines.wait_exit(ref, 0) == MachineExit(lost=True)
    await machines.aclose()


async def test_reconciler_is_quiet_after_a_local_session_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once a local session has ended normally, reconciler passes see no machine and repair
    nothing (no `destroying a machine no live session owns` on every pass)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def passes(after_ns: int) -> list[ReadableSpan]:
        spans = exporter.get_finished_spans()
        return [s for s in spans if s.name == "reconcile" and (s.start_time or 0) > after_ns]

    def machines(span: ReadableSpan) -> object:
        return (span.attributes or {}).get("reconcile.machines")

    caplog.set_level(logging.INFO, logger="dispatcher")
    async with dispatcher_stack(tmp_path, local=True, env=LOOP, tracing=Tracing(provider)) as stack:
        sid = (await stack.start()).json()["sessionId"]
        await stack.wait_state(sid, "ready")
        await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
        ended = await stack.wait_state(sid, "ended")
        assert ended["endReason"] == "deleted" and ended["exitCode"] == 0
        # A pass under way as the session ended may still see its machine, once.
        ended_ns = time.time_ns()
        await eventually(
            lambda: any(machines(s) == 0 for s in passes(ended_ns)), what="a pass with no machine"
        )
        clean = next(s for s in passes(ended_ns) if machines(s) == 0)
        clean_ns = clean.start_time or 0
        await eventually(lambda: len(passes(clean_ns)) >= 3, what="three more passes")
        later = [clean, *passes(clean_ns)]
    assert [machines(s) for s in later] == [0] * len(later)
    assert [(s.attributes or {}).get("reconcile.repairs") for s in later] == [0] * len(later)
    orphans = [
        r
        for r in caplog.records
        if "no live session owns" in r.getMessage() and r.created * 1e9 > clean_ns
    ]
    assert orphans == []
    provider.shutdown()


async def test_sessions_left_by_a_stopped_dispatcher_end_as_lost(tmp_path: Path) -> None:
    """Sessions still live when their dispatcher stopped without ending them (here the first
    dispatcher stops its bots only once it no longer serves their callbacks) end, at the next
    start, as `dispatcher_lost`: `ended` if the bot had been ready, `failed` if not, with no
    exit code, and the event log says the machine was lost."""
    async with emulators(fly=None) as upstream:
        async with run_dispatcher(tmp_path, upstream, local=True) as first:
            ready = (await first.start()).json()["sessionId"]
            booting = (await first.start({"testBot": {"skip_ready": True}})).json()["sessionId"]
            await first.wait_state(ready, "ready")
            await first.wait_state(booting, "dispatched")
        async with run_dispatcher(tmp_path, upstream, local=True, env=LOOP) as second:
            was_ready = await second.wait_state(ready, "ended", "failed")
            was_booting = await second.wait_state(booting, "ended", "failed")
    assert (was_ready["state"], was_ready["endReason"], was_ready["exitCode"]) == (
        "ended",
        "dispatcher_lost",
        None,
    )
    assert (was_booting["state"], was_booting["endReason"], was_booting["exitCode"]) == (
        "failed",
        "dispatcher_lost",
        None,
    )
    for sid in (ready, booting):
        details = last_state(await events_of(tmp_path, sid))
        assert details["lost"] is True and details["exit_code"] is None


def last_state(log: list[Event]) -> dict[str, Any]:
    (final,) = [e for e in log if e.kind == "state" and e.state in ("ended", "failed")]
    return final.details


@pytest.mark.slow
async def test_bot_report_wins_over_a_stop_signal_after_it(tmp_path: Path) -> None:
    """A bot that reported `ended` with exit code 0 and is then killed by the stop the
    dispatcher sends (the reconciler's, for a session ending) is recorded with its own 0, not
    the signal's 143; the event log still says how the process died. (The stop comes once
    the bot has had the stop's grace period to leave on its own: a short one here.)"""
    env = LOOP | {"LOCAL_BOT_DIR": str(scripted_bot(tmp_path)), "BOT_STOP_TIMEOUT_S": "1"}
    async with dispatcher_stack(tmp_path, local=True, env=env) as stack:
        sid = (await stack.start({"mode": "ended_first"})).json()["sessionId"]
        ended = await stack.wait_state(sid, "ended", "failed", timeout=30)
    assert ended["state"] == "ended"
    assert ended["endReason"] == "participant_left" and ended["exitCode"] == 0
    details = last_state(await events_of(tmp_path, sid))
    assert details["exit_code"] == 0 and details["machine_exit_code"] == 143
    assert details["signal"] == 15 and details["requested_stop"] is True


async def test_bot_report_wins_over_the_signal_of_a_delete(tmp_path: Path) -> None:
    """A DELETE stops the bot; it reports `ended` with exit code 0 and then dies of a signal:
    the session ends `deleted` with the bot's 0, not 143."""
    env = {"LOCAL_BOT_DIR": str(scripted_bot(tmp_path)), "BOT_STOP_TIMEOUT_S": "60"}
    async with dispatcher_stack(tmp_path, local=True, env=env) as stack:
        sid = (await stack.start({"mode": "stop_first"})).json()["sessionId"]
        await stack.wait_state(sid, "ready")
        answer = await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
        assert answer.status_code == 202, answer.text
        ended = await stack.wait_state(sid, "ended", "failed", timeout=30)
    assert ended["state"] == "ended"
    assert ended["endReason"] == "deleted" and ended["exitCode"] == 0
    log = await events_of(tmp_path, sid)
    reports = [e for e in log if e.kind == "bot_ended"]
    assert [r.details["exit_code"] for r in reports] == [0]
    details = last_state(log)
    assert details["exit_code"] == 0 and details["machine_exit_code"] == 143
