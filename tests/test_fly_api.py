"""The Fly Machines client, faked at the transport: auth header, typed errors, retries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from dispatcher.aio import cancel_and_wait
from dispatcher.errors import UpstreamError, UpstreamTimeout
from dispatcher.machines import MachineExit
from dispatcher.machines.fly_api import FlyAPI, auth_header, latest_exit
from dispatcher.upstream import RetryPolicy, parse_retry_after
from testkit.harness import BOT_APP, BOT_IMAGE, FLY_TOKEN, fly_emulator
from testkit.net import serve
from testkit.waits import eventually

BASE = "https://fly.test"
APP = f"{BASE}/v1/apps/bots"
FAST = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02, max_retry_after_s=0.3)


@pytest.fixture
async def api() -> AsyncIterator[FlyAPI]:
    async with FlyAPI.client(BASE, "fm2_abc") as http:
        yield FlyAPI(http, "bots", FAST)


@pytest.mark.parametrize(
    ("token", "header"),
    [
        ("fm2_abc,fm2_def", "FlyV1 fm2_abc,fm2_def"),
        ("FlyV1 fm2_abc", "FlyV1 fm2_abc"),
        ("fm1r_xyz", "FlyV1 fm1r_xyz"),
        ("fm1a_xyz", "FlyV1 fm1a_xyz"),
        ("Bearer plain-token", "Bearer plain-token"),
        ("plain-token", "Bearer plain-token"),
    ],
)
def test_auth_header_like_fly_go(token: str, header: str) -> None:
    """Macaroons go as FlyV1, other tokens as Bearer, whatever prefix they came with."""
    assert auth_header(token) == header


@respx.mock
async def test_create_sends_body_and_parses_machine(api: FlyAPI) -> None:
    """Create posts the body once and returns the typed machine."""
    route = respx.post(f"{APP}/machines").respond(
        200,
        json={
            "id": "m1",
            "state": "created",
            "region": "iad",
            "instance_id": "v1",
            "config": {"metadata": {"session_id": "s-1"}},
        },
    )
    machine = await api.create({"config": {"image": "img:1"}})
    assert (machine.id, machine.state, machine.region, machine.instance_id) == (
        "m1",
        "created",
        "iad",
        "v1",
    )
    assert machine.metadata == {"session_id": "s-1"}
    assert route.calls.last.request.headers["authorization"] == "FlyV1 fm2_abc"


@respx.mock
async def test_errors_are_typed(api: FlyAPI) -> None:
    """An error answer becomes an UpstreamError with status, request id, code and retryability."""
    respx.post(f"{APP}/machines").respond(
        412,
        json={"error": "no capacity", "status": "insufficient_capacity"},
        headers={"fly-request-id": "req-42"},
    )
    with pytest.raises(UpstreamError) as info:
        await api.create({})
    err = info.value
    assert (err.status, err.request_id, err.upstream_code) == (
        412,
        "req-42",
        "insufficient_capacity",
    )
    assert not err.retryable and not err.ambiguous


@respx.mock
async def test_create_500_is_ambiguous_and_not_retried(api: FlyAPI) -> None:
    """A 5xx on create may have created the machine: ambiguous, and the client does not retry it."""
    route = respx.post(f"{APP}/machines").respond(500, text="oops")
    with pytest.raises(UpstreamError) as info:
        await api.create({})
    assert info.value.ambiguous and info.value.retryable
    assert route.call_count == 1


@respx.mock
async def test_read_timeout_on_create_is_ambiguous(api: FlyAPI) -> None:
    """A create that timed out after sending may have happened; a refused connection did not."""
    respx.post(f"{APP}/machines").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(UpstreamTimeout) as info:
        await api.create({})
    assert info.value.ambiguous
    respx.post(f"{APP}/machines").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(UpstreamError) as info2:
        await api.create({})
    assert not info2.value.ambiguous and info2.value.retryable


@respx.mock
async def test_get_retries_429_honouring_retry_after(api: FlyAPI) -> None:
    """A 429 with Retry-After is retried after the delay it asks for, then succeeds."""
    route = respx.get(f"{APP}/machines/m1").mock(
        side_effect=[
            httpx.Response(429, headers={"retry-after": "0.2"}, json={"error": "rate limited"}),
            httpx.Response(503, json={"error": "busy"}),
            httpx.Response(200, json={"id": "m1", "state": "started"}),
        ]
    )
    began = time.monotonic()
    machine = await api.get("m1")
    assert machine is not None and machine.state == "started"
    assert route.call_count == 3
    assert time.monotonic() - began >= 0.2


@respx.mock
async def test_get_gives_up_after_the_attempts(api: FlyAPI) -> None:
    """Retries stop after the policy's attempts, raising the last error."""
    route = respx.get(f"{APP}/machines/m1").respond(502, json={"error": "bad gateway"})
    with pytest.raises(UpstreamError) as info:
        await api.get("m1")
    assert info.value.status == 502 and route.call_count == FAST.attempts


@respx.mock
async def test_get_404_is_none_and_400_is_not_retried(api: FlyAPI) -> None:
    """An unknown machine is None; a 400 is final at once."""
    respx.get(f"{APP}/machines/gone").respond(404, json={"error": "machine not found"})
    assert await api.get("gone") is None
    bad = respx.get(f"{APP}/machines/bad").respond(400, json={"error": "bad"})
    with pytest.raises(UpstreamError):
        await api.get("bad")
    assert bad.call_count == 1


@respx.mock
async def test_wait_clamps_timeout_and_maps_408(api: FlyAPI) -> None:
    """Wait asks for at most 60 s and reports Fly's 408 as a plain timeout."""
    route = respx.get(f"{APP}/machines/m1/wait").mock(
        side_effect=[
            httpx.Response(408, json={"error": "deadline_exceeded"}),
            httpx.Response(200, json={"ok": True}),
        ]
    )
    assert await api.wait("m1", "stopped", timeout_s=300, version="v1") is False
    assert await api.wait("m1", "stopped", timeout_s=5, version="v1") is True
    first = route.calls[0].request.url.params
    assert first["timeout"] == "60" and first["state"] == "stopped" and first["version"] == "v1"


@respx.mock
async def test_stop_and_destroy(api: FlyAPI) -> None:
    """Stop sends an object body with signal and timeout; destroy forces; 404 counts as done."""
    stop = respx.post(f"{APP}/machines/m1/stop").respond(200, json={"ok": True})
    await api.stop("m1", timeout_s=12)
    assert stop.calls.last.request.read() == b'{"signal":"SIGTERM","timeout":"12s"}'
    destroy = respx.delete(f"{APP}/machines/m1").respond(404, json={"error": "not found"})
    await api.destroy("m1")
    assert destroy.calls.last.request.url.params["force"] == "true"


@respx.mock
async def test_list_by_metadata(api: FlyAPI) -> None:
    """List filters on metadata with metadata.<key> query parameters."""
    route = respx.get(f"{APP}/machines").respond(200, json=[{"id": "m1", "state": "started"}])
    machines = await api.list_machines(metadata={"session_id": "s-1"})
    assert [m.id for m in machines] == ["m1"]
    assert route.calls.last.request.url.params["metadata.session_id"] == "s-1"


def test_exit_event_is_the_newest_exit() -> None:
    """The exit code comes from the newest exit event."""
    events = [
        {
            "type": "exit",
            "timestamp": 2,
            "request": {"exit_event": {"exit_code": 3, "oom_killed": True}},
        },
        {"type": "start", "timestamp": 1},
        {"type": "exit", "timestamp": 1, "request": {"exit_event": {"exit_code": 0}}},
    ]
    exit = latest_exit(events)
    assert exit is not None and exit.exit_code == 3 and exit.oom_killed
    assert latest_exit([{"type": "launch"}]) is None


def test_exit_event_reads_monitor_event_first() -> None:
    """An exit's details come from `request.MonitorEvent.exit_event` when it is there, else from
    `request.exit_event`, as fly-go's GetExitCode reads them."""
    both = {
        "type": "exit",
        "timestamp": 2,
        "request": {
            "MonitorEvent": {"exit_event": {"exit_code": 137, "oom_killed": True, "signal": 9}},
            "exit_event": {"exit_code": 0},
        },
    }
    exit = latest_exit([both])
    assert exit == MachineExit(exit_code=137, oom_killed=True, signal=9)
    details = {"exit_code": 4, "requested_stop": True, "signal": -1}
    monitor_only = {"type": "exit", "request": {"MonitorEvent": {"exit_event": details}}}
    assert latest_exit([monitor_only]) == MachineExit(exit_code=4, requested_stop=True)
    empty_monitor = {
        "type": "exit",
        "request": {"MonitorEvent": {}, "exit_event": {"exit_code": 5}},
    }
    assert latest_exit([empty_monitor]) == MachineExit(exit_code=5)


def test_retry_after_forms() -> None:
    """Retry-After is read as seconds or as an HTTP date."""
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # type: ignore[operator]


@pytest.mark.slow
async def test_long_waits_do_not_block_other_calls() -> None:
    """Every followed session holds a connection in a long `wait`: with 120 of them pending,
    a `get` still goes through at once instead of queueing for a pooled connection."""
    fly = fly_emulator(rate_limits=False)
    async with serve(fly.app) as url, FlyAPI.client(url, FLY_TOKEN) as http:
        api = FlyAPI(http, BOT_APP, FAST)
        # Created, never launched: a wait for `started` runs to its timeout.
        created = await api.create({"config": {"image": BOT_IMAGE}, "skip_launch": True})
        waits = [
            asyncio.create_task(api.wait(created.id, "started", timeout_s=60)) for _ in range(120)
        ]
        try:
            await eventually(
                lambda: sum(r.path.endswith("/wait") for r in fly.requests) == 120,
                what="120 waits pending at Fly",
            )
            assert await api.get(created.id) is not None
            assert not any(w.done() for w in waits), "the get waited for the waits to end"
        finally:
            await cancel_and_wait(*waits)
        await api.destroy(created.id)
