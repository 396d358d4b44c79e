"""bench/start_rate.py at a tiny rate and window: every figure of every mode is reported,
never its timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.start_rate import GAUGES, MODES, RateOptions, format_report, run_rates
from testkit.databases import PG_URL
from tests.conftest import _require_pg


@pytest.mark.slow
@pytest.mark.timeout(600)  # four dispatchers, one after the other, on a loaded machine
async def test_start_rate_bench_smoke(tmp_path: Path) -> None:
    """Each mode at 1 start/s for a few seconds, sessions of one second: every offered start
    answered and counted, the latencies, upstream 429s, backlogs, CPU and pool counters reported;
    a pool (and the stock mode's rooms) filled first; a printable, JSON-able report."""
    await _require_pg()
    options = RateOptions(
        rates=(1.0,),
        modes=MODES,
        seconds=4.0,
        session_s=1.0,
        pool_size=2,
        room_stock=3,
        profile="fast",
        database_url=PG_URL,
    )
    report = await run_rates(options, tmp_path)

    assert [(r["mode"], r["rate"]) for r in report["runs"]] == [(m, 1.0) for m in MODES]
    for run in report["runs"]:
        assert "error" not in run, run
        assert run["offered"] == 4
        assert sum(run["answers"].values()) == run["offered"]
        assert (
            run["started"] + sum(n for key, n in run["answers"].items() if key != "200")
            == run["offered"]
        )
        assert run["starts_per_s"] >= 0 and run["second_half_starts_per_s"] >= 0
        assert run["ours_429"] >= 0 and run["ours_429_second_half"] >= 0
        assert set(run["upstream_429"]) == {"fly", "daily"}
        assert set(run["upstream_requests"]) == {"fly", "daily"}
        if run["started"]:
            assert {"n", "p50", "p95", "max"} <= set(run["start_s"])
        assert set(run["backlog"]) <= set(GAUGES)
        assert "fly_creates_queued" in run["backlog"]
        for figure in run["backlog"].values():
            assert {"first", "last", "max", "slope_per_s"} <= set(figure)
        assert isinstance(run["sustained"], bool)
        # The dispatcher served starts over the window: some CPU, and never more than the
        # machine has; the busy share is a fraction.
        assert 0 < run["cpu"]["dispatcher_cores"] <= report["machine"]["cpus"]
        assert run["cpu"]["bench_cores"] > 0 and 0 <= run["cpu"]["machine_busy"] <= 1
        assert set(run["counters"]) >= {"pool_claims", "pool_misses", "pool_recycled"}
        assert run["pool_size"] == (0 if run["mode"] == "cold" else 2)
        if run["mode"] != "cold":
            assert run["pool_fill_s"] >= 0
        assert run["room_stock"] == (3 if run["mode"] == "stock" else 0)
        if run["mode"] == "stock":
            # Every Daily start took a room made ahead: none made its own.
            assert run["stock_fill_s"] >= 0 and run["counters"]["room_stock_misses"] == 0
    assert set(report["best"]) == set(MODES)
    assert report["machine"]["loadavg_before"] and report["machine"]["loadavg_after"]
    text = format_report(report)
    assert "highest sustained rate" in text
    for mode in MODES:
        assert f"{mode} at 1/s" in text
    json.dumps(report)
