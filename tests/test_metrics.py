"""GET /metrics: the values after a scripted run of sessions, and where it is served."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.app import create_app
from dispatcher.config import Settings
from dispatcher.metrics import Metrics
from dispatcher.store import ACTIVE_STATES
from testkit.fakes.common import Fault
from testkit.harness import Stack, dispatcher_env, dispatcher_stack, fly_emulator
from testkit.waits import eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(stack: Stack) -> Samples:
    """Every sample of /metrics, by name and labels."""
    response = await stack.http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def labelled(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


@pytest.mark.slow
async def test_metrics_after_a_scripted_run(tmp_path: Path) -> None:
    """One session ready then deleted, one crashing before ready, one ready timeout, one start
    refused at capacity, and a Fly create answered 429 once: the counters, histograms and the
    sessions gauge say exactly that."""
    fly = fly_emulator()
    fly.faults.add("create", Fault(429, headers={"retry-after": "0"}))
    env = {"MAX_SESSIONS": "1", "READY_TIMEOUT_S": "3"}
    async with dispatcher_stack(tmp_path, env=env, fly=fly) as stack:
        assert stack.fly is not None
        first = await stack.start()
        assert first.status_code == 200, first.text
        ready = first.json()["sessionId"]
        await stack.wait_state(ready, "ready")
        refused = await stack.start()
        assert refused.status_code == 429 and refused.json()["code"] == "at-capacity"
        during = await scrape(stack)
        assert value(during, "dispatcher_sessions", state="ready") == 1
        assert value(during, "dispatcher_sessions", state="starting") == 0
        assert (await stack.http.delete(f"/sessions/{ready}", headers=stack.headers())).is_success
        assert (await stack.wait_state(ready, "ended"))["endReason"] == "deleted"

        crash = await stack.start({"testBot": {"exit_before_ready": 3}})
        assert crash.status_code == 200, crash.text
        crashed = await stack.wait_state(crash.json()["sessionId"], "failed")
        assert crashed["endReason"] == "crashed" and crashed["exitCode"] == 3

        slow = await stack.start({"testBot": {"skip_ready": True}})
        assert slow.status_code == 200, slow.text
        timed_out = await stack.wait_state(slow.json()["sessionId"], "failed", timeout=30)
        assert timed_out["endReason"] == "ready_timeout"

        async def all_ended() -> bool:
            ends = labelled(await scrape(stack), "dispatcher_session_ends_total")
            return sum(ends.values()) >= 3

        await eventually(all_ended, timeout=15, what="three session ends counted")
        machines = list(stack.fly.machines.values())
        await eventually(
            lambda: all(m.state == "destroyed" for m in machines),
            timeout=20,
            what="every machine destroyed",
        )
        samples = await scrape(stack)

    assert labelled(samples, "dispatcher_session_ends_total") == {
        frozenset({("state", "ended"), ("reason", "deleted")}): 1,
        frozenset({("state", "failed"), ("reason", "crashed")}): 1,
        frozenset({("state", "failed"), ("reason", "ready_timeout")}): 1,
    }
    assert labelled(samples, "dispatcher_start_failures_total") == {
        frozenset({("code", "at-capacity")}): 1
    }
    calls = "dispatcher_upstream_calls_total"
    assert value(samples, calls, api="fly", operation="create", status="200") == 3
    assert value(samples, calls, api="fly", operation="create", status="429") == 1
    assert value(samples, calls, api="daily", operation="create_room", status="200") == 3
    assert value(samples, "dispatcher_upstream_retries_total", api="fly", operation="create") == 1
    assert value(samples, "dispatcher_join_url_seconds_count") == 3
    assert value(samples, "dispatcher_ready_seconds_count") == 1
    assert value(samples, "dispatcher_session_duration_seconds_count") == 3
    assert value(samples, "dispatcher_reconciler_leader") == 1
    assert value(samples, "dispatcher_create_queue_depth") == 0
    for state in ACTIVE_STATES:
        assert value(samples, "dispatcher_sessions", state=state) == 0


def internal_port_app(port: int) -> httpx.AsyncClient:
    env = dispatcher_env(
        fly_url="http://127.0.0.1:1",
        daily_url="http://127.0.0.1:2",
        dispatcher_url=f"http://127.0.0.1:{port}",
        db="sqlite:///unused.db",
    )
    app = create_app(Settings.from_env(env | {"INTERNAL_PORT": str(port)}))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app))


async def test_metrics_only_on_the_internal_listener() -> None:
    """With INTERNAL_PORT set, /metrics answers there and 404 on the public port."""
    async with internal_port_app(7861) as http:
        public = await http.get("http://127.0.0.1:7860/metrics")
        assert public.status_code == 404 and public.json()["code"] == "not-found"
        internal = await http.get("http://127.0.0.1:7861/metrics")
        assert internal.status_code == 200
        families = {f.name: f.type for f in text_string_to_metric_families(internal.text)}
        assert families["dispatcher_start_failures"] == "counter"
        assert families["dispatcher_join_url_seconds"] == "histogram"


def test_each_metrics_has_its_own_registry() -> None:
    """Two apps in one process count apart (no global registry)."""
    one, two = Metrics(), Metrics()
    one.start_failed("at-capacity")
    name, labels = "dispatcher_start_failures_total", {"code": "at-capacity"}
    assert one.registry.get_sample_value(name, labels) == 1
    assert two.registry.get_sample_value(name, labels) is None
