"""Tests of the Fly Machines API emulator, over HTTP on loopback, with real bot processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.fakes.fly import DEFAULT_APP, DEFAULT_TOKEN, FlyEmulator, MachineRecord
from testkit.net import serve

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "registry.fly.io/bots:test"
AUTH = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
SECRET = "s3cret-daily-key"

BOT = """\
import json, os, signal, sys, time

def on_term(signum, frame):
    print(f"got signal {signum}", flush=True)
    sys.exit(int(os.environ.get("BOT_TERM_EXIT", "0")))

if os.environ.get("BOT_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, on_term)
print("env " + json.dumps(dict(os.environ), sort_keys=True), flush=True)
print("ready", flush=True)
time.sleep(float(os.environ.get("BOT_SLEEP", "60")))
sys.exit(int(os.environ.get("BOT_EXIT", "0")))
"""


@dataclass
class Fly:
    """A running emulator and a client for its app `bots`."""

    emu: FlyEmulator
    api: httpx.AsyncClient
    url: str

    def record(self, machine: dict[str, Any]) -> MachineRecord:
        return self.emu.machines[machine["id"]]


Start = Callable[..., Awaitable[Fly]]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "image"
    (root / "bot_runtime").mkdir(parents=True)
    (root / "bot_runtime" / "__init__.py").write_text(
        ""
    )  # a regular package: shadows the repo's `bot_runtime`
    (root / "bot_runtime" / "__main__.py").write_text(BOT)
    return root


@pytest.fixture
async def start_fly(image: Path) -> AsyncIterator[Start]:
    async with contextlib.AsyncExitStack() as stack:

        async def start(**options: Any) -> Fly:
            defaults: dict[str, Any] = {
                "images": {IMAGE: image},
                "secrets": {"DAILY_API_KEY": SECRET},
                "boot_delay_s": 0.02,
                "destroy_delay_s": 0.01,
                "restart_delay_s": 0.01,
                "rate_limits": False,
            }
            emu = FlyEmulator(**(defaults | options))
            url = await stack.enter_async_context(serve(emu.app))
            api = httpx.AsyncClient(base_url=f"{url}/v1/apps/{DEFAULT_APP}", headers=AUTH)
            await stack.enter_async_context(api)
            return Fly(emu, api, url)

        yield start


@pytest.fixture
async def fly(start_fly: Start) -> Fly:
    return await start_fly()


async def create(fly: Fly, *, expect: int = 200, body: Any = None, **config: Any) -> Any:
    """POST a create with `config` on top of the image and a restart policy of "no" (a key
    given as None is left out)."""
    body = body or {}
    config = {"image": IMAGE, "restart": {"policy": "no"}} | config
    body["config"] = {k: v for k, v in config.items() if v is not None}
    response = await fly.api.post("/machines", json=body)
    assert response.status_code == expect, response.text
    return response.json()


async def wait(fly: Fly, machine: dict[str, Any], state: str, **params: Any) -> httpx.Response:
    query = {"state": state, "timeout": 10} | params
    return await fly.api.get(f"/machines/{machine['id']}/wait", params=query)


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Poll (test-side only) until `predicate` holds."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def process_env(record: MachineRecord) -> dict[str, str]:
    line = next(line for line in record.logs if line.startswith("env "))
    return json.loads(line[4:])


def exit_events(machine: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["request"]["exit_event"] for e in machine["events"] if e["type"] == "exit"]


async def test_lifecycle_create_run_exit_auto_destroy(start_fly: Start, image: Path) -> None:
    """A machine boots, runs the image with secrets and Fly env, records its exit code, then
    auto-destroys; every answer has a unique fly-request-id."""
    fly = await start_fly(rate_limits=True)
    env = {"SESSION_ID": "abc", "BOT_SLEEP": "0.3", "BOT_EXIT": "3"}
    machine = await create(fly, env=env, auto_destroy=True, metadata={"session_id": "abc"})
    assert machine["state"] == "created"
    assert re.fullmatch(r"[0-9a-f]{14}", machine["id"])
    assert machine["version"] == machine["instance_id"]
    assert machine["private_ip"].startswith("fdaa:")
    assert machine["region"] == "iad"
    assert machine["image_ref"]["repository"] == "bots"
    assert machine["image_ref"]["tag"] == "test"
    assert machine["config"]["env"] == env

    started = await wait(fly, machine, "started")
    assert (started.status_code, started.json()["state"]) == (200, "started")
    stopped = await wait(fly, machine, "stopped", version=machine["instance_id"])
    assert stopped.status_code == 200, stopped.text
    destroyed = await wait(fly, machine, "destroyed")
    assert destroyed.status_code == 200, destroyed.text

    got = (await fly.api.get(f"/machines/{machine['id']}")).json()
    assert got["state"] == "destroyed"
    assert [e["type"] for e in got["events"]] == ["destroy", "exit", "start", "launch"]
    exit_event = got["events"][1]
    assert (exit_event["status"], exit_event["source"]) == ("stopped", "flyd")
    assert isinstance(exit_event["timestamp"], int)
    assert exit_event["request"]["exit_event"]["exit_code"] == 3
    assert exit_event["request"]["exit_event"]["requested_stop"] is False
    assert exit_event["request"]["exit_event"]["restarting"] is False

    seen = process_env(fly.record(machine))
    assert seen["DAILY_API_KEY"] == SECRET
    assert seen["FLY_MACHINE_ID"] == machine["id"]
    assert seen["FLY_MACHINE_VERSION"] == machine["instance_id"]
    assert seen["FLY_APP_NAME"] == DEFAULT_APP
    assert seen["FLY_REGION"] == "iad"
    assert seen["FLY_IMAGE_REF"] == IMAGE
    assert seen["SESSION_ID"] == "abc"
    assert seen["PYTHONPATH"] == str(image)

    assert (await fly.api.get("/machines")).json() == []
    listed = await fly.api.get("/machines", params={"include_deleted": "true"})
    assert [m["id"] for m in listed.json()] == [machine["id"]]
    ids = {r.headers["fly-request-id"] for r in (started, stopped, destroyed, listed)}
    assert len(ids) == 4
    method, path, _, body = fly.emu.requests[0]
    assert (method, path, body["config"]["env"]) == ("POST", "/v1/apps/bots/machines", env)


@pytest.mark.parametrize("shape", ["exit_event", "MonitorEvent"])
async def test_exit_events_come_in_the_configured_shape(start_fly: Start, shape: str) -> None:
    """`exit_event_shape` puts an exit's details in `request.exit_event` (the default) or in
    `request.MonitorEvent.exit_event`, and only there."""
    fly = await start_fly(**({} if shape == "exit_event" else {"exit_event_shape": shape}))
    machine = await create(fly, env={"BOT_SLEEP": "0", "BOT_EXIT": "3"})
    stopped = await wait(fly, machine, "stopped", version=machine["instance_id"])
    assert stopped.status_code == 200, stopped.text
    got = (await fly.api.get(f"/machines/{machine['id']}")).json()
    (request,) = [e["request"] for e in got["events"] if e["type"] == "exit"]
    assert set(request) == {shape, "restart_count"}
    details = request["MonitorEvent"]["exit_event"] if shape == "MonitorEvent" else request[shape]
    assert (details["exit_code"], details["requested_stop"]) == (3, False)
    assert fly.record(machine).exit_events() == [details]


async def test_list_filters_by_metadata_state_and_summary(fly: Fly) -> None:
    """List matches every `metadata.<k>` filter, a state list and a region, and summary=true
    leaves out config, events and checks."""
    made = [
        await create(fly, body={"skip_launch": True}, metadata={"session_id": s, "owner": "d1"})
        for s in ("a", "b", "c")
    ]
    response = await fly.api.get("/machines", params={"metadata.session_id": "b"})
    assert [m["id"] for m in response.json()] == [made[1]["id"]]
    both = {"metadata.session_id": "b", "metadata.owner": "d2"}
    assert (await fly.api.get("/machines", params=both)).json() == []
    owned = await fly.api.get("/machines", params={"metadata.owner": "d1", "summary": "true"})
    assert len(owned.json()) == 3
    for summary in owned.json():
        assert not {"config", "events", "checks"} & summary.keys()
        assert {"id", "state", "instance_id", "region", "private_ip"} <= summary.keys()
    full = (await fly.api.get("/machines")).json()
    assert all("config" in m and m["checks"] == [] for m in full)
    assert len((await fly.api.get("/machines", params={"state": "created,started"})).json()) == 3
    assert (await fly.api.get("/machines", params={"state": "stopped"})).json() == []
    assert (await fly.api.get("/machines", params={"region": "ord"})).json() == []


async def test_wait_times_out_with_408_and_stopped_needs_a_version(fly: Fly) -> None:
    """A wait that is not satisfied answers 408 after its timeout; a stopped wait needs a known
    version (or instance_id); a bad state or timeout is a 400."""
    machine = await create(fly, body={"skip_launch": True})
    began = time.monotonic()
    response = await wait(fly, machine, "started", timeout=1)
    assert time.monotonic() - began >= 1
    assert response.status_code == 408
    assert response.json() == {
        "error": "deadline_exceeded: timeout waiting for machine to be started"
    }
    assert (await wait(fly, machine, "stopped")).status_code == 400
    assert (await wait(fly, machine, "stopped", version="01NOPE")).status_code == 400
    assert (await wait(fly, machine, "sleeping")).status_code == 400
    assert (await wait(fly, machine, "started", timeout="soon")).status_code == 400
    older_name = await wait(fly, machine, "stopped", instance_id=machine["instance_id"], timeout=0)
    assert older_name.status_code == 408


async def test_wait_wakes_on_start_of_a_created_machine(fly: Fly) -> None:
    """A pending wait returns as soon as the state changes, and starting a skip_launch machine
    boots it with a new instance_id."""
    machine = await create(fly, body={"skip_launch": True})
    waiter = asyncio.create_task(wait(fly, machine, "started", timeout=30))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    start = await fly.api.post(f"/machines/{machine['id']}/start")
    assert start.json() == {"previous_state": "created", "migrated": False, "new_host": ""}
    assert (await waiter).status_code == 200  # woken by the start, well before its timeout
    got = (await fly.api.get(f"/machines/{machine['id']}")).json()
    assert got["state"] == "started"
    assert got["instance_id"] != machine["instance_id"]
    again = await fly.api.post(f"/machines/{machine['id']}/start")
    assert again.json()["previous_state"] == "started"


async def test_stop_with_sigterm_reaches_the_process_and_restart_reruns_it(fly: Fly) -> None:
    """Stop delivers the requested signal, the exit records requested_stop, and a later start
    reruns the same config under a new instance_id."""
    machine = await create(fly)
    record = fly.record(machine)
    await until(lambda: "ready" in record.logs)
    stop = await fly.api.post(
        f"/machines/{machine['id']}/stop", json={"signal": "SIGTERM", "timeout": "5s"}
    )
    assert stop.json() == {"ok": True}
    assert (await wait(fly, machine, "stopped", version=machine["instance_id"])).status_code == 200
    got = (await fly.api.get(f"/machines/{machine['id']}")).json()
    assert got["state"] == "stopped"
    assert [e["type"] for e in got["events"]] == ["exit", "stop", "start", "launch"]
    assert got["events"][1]["source"] == "user"
    exit_event = exit_events(got)[0]
    assert exit_event["requested_stop"] is True
    assert (exit_event["exit_code"], exit_event["signal"]) == (0, -1)
    assert "got signal 15" in record.logs

    start = await fly.api.post(f"/machines/{machine['id']}/start")
    assert start.json()["previous_state"] == "stopped"
    restarted = (await fly.api.get(f"/machines/{machine['id']}")).json()
    assert restarted["instance_id"] != machine["instance_id"]
    started = await wait(fly, restarted, "started", version=restarted["instance_id"])
    assert started.status_code == 200
    await until(lambda: record.logs.count("ready") == 2)
    assert process_env(record)["FLY_MACHINE_VERSION"] in (
        machine["instance_id"],
        restarted["instance_id"],
    )
    assert record.env["FLY_MACHINE_VERSION"] == restarted["instance_id"]


async def test_stop_body_must_be_an_object(fly: Fly) -> None:
    """A stop whose body is a JSON array, or names an unknown signal, is a 400."""
    machine = await create(fly, body={"skip_launch": True})
    url = f"/machines/{machine['id']}/stop"
    array = await fly.api.post(url, json=[])
    assert array.status_code == 400
    assert "error" in array.json()
    assert (await fly.api.post(url, json={"signal": "SIGNOPE"})).status_code == 400
    assert (await fly.api.post(url, json={"timeout": "ten"})).status_code == 400
    assert (await fly.api.post(url, json={})).json() == {"ok": True}


async def test_sigkill_follows_when_the_stop_timeout_passes(fly: Fly) -> None:
    """A process that ignores stop_config's signal is SIGKILLed once its timeout passes."""
    machine = await create(
        fly,
        env={"BOT_IGNORE_TERM": "1"},
        stop_config={"signal": "SIGTERM", "timeout": "300ms"},
    )
    record = fly.record(machine)
    await until(lambda: "ready" in record.logs)
    began = time.monotonic()
    await fly.api.post(f"/machines/{machine['id']}/stop", json={})
    assert (await wait(fly, machine, "stopped", version=machine["instance_id"])).status_code == 200
    assert time.monotonic() - began >= 0.3
    exit_event = exit_events((await fly.api.get(f"/machines/{machine['id']}")).json())[0]
    assert (exit_event["exit_code"], exit_event["signal"], exit_event["guest_signal"]) == (
        137,
        9,
        9,
    )
    assert exit_event["requested_stop"] is True
    assert exit_event["oom_killed"] is False


async def test_destroy_of_a_running_machine_needs_force(fly: Fly) -> None:
    """Destroying a running machine without force is a 412; with force it is killed and
    destroyed, and stays readable as destroyed."""
    machine = await create(fly)
    url = f"/machines/{machine['id']}"
    assert (await wait(fly, machine, "started")).status_code == 200
    refused = await fly.api.delete(url)
    assert refused.status_code == 412
    assert refused.json() == {
        "error": "failed_precondition: machine still active, refusing to delete"
    }
    assert (await fly.api.delete(url, params={"force": "true"})).json() == {"ok": True}
    assert (await wait(fly, machine, "destroyed")).status_code == 200
    got = (await fly.api.get(url)).json()
    assert got["state"] == "destroyed"
    assert exit_events(got)[0]["signal"] == 9
    assert (await fly.api.delete(url)).status_code == 404
    assert fly.record(machine).process is None


async def test_create_is_rate_limited_per_app_with_retry_after(start_fly: Start) -> None:
    """The fourth create within a second is a 429 with a rate_limited body and an integer
    Retry-After, unless that header is switched off."""
    fly = await start_fly(rate_limits=True)
    for _ in range(3):
        await create(fly, body={"skip_launch": True})
    limited = await fly.api.post("/machines", json={"config": {"image": IMAGE}})
    assert limited.status_code == 429
    assert limited.json() == {"error": "rate limit exceeded", "status": "rate_limited"}
    assert limited.headers["retry-after"] == "1"
    assert len(fly.emu.machines) == 3

    quiet = await start_fly(rate_limits=True, retry_after_header=False)
    for _ in range(3):
        await create(quiet, body={"skip_launch": True})
    limited = await quiet.api.post("/machines", json={"config": {"image": IMAGE}})
    assert limited.status_code == 429
    assert "retry-after" not in limited.headers


async def test_create_fault_applied_first_leaves_exactly_one_machine(fly: Fly) -> None:
    """A create fault with apply_first creates the machine and still answers 500."""
    fly.emu.faults.add("create", status=500, apply_first=True)
    failed = await fly.api.post("/machines", json={"skip_launch": True, "config": {"image": IMAGE}})
    assert failed.status_code == 500
    assert failed.json() == {"error": "internal error", "status": "unknown"}
    assert len((await fly.api.get("/machines")).json()) == 1
    assert len(fly.emu.machines) == 1
    await create(fly, body={"skip_launch": True})
    assert len(fly.emu.machines) == 2


async def test_faults_via_the_control_api_and_dropped_connections(fly: Fly) -> None:
    """A fault queued over the control API answers its status once; status 0 drops the
    connection without an HTTP answer."""
    machine = await create(fly, body={"skip_launch": True})
    url = f"/machines/{machine['id']}"
    queued = await fly.api.post(f"{fly.url}/_emulator/faults", json={"op": "get", "status": 503})
    assert queued.json() == {"pending": {"get": 1}}
    assert (await fly.api.get(url)).status_code == 503
    assert (await fly.api.get(url)).status_code == 200

    fly.emu.faults.add("get", status=0)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await fly.api.get(url)
    assert (await fly.api.get(url)).status_code == 200


async def test_an_outage_answers_every_call_and_cuts_open_waits(fly: Fly) -> None:
    """During an outage every call answers its fault (503 by default), a long poll already open
    included, and queued faults wait for its end; after it, calls go through again."""
    machine = await create(fly, body={"skip_launch": True})
    url = f"/machines/{machine['id']}"
    fly.emu.faults.add("get", status=500)
    open_wait = asyncio.create_task(wait(fly, machine, "started", timeout=60))
    await until(lambda: any(r.path.endswith("/wait") for r in fly.emu.requests))
    began = await fly.api.post(f"{fly.url}/_emulator/outage")
    assert began.json() == {"outage": True}
    cut = await open_wait
    assert cut.status_code == 503 and cut.json()["status"] == "unknown"
    assert (await fly.api.get(url)).status_code == 503
    assert (await fly.api.get("/machines")).status_code == 503
    assert (await fly.api.post(f"{url}/start")).status_code == 503
    await create(fly, expect=503, body={"skip_launch": True})
    assert len(fly.emu.machines) == 1
    assert (await fly.api.delete(f"{fly.url}/_emulator/outage")).json() == {"outage": False}
    assert (await fly.api.get(url)).status_code == 500
    assert (await fly.api.get(url)).status_code == 200


async def test_capacity_falls_through_a_priority_list(start_fly: Start) -> None:
    """A full first region sends a priority-list create to the next one; a full single region
    answers insufficient_capacity; region-scoped faults fire only for creates landing there."""
    fly = await start_fly(regions={"iad": 1, "ord": None})
    first = await create(fly, body={"skip_launch": True, "region": "iad"})
    assert first["region"] == "iad"
    second = await create(fly, body={"skip_launch": True, "region": "iad,ord"})
    assert second["region"] == "ord"
    full = await create(fly, expect=412, body={"skip_launch": True, "region": "iad"})
    assert full == {
        "error": "insufficient resources to create machine",
        "status": "insufficient_capacity",
    }
    await create(fly, expect=400, body={"skip_launch": True, "region": "xyz"})

    fly.emu.faults.add("create", status=500, region="iad")
    await create(fly, body={"skip_launch": True, "region": "ord"})
    assert (await fly.api.delete(f"/machines/{first['id']}")).status_code == 200
    assert (await wait(fly, first, "destroyed")).status_code == 200
    await create(fly, expect=500, body={"skip_launch": True, "region": "iad"})

    other = await start_fly(regions={"iad": 0}, capacity_status=503)
    await create(other, expect=503, body={"skip_launch": True})


async def test_default_restart_policy_restarts_a_crashing_process(fly: Fly) -> None:
    """Without a restart policy a crashing process is restarted (Fly's on-failure default)."""
    machine = await create(fly, env={"BOT_SLEEP": "0", "BOT_EXIT": "1"}, restart=None)
    record = fly.record(machine)
    await until(lambda: record.restart_count >= 2)
    restarting = [e for e in record.exit_events() if e["restarting"]]
    assert len(restarting) >= 2
    assert all(e["exit_code"] == 1 for e in restarting)
    assert "restart" in {e["type"] for e in record.events}
    await fly.api.delete(f"/machines/{machine['id']}", params={"force": "true"})
    assert (await wait(fly, machine, "destroyed")).status_code == 200


async def test_restart_policy_no_leaves_a_crashed_machine_stopped(fly: Fly) -> None:
    """With restart policy "no" a crashing process is not restarted and the machine stops."""
    machine = await create(fly, env={"BOT_SLEEP": "0", "BOT_EXIT": "1"})
    assert (await wait(fly, machine, "stopped", version=machine["instance_id"])).status_code == 200
    got = (await fly.api.get(f"/machines/{machine['id']}")).json()
    assert got["state"] == "stopped"
    assert [e["exit_code"] for e in exit_events(got)] == [1]
    assert fly.record(machine).restart_count == 0


async def test_on_failure_gives_up_after_max_retries(fly: Fly) -> None:
    """An on-failure policy restarts at most max_retries times, then the machine stops."""
    restart = {"policy": "on-failure", "max_retries": 1}
    machine = await create(fly, env={"BOT_SLEEP": "0", "BOT_EXIT": "2"}, restart=restart)
    assert (await wait(fly, machine, "stopped", version=machine["instance_id"])).status_code == 200
    got = (await fly.api.get(f"/machines/{machine['id']}")).json()
    assert [e["restarting"] for e in exit_events(got)] == [False, True]


async def test_oom_kill_is_reported_in_the_exit_event(fly: Fly) -> None:
    """The control API's OOM kill ends the process with exit code 137 and oom_killed."""
    machine = await create(fly)
    record = fly.record(machine)
    await until(lambda: "ready" in record.logs)
    oom = await fly.api.post(f"{fly.url}/_emulator/machines/{machine['id']}/oom")
    assert oom.status_code == 200
    assert (await wait(fly, machine, "stopped", version=machine["instance_id"])).status_code == 200
    exit_event = record.exit_events()[0]
    assert (exit_event["exit_code"], exit_event["oom_killed"]) == (137, True)
    assert exit_event["requested_stop"] is False


async def test_events_and_metadata_endpoints(fly: Fly) -> None:
    """Metadata can be read, set (204) and deleted (204) without a new version, and events
    honour limit."""
    machine = await create(fly, body={"skip_launch": True}, metadata={"a": "1"})
    url = f"/machines/{machine['id']}"
    assert (await fly.api.post(f"{url}/metadata/b", json={"value": "2"})).status_code == 204
    assert (await fly.api.get(f"{url}/metadata")).json() == {"a": "1", "b": "2"}
    assert (await fly.api.post(f"{url}/metadata/b", json={"value": 2})).status_code == 400
    found = await fly.api.get("/machines", params={"metadata.b": "2"})
    assert [m["id"] for m in found.json()] == [machine["id"]]
    assert (await fly.api.delete(f"{url}/metadata/a")).status_code == 204
    assert (await fly.api.get(f"{url}/metadata")).json() == {"b": "2"}
    got = (await fly.api.get(url)).json()
    assert got["instance_id"] == machine["instance_id"]
    assert got["config"]["metadata"] == {"b": "2"}

    await fly.api.delete(url)
    assert (await wait(fly, machine, "destroyed")).status_code == 200
    events = (await fly.api.get(f"{url}/events", params={"limit": 1})).json()
    assert [e["type"] for e in events] == ["destroy"]
    assert len((await fly.api.get(f"{url}/events")).json()) == 2
    assert (await fly.api.get(f"{url}/events", params={"limit": "x"})).status_code == 400


async def test_create_validates_its_body(fly: Fly) -> None:
    """Malformed create bodies are 400s, an unknown image a 422, and a taken name a 422
    name_taken."""
    bad_configs: list[Any] = [
        {"env": {"A": 1}},
        {"metadata": ["x"]},
        {"init": {"cmd": "python -m bot_runtime"}},
        {"guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 1000}},
        {"restart": {"policy": "sometimes"}},
        {"stop_config": {"timeout": "soon"}},
        {"image": None},
    ]
    for extra in bad_configs:
        await create(fly, expect=400, **extra)
    await create(fly, expect=400, body={"skip_launch": "yes"})
    bare = await fly.api.post("/machines", json=[])
    assert bare.status_code == 400
    unknown = await create(fly, expect=422, body={"skip_launch": True}, image="nope:latest")
    assert "error" in unknown
    await create(fly, body={"skip_launch": True, "name": "s-1"})
    taken = await create(fly, expect=422, body={"skip_launch": True, "name": "s-1"})
    assert taken["status"] == "name_taken"
    assert len(fly.emu.machines) == 1


async def test_requests_the_openapi_spec_rejects_are_400s(fly: Fly) -> None:
    """Every request is checked against Fly's published OpenAPI document: a wrong type, a value
    outside an enum, a body where the spec wants an object, a wait's `state` or `timeout` the
    spec does not have, each answers 400 with Fly's error body, and changes nothing."""
    machine = await create(fly, body={"skip_launch": True})
    url = f"/machines/{machine['id']}"
    guest = {"cpu_kind": "shared", "cpus": 1, "memory_mb": 1024}
    config = {"image": IMAGE, "restart": {"policy": "no"}}
    bad_configs: list[dict[str, Any]] = [
        {"guest": guest | {"kernel_args": "quiet"}},
        {"restart": {"policy": ""}},
        {"stop_config": {"signal": "TERM"}},
        {"stop_config": {"timeout": 5_000_000_000}},
        {"standbys": "m1"},
        {"checks": []},
        {"init": {"cmd": ["python"], "tty": "yes"}},
        {"schedule": 5},
    ]
    requests: list[tuple[str, str, dict[str, Any]]] = [
        *(("POST", "/machines", {"json": {"config": config | extra}}) for extra in bad_configs),
        ("POST", "/machines", {"json": {"config": config, "lease_ttl": "10"}}),
        ("POST", "/machines", {"json": {"config": config, "skip_service_registration": 1}}),
        ("POST", "/machines", {"json": {"config": config, "region": ["iad"]}}),
        ("POST", f"{url}/stop", {"json": {"signal": "TERM"}}),
        ("POST", f"{url}/stop", {"json": {"timeout": 5}}),
        ("POST", f"{url}/stop", {"json": ["SIGTERM"]}),
        ("POST", f"{url}/metadata/k", {"json": {"value": 2}}),
        ("DELETE", url, {"params": {"force": "yes"}}),
        ("GET", "/machines", {"params": {"summary": "maybe"}}),
        ("GET", "/machines", {"params": {"limit": "ten"}}),
        ("GET", f"{url}/events", {"params": {"limit": "1.5"}}),
        ("GET", f"{url}/wait", {"params": {"state": "started", "timeout": "0.5"}}),
        ("GET", f"{url}/wait", {"params": {"state": "started", "timeout": "1s"}}),
        ("GET", f"{url}/wait", {"params": {"state": "sleeping"}}),
        ("GET", f"{url}/wait", {"params": {"state": "started,sleeping"}}),
    ]
    for method, path, options in requests:
        response = await fly.api.request(method, path, **options)
        assert response.status_code == 400, (method, path, options, response.text)
        body = response.json()
        assert isinstance(body["error"], str) and set(body) <= {"error", "status"}, body
    assert list(fly.emu.machines) == [machine["id"]]
    assert fly.record(machine).state == "created"
    assert fly.record(machine).metadata == {}


async def test_unknown_fields_pass_where_the_spec_is_open(fly: Fly) -> None:
    """The spec closes none of the request schemas, so a misspelled or unknown field is accepted
    (Fly's Go server ignores it too) and has no effect; the emulator lists each one in
    `undeclared`, never a key of a map (env, metadata) or of a part the spec does not detail."""
    body = {"skip_launch": True, "nmae": "x", "config": {"image": IMAGE, "auto_destory": True}}
    body["config"] |= {"env": {"ANY_NAME": "1"}, "metadata": {"any_key": "1"}}
    body["config"] |= {"guest": {"cpu_kind": "shared", "cpus": 1, "memroy_mb": 512}}
    body["config"] |= {"services": [{"ports": [{"port": 443}]}], "restart": {"policy": "no"}}
    machine = (await fly.api.post("/machines", json=body)).json()
    assert fly.record(machine).config.get("auto_destroy") is None
    await fly.api.post(f"/machines/{machine['id']}/stop", json={"signal": "SIGTERM", "grace": 1})
    route = "/v1/apps/{app_name}/machines"
    assert fly.emu.undeclared == [
        f"POST {route}: nmae",
        f"POST {route}: config.auto_destory",
        f"POST {route}: config.guest.memroy_mb",
        f"POST {route}/{{machine_id}}/stop: grace",
    ]


async def test_wait_takes_the_specs_states_and_answers_version_and_event_id(fly: Fly) -> None:
    """A wait takes every state of the spec (`failed` and `settled` too) and comma lists, and its
    answer carries the state reached, the machine's version and its latest event's id."""
    machine = await create(fly, body={"skip_launch": True})
    record = fly.record(machine)
    settled = await wait(fly, machine, "settled")
    assert settled.json() == {
        "ok": True,
        "state": "created",
        "version": record.instance_id,
        "event_id": record.events[0]["id"],
    }
    assert (await wait(fly, machine, "failed", timeout=1)).status_code == 408
    await fly.api.post(f"/machines/{machine['id']}/start")
    either = await wait(fly, machine, "stopped,started", version=record.instance_id)
    assert (either.status_code, either.json()["state"]) == (200, "started")
    repeated = await fly.api.get(
        f"/machines/{machine['id']}/wait", params=[("state", "suspended"), ("state", "started")]
    )
    assert (repeated.status_code, repeated.json()["state"]) == (200, "started")


async def test_bad_auth_is_401_and_both_schemes_work(fly: Fly) -> None:
    """Missing or wrong tokens are 401 unauthorized; Bearer and FlyV1 both authenticate."""
    url = f"{fly.url}/v1/apps/{DEFAULT_APP}/machines"
    async with httpx.AsyncClient() as bare:
        missing = await bare.get(url)
        assert missing.status_code == 401
        assert missing.json()["status"] == "unauthorized"
        for header in ("Bearer wrong", f"Token {DEFAULT_TOKEN}", DEFAULT_TOKEN):
            assert (await bare.get(url, headers={"Authorization": header})).status_code == 401
        for scheme in ("Bearer", "FlyV1"):
            headers = {"Authorization": f"{scheme} {DEFAULT_TOKEN}"}
            assert (await bare.get(url, headers=headers)).status_code == 200


async def test_unknown_app_and_machine_are_404(fly: Fly) -> None:
    """An unknown app or machine id is a 404."""
    other = await fly.api.get(f"{fly.url}/v1/apps/nope/machines")
    assert other.status_code == 404
    missing = await fly.api.get("/machines/0123456789abcd")
    assert (missing.status_code, missing.json()) == (404, {"error": "machine not found"})


async def test_regions_endpoint(start_fly: Start) -> None:
    """The platform regions list names every configured region, nearest first."""
    fly = await start_fly(regions={"ams": None, "fra": 2})
    body = (await fly.api.get(f"{fly.url}/v1/platform/regions")).json()
    assert [r["code"] for r in body["Regions"]] == ["ams", "fra"]
    assert body["Nearest"] == "ams"


async def test_aclose_leaves_no_process_behind(image: Path) -> None:
    """Shutting the server down kills every machine's process."""
    emu = FlyEmulator(images={IMAGE: image}, boot_delay_s=0.0, rate_limits=False)
    async with serve(emu.app) as url, httpx.AsyncClient(headers=AUTH) as client:
        body = {"config": {"image": IMAGE, "restart": {"policy": "no"}}}
        created = await client.post(f"{url}/v1/apps/{DEFAULT_APP}/machines", json=body)
        record = emu.machines[created.json()["id"]]
        await until(lambda: "ready" in record.logs)
        assert record.process is not None
        pid = record.process.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_standalone_starts_and_answers() -> None:
    """`python -m testkit.fakes.fly` serves the API on the port it prints."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "testkit.fakes.fly",
        "--port",
        "0",
        "--token",
        "tok",
        "--app",
        "demo",
        "--region",
        "ams=2",
        "--no-rate-limits",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("fly emulator on http://127.0.0.1:"), line
        headers = {"Authorization": "FlyV1 tok"}
        async with httpx.AsyncClient(base_url=line.split()[-1], headers=headers) as client:
            regions = (await client.get("/v1/platform/regions")).json()
            assert regions["Nearest"] == "ams"
            assert (await client.get("/v1/apps/demo/machines")).json() == []
            assert (await client.get("/_emulator/state")).json()["apps"] == ["demo"]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        await proc.stdout.read()
        await proc.stderr.read()


TICKER = """\
import os, time
path = os.environ["TICK_FILE"]
n = 0
while True:
    n += 1
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {n}")
    os.replace(path + ".tmp", path)
    time.sleep(0.01)
"""


def ticks(path: Path) -> tuple[int, int]:
    """The ticker's (pid, count), as last written."""
    pid, count = path.read_text().split()
    return int(pid), int(count)


def proc_state(pid: int) -> str:
    """The kernel's one-letter state of a process (T: stopped by a signal)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def ticker(fly: Fly, tmp_path: Path, **config: Any) -> tuple[dict[str, Any], Path]:
    """A started machine whose process counts into a file every 10 ms."""
    path = tmp_path / "ticks"
    init = {"cmd": ["python", "-c", TICKER]}
    machine = await create(fly, init=init, env={"TICK_FILE": str(path)}, **config)
    assert (await wait(fly, machine, "started")).status_code == 200
    await until(path.exists)
    return machine, path


async def suspend(fly: Fly, machine: dict[str, Any]) -> httpx.Response:
    return await fly.api.post(f"/machines/{machine['id']}/suspend")


async def test_suspend_freezes_the_process_and_start_resumes_it(fly: Fly, tmp_path: Path) -> None:
    """Suspend stops the process group (it keeps its pid and memory, and is not counted as
    exited); a start resumes that same process, which carries on counting."""
    machine, path = await ticker(fly, tmp_path)
    record = fly.record(machine)
    assert record.process is not None
    pid = record.process.pid
    waiter = asyncio.create_task(wait(fly, machine, "suspended"))
    answer = await suspend(fly, machine)
    assert (answer.status_code, answer.json()) == (200, {"ok": True})
    suspended = await waiter
    assert (suspended.status_code, suspended.json()["state"]) == (200, "suspended")
    await until(lambda: proc_state(pid) == "T")
    frozen_at = ticks(path)
    await asyncio.sleep(0.2)
    assert ticks(path) == frozen_at
    got = (await fly.api.get(f"/machines/{machine['id']}")).json()
    assert got["state"] == "suspended"
    assert exit_events(got) == []
    assert record.process is not None and record.process.returncode is None

    start = await fly.api.post(f"/machines/{machine['id']}/start")
    assert start.json()["previous_state"] == "suspended"
    assert (await wait(fly, machine, "started")).status_code == 200
    await until(lambda: ticks(path)[1] > frozen_at[1])
    assert ticks(path)[0] == pid == frozen_at[0]
    assert record.process is not None and record.process.pid == pid
    resumed = (await fly.api.get(f"/machines/{machine['id']}")).json()
    assert resumed["instance_id"] == machine["instance_id"]
    assert exit_events(resumed) == []


async def test_suspend_and_resume_events_and_the_resume_delay(
    start_fly: Start, tmp_path: Path
) -> None:
    """Suspend goes suspending then suspended, a resume goes starting (process still frozen for
    the resume delay) then started, and each step is an event with its source."""
    fly = await start_fly(suspend_delay_s=1.0, resume_delay_s=1.0)
    machine, _ = await ticker(fly, tmp_path)
    record = fly.record(machine)
    assert record.process is not None
    pid = record.process.pid
    url = f"/machines/{machine['id']}"
    await suspend(fly, machine)
    assert (await fly.api.get(url)).json()["state"] == "suspending"
    assert (await wait(fly, machine, "suspended")).status_code == 200

    await fly.api.post(f"{url}/start")
    assert (await fly.api.get(url)).json()["state"] == "starting"
    assert proc_state(pid) == "T"
    assert (await wait(fly, machine, "started")).status_code == 200
    events = (await fly.api.get(url)).json()["events"]
    steps = [(e["type"], e["status"], e["source"]) for e in events]
    assert steps == [
        ("resume", "started", "flyd"),
        ("start", "starting", "user"),
        ("suspend", "suspended", "flyd"),
        ("suspend", "suspending", "user"),
        ("start", "started", "flyd"),
        ("launch", "created", "user"),
    ]
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps, reverse=True)
    assert proc_state(pid) != "T"


async def test_suspend_is_refused_over_2048_mb_and_unless_started(fly: Fly, tmp_path: Path) -> None:
    """Suspend is a 400 invalid_argument for a machine over 2 GB or with swap, and a 412
    failed_precondition for a machine that is not started; 2048 MB is allowed."""
    big = await create(fly, guest={"cpu_kind": "shared", "cpus": 1, "memory_mb": 4096})
    assert (await wait(fly, big, "started")).status_code == 200
    refused = await suspend(fly, big)
    assert refused.status_code == 400
    assert refused.json()["status"] == "invalid_argument"
    assert "2048" in refused.json()["error"]
    assert (await fly.api.get(f"/machines/{big['id']}")).json()["state"] == "started"
    swap = await create(fly, body={"skip_launch": True}, init={"swap_size_mb": 512})
    assert (await suspend(fly, swap)).status_code == 400

    created = await create(fly, body={"skip_launch": True})
    not_started = await suspend(fly, created)
    assert not_started.status_code == 412
    assert not_started.json() == {
        "error": "failed_precondition: unable to suspend machine from current state: 'created'",
        "status": "failed_precondition",
    }
    assert fly.record(created).events[0]["type"] == "launch"

    machine, _ = await ticker(fly, tmp_path, guest={"cpus": 1, "memory_mb": 2048})
    assert (await suspend(fly, machine)).status_code == 200
    assert (await wait(fly, machine, "suspended")).status_code == 200
    again = await suspend(fly, machine)
    assert (again.status_code, again.json()["status"]) == (412, "failed_precondition")
    await fly.api.post(f"/machines/{machine['id']}/stop", json={})
    assert (await wait(fly, machine, "stopped", version=machine["instance_id"])).status_code == 200
    assert (await suspend(fly, machine)).status_code == 412


async def test_stop_of_a_suspended_machine_delivers_its_signal(fly: Fly) -> None:
    """Stopping a suspended machine continues its process so the stop signal is handled (no
    SIGKILL), and a later start boots a fresh process under a new version."""
    machine = await create(fly, stop_config={"signal": "SIGTERM", "timeout": "30s"})
    record = fly.record(machine)
    await until(lambda: "ready" in record.logs)
    assert record.process is not None
    pid = record.process.pid
    await suspend(fly, machine)
    assert (await wait(fly, machine, "suspended")).status_code == 200
    assert (await fly.api.post(f"/machines/{machine['id']}/stop", json={})).json() == {"ok": True}
    assert (await wait(fly, machine, "stopped", version=machine["instance_id"])).status_code == 200
    assert "got signal 15" in record.logs
    exit_event = record.exit_events()[0]
    assert (exit_event["exit_code"], exit_event["signal"]) == (0, -1)
    assert exit_event["requested_stop"] is True
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    await fly.api.post(f"/machines/{machine['id']}/start")
    assert (await wait(fly, machine, "started")).status_code == 200
    await until(lambda: record.logs.count("ready") == 2)
    assert record.process is not None and record.process.pid != pid
    assert record.instance_id != machine["instance_id"]


async def test_destroy_of_a_suspended_machine_needs_force_and_kills_it(
    fly: Fly, tmp_path: Path
) -> None:
    """A suspended machine still holds its process: destroy without force is a 412, with force
    the frozen process is killed and the machine destroyed."""
    machine, _ = await ticker(fly, tmp_path)
    record = fly.record(machine)
    assert record.process is not None
    pid = record.process.pid
    await suspend(fly, machine)
    assert (await wait(fly, machine, "suspended")).status_code == 200
    url = f"/machines/{machine['id']}"
    assert (await fly.api.delete(url)).status_code == 412
    assert (await fly.api.delete(url, params={"force": "true"})).json() == {"ok": True}
    assert (await wait(fly, machine, "destroyed")).status_code == 200
    assert exit_events((await fly.api.get(url)).json())[0]["signal"] == 9
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_start_of_a_skip_launch_machine_runs_its_cmd_with_its_env(
    start_fly: Start,
) -> None:
    """A machine created with skip_launch has no process until started; the start runs its
    init.cmd with its config env, after the start delay (not the create's boot delay)."""
    fly = await start_fly(boot_delay_s=30.0, start_delay_s=0.02)
    machine = await create(
        fly,
        body={"skip_launch": True},
        init={"cmd": ["python", "-m", "bot_runtime"]},
        env={"POOL_SLOT": "7"},
    )
    record = fly.record(machine)
    await asyncio.sleep(0.05)
    assert (record.process, record.logs, record.state) == (None, [], "created")
    await fly.api.post(f"/machines/{machine['id']}/start")
    assert (await wait(fly, machine, "started", timeout=5)).status_code == 200
    await until(lambda: "ready" in record.logs)
    seen = process_env(record)
    assert seen["POOL_SLOT"] == "7"
    assert seen["FLY_MACHINE_ID"] == machine["id"]
    assert seen["DAILY_API_KEY"] == SECRET


async def test_start_and_suspend_limits_are_per_machine(start_fly: Start, tmp_path: Path) -> None:
    """Start and suspend are limited per machine and per action (burst 3): a machine whose
    start bucket is empty neither slows starts of other machines nor its own suspend."""
    slow = {"create": (100.0, 100), "start": (0.01, 3), "suspend": (0.01, 3)}
    fly = await start_fly(rate_limits=True, limits=slow)
    machines = [await create(fly, body={"skip_launch": True}) for _ in range(5)]
    busy = machines[0]["id"]
    for _ in range(3):
        assert (await fly.api.post(f"/machines/{busy}/start")).status_code == 200
    limited = await fly.api.post(f"/machines/{busy}/start")
    assert (limited.status_code, limited.json()["status"]) == (429, "rate_limited")
    for machine in machines[1:]:
        assert (await fly.api.post(f"/machines/{machine['id']}/start")).status_code == 200
    await until(lambda: fly.record(machines[0]).state == "started")
    assert (await fly.api.post(f"/machines/{busy}/suspend")).status_code == 200
    assert fly.emu.limiter.refused == {"start": 1}
