"""bench/scale.py at a tiny size: every figure of every level is there, never its timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.scale import ScaleOptions, format_report, run_scale
from testkit.databases import PG_URL
from tests.conftest import _require_pg

LEVELS = (10, 20)
EXITS = 2
STARTS = 2
GETS = 6


@pytest.mark.slow
async def test_scale_bench_smoke(tmp_path: Path) -> None:
    """Two levels on one dispatcher: each reached with every bot ready, measured idle (CPU,
    RSS, sockets, Fly and Daily requests), GETs and starts timed, exits with and without a
    callback followed to their sessions' ends, nothing lost; a printable, JSON-able report."""
    await _require_pg()
    options = ScaleOptions(
        levels=LEVELS,
        idle_s=1.0,
        gets=GETS,
        starts=STARTS,
        exits=EXITS,
        profile="fast",
        database_url=PG_URL,
    )
    report = await run_scale(options, tmp_path)

    raised = report["limits_raised_for_the_ramp"]
    assert raised["fly_create"]["rate"] == options.create_rate
    assert raised["daily_api"]["rate"] >= options.create_rate
    assert [level["level"] for level in report["levels"]] == list(LEVELS)
    live_before = 0
    for level in report["levels"]:
        assert level["status"] == "ok", level
        assert level["live"] == level["level"]
        assert level["ramp"]["started"] == level["level"] - live_before
        assert level["not_ready"] == {}
        idle = level["idle"]
        assert idle["wall_s"] >= options.idle_s
        assert idle["dispatcher_cpu_core"] is not None and idle["dispatcher_cpu_core"] >= 0
        assert idle["rss_mib"] > 0 and idle["rss_max_mib"] >= idle["rss_mib"]
        assert idle["sockets"] > 0
        assert idle["fly_rps"] >= 0 and idle["daily_rps"] >= 0
        assert set(idle["fly_rps_by_op"]) <= {"wait", "get", "list", "events"}, idle
        get, start = level["get_session"], level["start"]
        assert (get["seconds"]["n"], get["errors"]) == (GETS, {})
        assert set(get["seconds"]) == {"n", "p50", "p95", "max"}
        assert (start["seconds"]["n"], start["errors"]) == (STARTS, {})
        lost = level["followers_lost"]
        assert lost["total"] == lost["not_ready"] == lost["exits_not_followed"] == 0, lost
        assert lost["follow_failures_logged"] == 0
        for kind in ("callback", "silent"):
            figures = level["exit_to_end"][kind]
            assert figures["n"] == EXITS and figures["not_ended"] == 0, figures
            assert 0 <= figures["p50"] <= figures["max"]
        # the timed starts stay live; the exited sessions do not
        assert level["live_after"] == level["level"] + STARTS - 2 * EXITS
        live_before = level["live_after"]
    assert report["dispatcher_log"]["errors"] == 0, report["dispatcher_log"]
    assert report["dispatcher_exit"] == "exit code -15 on SIGTERM"

    text = format_report(report)
    for row in (
        "dispatcher CPU",
        "dispatcher RSS",
        "dispatcher sockets",
        "Fly requests/s",
        "Daily requests/s",
        "GET /sessions/{id} p50/p95",
        "POST /start p50/p95",
        "followers lost",
        "exit->end, ended",
        "exit->end, silent",
        "limits raised for the ramp",
    ):
        assert row in text
    json.dumps(report)


@pytest.mark.slow
async def test_a_level_past_its_deadline_is_reported_and_ends_the_run(tmp_path: Path) -> None:
    """A level that cannot be reached within its deadline is reported as fallen over, with
    what it reached, and no larger level is tried."""
    await _require_pg()
    options = ScaleOptions(
        levels=(30, 60),
        idle_s=1.0,
        gets=1,
        starts=1,
        exits=1,
        create_rate=1.0,
        level_timeout_s=2.0,
        profile="fast",
        database_url=PG_URL,
    )
    report = await run_scale(options, tmp_path)
    (level,) = report["levels"]
    assert level["level"] == 30
    assert level["status"].startswith("fell over: "), level["status"]
    assert "idle" not in level
    assert "fell over" in format_report(report)
