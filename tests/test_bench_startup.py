"""bench/startup.py at a tiny size: the report's structure and consistency, never its timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.startup import PHASES, StartupOptions, format_report, run_startup

SESSIONS = 4


@pytest.mark.slow
async def test_startup_bench_smoke(tmp_path: Path) -> None:
    """Every phase: every session started and ready, ordered percentiles, a critical path, the
    dispatcher's CPU measured, every target computed, and a printable, JSON-able report."""
    options = StartupOptions(
        sessions=SESSIONS, concurrency=2, profile="fast", quiet_s=0.2, warmup=1, alone_starts=2
    )
    report = await run_startup(options, tmp_path)

    assert list(report["phases"]) == list(PHASES)
    for name, phase in report["phases"].items():
        assert phase["errors"] == [], (name, phase["errors"])
        assert phase["started"] == phase["ready"] == SESSIONS, name
        assert phase["all_ready"] and phase["ended"], name
        for what in ("join_s", "ready_s"):
            figures = phase[what]
            assert figures["n"] == SESSIONS, (name, what)
            assert 0 < figures["p50"] <= figures["p95"] <= figures["p99"] <= figures["max"]
        assert phase["join_s"]["p50"] < phase["ready_s"]["max"], name
        assert set(phase["critical_path_s"]) == {"join_s", "ready_s"}
    for name in ("cold", "pool-running", "pool-suspended", "pool-stopped"):
        phase = report["phases"][name]
        assert phase["cpu_ms_per_start"] > 0, name
        assert phase["cpu"]["start_alone"]["starts"] == 2, name
        assert phase["cpu_ms_per_start_alone"] > 0, name
        assert phase["dispatcher_log"]["errors"] == 0, (name, phase["dispatcher_log"])
    for name in ("pool-running", "pool-suspended", "pool-stopped"):
        pool = report["phases"][name]["pool"]
        assert pool["filled"], pool
        assert (pool["claims"], pool["misses"]) == (SESSIONS, 0), pool
    reference = report["phases"]["reference"]
    assert list(reference["steps_s"]) == [
        "create_room",
        "bot_token",
        "list_machines",
        "create_machine",
        "wait_started",
        "user_token",
    ]
    assert all(t["value"] is not None and t["pass"] in (True, False) for t in report["targets"])

    out = tmp_path / "startup.json"
    out.write_text(json.dumps(report))
    assert json.loads(out.read_text())["options"]["sessions"] == SESSIONS
    text = format_report(report)
    assert "targets:" in text and all(name in text for name in PHASES)


@pytest.mark.slow
async def test_startup_bench_profiles_the_burst_and_the_starts_alone(tmp_path: Path) -> None:
    """--cprofile: one profile of the dispatcher's event loop per window, each with its own time
    by package and the dispatcher's functions, and a note for each in the printed report."""
    options = StartupOptions(
        sessions=2,
        concurrency=2,
        profile="fast",
        quiet_s=0.2,
        warmup=0,
        alone_starts=2,
        phases=("cold",),
        cprofile=True,
    )
    report = await run_startup(options, tmp_path)

    profiles = report["phases"]["cold"]["cprofile"]
    assert set(profiles) == {"burst", "alone"}
    for profile in profiles.values():
        assert profile["total_s"] > 0
        assert sum(profile["by_package"].values()) > 0.95
        assert any("sessions.py" in name for _, name in profile["dispatcher_cumulative"])
    text = format_report(report)
    assert "cProfile of the burst window" in text
    assert "cProfile of the alone window" in text
