"""Light machines (testkit/fakes/fly/light.py): through the API, the same machine as a process.

Each scenario runs twice, on an emulator running the test bot image as real processes and on
one in light mode, and compares everything the API and the bot's callbacks show (states, waits,
events, exit events but their time, callbacks with their bodies and headers).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from testkit.fakes import TESTBOT_DIR
from testkit.fakes.fly import DEFAULT_APP, DEFAULT_TOKEN, FlyEmulator
from testkit.fakes.fly.light import LightProcess
from testkit.fakes.recorder import ROOM_URL, CallbackRecorder, contract_env
from testkit.net import serve
from testkit.waits import eventually

IMAGE = "registry.fly.io/bots:test"
AUTH = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
CMD = ["python", "-m", "bot_runtime", "--room-url", ROOM_URL]
MODES = ("process", "light")


@dataclass
class Fly:
    """An emulator in one mode, served, with a client for its app."""

    mode: str
    emu: FlyEmulator
    api: httpx.AsyncClient
    url: str


Trigger = Callable[[Fly, dict[str, Any]], Awaitable[None]]


@pytest.fixture
async def both() -> AsyncIterator[dict[str, Fly]]:
    """A process-mode and a light-mode emulator, side by side."""
    async with contextlib.AsyncExitStack() as stack:
        flies = {}
        for mode in MODES:
            emu = FlyEmulator(
                images={IMAGE: TESTBOT_DIR},
                boot_delay_s=0.02,
                destroy_delay_s=0.01,
                rate_limits=False,
                light_machines=mode == "light",
            )
            url = await stack.enter_async_context(serve(emu.app))
            api = httpx.AsyncClient(
                base_url=f"{url}/v1/apps/{DEFAULT_APP}", headers=AUTH, timeout=90
            )
            await stack.enter_async_context(api)
            flies[mode] = Fly(mode, emu, api, url)
        yield flies


async def create(fly: Fly, env: dict[str, str], **config: Any) -> dict[str, Any]:
    body = {"config": {"image": IMAGE, "init": {"cmd": CMD}, "restart": {"policy": "no"}} | config}
    body["config"]["env"] = env
    response = await fly.api.post("/machines", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait(fly: Fly, machine: dict[str, Any], state: str, **params: Any) -> tuple[int, str]:
    query = {"state": state, "timeout": 60} | params
    answer = await fly.api.get(f"/machines/{machine['id']}/wait", params=query)
    return answer.status_code, answer.json().get("state", answer.text)


def of(recorder: CallbackRecorder, sid: str, operation: str | None = None) -> list[Any]:
    return [
        (c.operation, c.body, c.authorization, c.traceparent)
        for c in recorder.calls
        if c.session_id == sid and operation in (None, c.operation)
    ]


async def scenario(
    fly: Fly,
    recorder: CallbackRecorder,
    name: str,
    script: dict[str, Any],
    trigger: Trigger | None = None,
    env: dict[str, str] | None = None,
    **config: Any,
) -> dict[str, Any]:
    """Run one machine through a scenario (`env` on top of the contract's); what the API and
    the callbacks showed of it."""
    sid = f"s-{name}-{fly.mode}"
    body = json.dumps({"testBot": script})
    env = contract_env(recorder.url, SESSION_ID=sid, SESSION_BODY=body) | (env or {})
    machine = await create(fly, env, **config)
    view: dict[str, Any] = {
        "created": machine["state"],
        "started": await wait(fly, machine, "started"),
    }
    if not script.get("skip_ready") and script.get("exit_before_ready") is None:
        await eventually(lambda: of(recorder, sid, "ready"), 30, f"{sid} ready")
    if trigger is not None:
        await trigger(fly, machine)
    view["stopped"] = await wait(fly, machine, "stopped", version=machine["instance_id"])
    if config.get("auto_destroy"):
        view["destroyed"] = await wait(fly, machine, "destroyed")
    got = (await fly.api.get(f"/machines/{machine['id']}")).json()
    view["state"] = got["state"]
    view["events"] = [(e["type"], e["status"], e["source"]) for e in got["events"]]
    view["exits"] = [
        {k: v for k, v in e["request"]["exit_event"].items() if k != "exited_at"}
        for e in got["events"]
        if e["type"] == "exit"
    ]
    view["callbacks"] = of(recorder, sid)
    return view


async def stop(fly: Fly, machine: dict[str, Any], timeout: str = "5s") -> None:
    body = {"signal": "SIGTERM", "timeout": timeout}
    answer = await fly.api.post(f"/machines/{machine['id']}/stop", json=body)
    assert answer.status_code == 200, answer.text


async def stop_fast(fly: Fly, machine: dict[str, Any]) -> None:
    await stop(fly, machine, "1s")


async def suspend_resume_stop(fly: Fly, machine: dict[str, Any]) -> None:
    url = f"/machines/{machine['id']}"
    assert (await fly.api.post(f"{url}/suspend")).status_code == 200
    assert await wait(fly, machine, "suspended") == (200, "suspended")
    assert (await fly.api.post(f"{url}/start")).status_code == 200
    assert await wait(fly, machine, "started") == (200, "started")
    await stop(fly, machine)


async def oom(fly: Fly, machine: dict[str, Any]) -> None:
    answer = await fly.api.post(f"{fly.url}/_emulator/machines/{machine['id']}/oom")
    assert answer.status_code == 200, answer.text


SCENARIOS: dict[str, tuple[dict[str, Any], Trigger | None, dict[str, Any]]] = {
    "stopped": ({}, stop, {}),
    "exit-3": ({"exit_after_s": 0.2, "exit_code": 3}, None, {}),
    "silent": ({"exit_after_s": 0.2, "no_ended": True}, None, {"auto_destroy": True}),
    "before-ready": ({"exit_before_ready": 4}, None, {}),
    "killed": ({"ignore_sigterm": True}, stop_fast, {}),
    "max-duration": ({}, None, {"env": {"SESSION_MAX_DURATION_S": "1"}}),
    "suspended": ({}, suspend_resume_stop, {}),
    "oom": ({}, oom, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_a_light_machine_is_a_process_machine_through_the_api(
    both: dict[str, Fly], recorder: CallbackRecorder, name: str
) -> None:
    """The same scenario on both emulators shows the same states, waits, events, exit events
    and callbacks."""
    script, trigger, config = SCENARIOS[name]
    views = {
        mode: await scenario(fly, recorder, name, script, trigger, **config)
        for mode, fly in both.items()
    }
    assert views["light"] == views["process"]
    assert views["light"]["exits"], views["light"]


async def test_exit_events_and_callbacks_of_a_light_machine(
    both: dict[str, Fly], recorder: CallbackRecorder
) -> None:
    """A stopped light machine: ready then ended `sigterm`, exit code 0, requested_stop, events
    launch/start/stop/exit; it is a task, not a process."""
    fly = both["light"]
    view = await scenario(fly, recorder, "plain", {}, stop)
    token = "Bearer " + contract_env("")["BOT_CALLBACK_TOKEN"]
    traceparent = contract_env("")["TRACEPARENT"]
    assert view["callbacks"] == [
        ("ready", {}, token, traceparent),
        ("ended", {"reason": "sigterm", "exit_code": 0}, token, traceparent),
    ]
    assert view["events"] == [
        ("exit", "stopped", "flyd"),
        ("stop", "stopping", "user"),
        ("start", "started", "flyd"),
        ("launch", "created", "user"),
    ]
    (exit_event,) = view["exits"]
    assert exit_event | {"guest_signal": -1} == {
        "exit_code": 0,
        "guest_exit_code": 0,
        "guest_signal": -1,
        "oom_killed": False,
        "requested_stop": True,
        "restarting": False,
        "signal": -1,
    }


async def test_a_scripted_exit_with_and_without_the_ended_callback(
    both: dict[str, Fly], recorder: CallbackRecorder
) -> None:
    """`exit_machine` (and its control route) make a running light bot leave now: with `ended`
    first and its code, or silently; the API shows what a process's same exit shows."""
    fly = both["light"]
    emu = fly.emu

    async def loud(f: Fly, machine: dict[str, Any]) -> None:
        emu.exit_machine(machine["id"], 5)

    async def silent(f: Fly, machine: dict[str, Any]) -> None:
        answer = await f.api.post(
            f"{f.url}/_emulator/machines/{machine['id']}/exit", json={"ended": False}
        )
        assert answer.json() == {"ok": True}

    loud_view = await scenario(fly, recorder, "loud", {}, loud)
    silent_view = await scenario(fly, recorder, "quiet", {}, silent)
    process = both["process"]
    loud_like = await scenario(process, recorder, "loud", {"exit_after_s": 0.1, "exit_code": 5})
    silent_like = await scenario(
        process, recorder, "quiet", {"exit_after_s": 0.1, "no_ended": True}
    )
    assert loud_view["exits"][0]["exit_code"] == 5
    assert [c[:2] for c in loud_view["callbacks"]] == [
        ("ready", {}),
        ("ended", {"reason": "crashed", "exit_code": 5}),
    ]
    assert [c[0] for c in silent_view["callbacks"]] == ["ready"]
    assert silent_view["exits"][0]["exit_code"] == 0
    for light, like in ((loud_view, loud_like), (silent_view, silent_like)):
        assert {k: v for k, v in light.items() if k != "callbacks"} == {
            k: v for k, v in like.items() if k != "callbacks"
        }
        assert [c[:2] for c in light["callbacks"]] == [c[:2] for c in like["callbacks"]]


async def test_the_exit_control_route_refuses_what_it_cannot_script(
    both: dict[str, Fly], recorder: CallbackRecorder
) -> None:
    """404 for an unknown machine, 409 for a process machine and for a machine that has
    exited; LookupError and TypeError from `exit_machine`."""
    light, process = both["light"], both["process"]
    env = contract_env(recorder.url, SESSION_ID="s-refused")
    unknown = await light.api.post(f"{light.url}/_emulator/machines/nope/exit")
    assert unknown.status_code == 404
    machine = await create(process, env)
    assert await wait(process, machine, "started") == (200, "started")
    refused = await process.api.post(f"{process.url}/_emulator/machines/{machine['id']}/exit")
    assert refused.status_code == 409, refused.text
    with pytest.raises(TypeError):
        process.emu.exit_machine(machine["id"])
    gone = await create(light, env | {"SESSION_ID": "s-gone"})
    assert await wait(light, gone, "started") == (200, "started")
    light.emu.exit_machine(gone["id"], ended=False)
    assert await wait(light, gone, "stopped", version=gone["instance_id"]) == (200, "stopped")
    again = await light.api.post(f"{light.url}/_emulator/machines/{gone['id']}/exit")
    assert again.status_code == 409, again.text
    with pytest.raises(LookupError):
        light.emu.exit_machine(gone["id"])


async def test_many_light_machines_are_tasks_not_processes(
    both: dict[str, Fly], recorder: CallbackRecorder
) -> None:
    """Fifty light machines each call ready once, as tasks of this process; all stop cleanly
    when the emulator closes (a stopped machine's bot calls ended)."""
    fly = both["light"]
    machines = [
        await create(fly, contract_env(recorder.url, SESSION_ID=f"s-many-{i}")) for i in range(50)
    ]
    await eventually(lambda: len(recorder.of("ready")) >= 50, 30, "50 ready callbacks")
    assert {c.session_id for c in recorder.of("ready")} == {f"s-many-{i}" for i in range(50)}
    for machine in machines:
        assert isinstance(fly.emu.machines[machine["id"]].process, LightProcess)
    await fly.emu.aclose()
    assert all(m.process is None for m in fly.emu.machines.values())


async def test_a_light_machine_without_a_session_waits_for_its_stop(
    both: dict[str, Fly], recorder: CallbackRecorder
) -> None:
    """A machine with no SESSION_ID (a pool machine's env) calls nothing and exits 0 on stop;
    one without a callback token exits 3 at once, as the test bot's bad contract."""
    fly = both["light"]
    pooled = await create(fly, {"POOL_TOKEN": "p", "DISPATCHER_URL": recorder.url})
    assert await wait(fly, pooled, "started") == (200, "started")
    await stop(fly, pooled)
    assert await wait(fly, pooled, "stopped", version=pooled["instance_id"]) == (200, "stopped")
    broken = await create(fly, contract_env(recorder.url, BOT_CALLBACK_TOKEN=None))
    assert await wait(fly, broken, "stopped", version=broken["instance_id"]) == (200, "stopped")
    codes = [
        (await fly.api.get(f"/machines/{m['id']}")).json()["events"][0]["request"]["exit_event"][
            "exit_code"
        ]
        for m in (pooled, broken)
    ]
    assert codes == [0, 3]
    assert recorder.calls == []
