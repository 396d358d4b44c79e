"""bench/cpu_floor.py at a tiny size: the report's structure and arithmetic, never its timings."""

from __future__ import annotations

import json

import pytest

from bench.cpu_floor import TARGET_MS, format_report, run_floor


@pytest.mark.slow
async def test_cpu_floor_smoke(pg_database_url: str) -> None:
    """Every operation measured (100 calls: the server's CPU is read in 10 ms ticks; the sqlite3
    ones may still round to 0), the store on SQLite and PostgreSQL, each floor the sum of its
    parts, the ratios against the target, a printable, JSON-able report."""
    report = await run_floor(n=100, warmup=5, database_url=pg_database_url)
    ops, stores, floors = report["ops_ms"], report["store_ms"], report["floor_ms"]
    assert set(ops) == {
        "request_in",
        "request_out",
        "tokens",
        "select_aiosqlite",
        "select_sqlite3",
        "start_writes_sqlite3",
    }
    assert all(value >= 0 for value in ops.values()), ops
    assert ops["request_out"] > 0 and ops["request_in"] > 0, ops
    assert set(stores) == {"sqlite", "postgresql"}
    for store in stores.values():
        assert set(store) == {"rate_limit", "create_session", "dispatched", "select"}
        assert all(value > 0 for value in store.values()), store
    libraries = ops["request_in"] + 2 * ops["request_out"] + ops["tokens"]
    assert floors["libraries_alone"] == pytest.approx(libraries)
    assert floors["libraries_to_ready"] == pytest.approx(
        libraries + ops["request_out"] + ops["request_in"]
    )
    sqlite = stores["sqlite"]
    assert floors["with_store_sqlite"] == pytest.approx(
        libraries + sqlite["rate_limit"] + sqlite["create_session"] + sqlite["dispatched"]
    )
    assert floors["with_sqlite3_writes"] == pytest.approx(libraries + ops["start_writes_sqlite3"])
    for name, value in floors.items():
        assert report["floor_over_target"][name] == pytest.approx(value / TARGET_MS)
    text = format_report(report)
    assert set(floors) == {
        "libraries_alone",
        "libraries_to_ready",
        "with_store_sqlite",
        "with_store_postgresql",
        "with_sqlite3_writes",
    }
    for name in floors:
        assert name in text
    json.dumps(report)
