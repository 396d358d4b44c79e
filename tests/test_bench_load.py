"""bench/load.py at a tiny size: the report's structure and consistency, never its timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.load import LoadOptions, format_report, run_load

STARTS = 10


@pytest.mark.slow
async def test_load_bench_smoke(tmp_path: Path) -> None:
    """Both limit modes: every start answered and counted, every 200 a session that ended on
    its own, nothing left running, and a printable report."""
    options = LoadOptions(
        starts=STARTS,
        concurrency=5,
        profile="fast",
        limits=("realistic", "lifted"),
        bot_seconds=0.2,
        create_queue_wait_s=2.0,
    )
    report = await run_load(options, tmp_path)

    assert [run["mode"] for run in report["runs"]] == ["realistic", "lifted"]
    for run in report["runs"]:
        assert run["starts"] == STARTS == sum(run["status"].values())
        assert set(run["answer_s"]) == set(run["status"])
        started = run["status"].get("200", 0)
        assert started >= 1, run["status"]
        assert set(run["answer_s"]["200"]) == {"p50", "p90", "p99", "max"}
        assert run["sessions_started"] == started == run["sessions_known"]
        assert run["session_states"] == {"ended": started}, run["session_states"]
        assert run["fly"]["machines_created"] >= started
        assert run["daily"]["rooms_created"] >= started
        assert run["machines_gone"]
        left = run["leftover"]
        assert (left["active_sessions"], left["live_machines"], left["bot_processes"]) == (0, 0, 0)
        assert run["peak_rss_bytes"] > 0
        assert run["cpu_load"]["dispatcher_s"] is not None
        assert run["dispatcher_exit_code"] == -15
        assert run["dispatcher_log"]["errors"] == 0, run["dispatcher_log"]
    realistic, lifted = report["runs"]
    assert set(realistic["status"]) <= {"200", "429 queue-full", "502 upstream-error"}
    assert lifted["status"] == {"200": STARTS}
    assert lifted["fly"]["rate_limited"] == {} and lifted["daily"]["rate_limited"] == {}

    text = format_report(report)
    assert "limits realistic" in text and "limits lifted" in text and "time to answer" in text
