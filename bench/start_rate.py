"""Start rate: the highest rate of session starts one dispatcher sustains under Fly's and
Daily's documented limits, cold, from a warm pool, from a pool that recycles its machines, and
from that pool with Daily rooms made ahead.

    .venv/bin/python bench/start_rate.py [--rates 1,5,10,20] [--modes cold,pool,recycle,stock]
                                         [--seconds 60] [--session-s 5] [--pool-size N]
                                         [--room-stock N] [--profile realistic|fast]
                                         [--database-url URL] [--out f.json]

For each mode and each rate R, a fresh run: one dispatcher as a real child process (`python -m
dispatcher serve`, log level WARNING) on a fresh PostgreSQL database (created on
--database-url's server, dropped after), against the Fly emulator in light mode
(testkit/fakes/fly/light.py: every bot an asyncio task of this process) and the Daily emulator,
both in this process with bench/latency_profile.py's latencies and **every documented rate
limit enforced, none raised** (Fly: create 1/s burst 3 per app, start/stop/update/wait... 1/s
burst 3 per machine, get 5/s; Daily: 20 requests/s, room deletes 2/s). The dispatcher's own
pacing is its defaults (Fly creates 1/s burst 3, Daily room creates 15/s, room delete calls
1.6/s of up to 100 rooms each).

- `cold`: POOL_SIZE=0, every session a machine create.
- `pool`: a pool made ahead (stopped mode) of R x (a session + 3 s) machines, or --pool-size
  (POOL_SIZE at most 100 a region: a bigger pool is spread over up to four regions, listed in
  FLY_REGION), each destroyed after its session.
- `recycle`: the same pool with POOL_RECYCLE=true: a machine whose session ended is stopped,
  updated (a new POOL_TOKEN) and offered again.
- `stock`: `recycle` with DAILY_ROOM_STOCK: Daily rooms made ahead in batches (R x 5 s of
  them, or --room-stock), so a start makes no Daily call (dispatcher/rooms/stock.py).

A pool is filled before the window (at Fly's create limit: about a machine a second), and so is
the room stock. Then
`POST /start` is offered open-loop at R a second for --seconds, each as a user of its own; a
429 is counted, never retried. Every session's bot ends itself --session-s after its ready
(`exit_after_s`, with its `ended` callback). Reported per run: achieved starts/s (the whole
window, and its second half: what is sustained once a pool has drained), the answers by status
and code, upstream 429s (the emulators' refusals, by operation: the dispatcher retries them),
`POST /start` latency and start to ready (p50/p95), and the backlogs sampled every 2 s from the
dispatcher's /metrics: Fly creates queued, Daily room creates queued, room deletes queued, rooms
awaiting delete, with their growth (a least-squares slope over the window's second half, per
second), and the CPU over the window in cores (the dispatcher's; this process's, which serves
the emulators and their light bots and makes the load; the machine's busy share). A rate is
**sustained** when the second half achieves at least 90% of R, no start of
it got a 429, and neither create queue grows (slope under 0.1/s). Rooms awaiting delete are
reported apart: they grow whenever sessions end faster than the deletes go (up to 160 rooms a
second in batch calls), and are bounded by the rooms' `exp` (a room past it when its call is
formed is marked deleted without a call: dispatcher/janitor.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench import latency_profile
from bench.load import PROFILES, token
from bench.report import CpuMark, emit, ms, summary
from dispatcher.store import engine_url
from testkit.databases import PG_URL, fresh_database
from testkit.fakes.daily import DailyEmulator
from testkit.fakes.fly import FlyEmulator
from testkit.harness import (
    daily_emulator,
    dispatcher_process,
    emulators,
    fly_emulator,
)

MODES = ("cold", "pool", "recycle", "stock")
# The room stock holds this many seconds of starts (at most DAILY_ROOM_STOCK's 1,000).
STOCK_S = 5.0
MAX_STOCK = 1000
DEFAULT_RATES = (1.0, 5.0, 10.0, 20.0)
SAMPLE_S = 2.0
# A pool is sized to hold R sessions' worth of machines over a session and its recycling.
POOL_CYCLE_MARGIN_S = 3.0
# POOL_SIZE is at most 100 a region: a bigger pool is spread over more regions.
MAX_POOL_SIZE = 100
REGIONS = ("iad", "ord", "dfw", "ewr")
START_TIMEOUT_S = 60.0
SETTLE_S = 30.0
SUSTAINED_SHARE = 0.9
GROWING_SLOPE = 0.1
METRIC = re.compile(r"^(\w+)(?:\{([^}]*)\})? ([-+0-9.eEinfa]+)$")


@dataclass(frozen=True)
class RateOptions:
    """One invocation of the bench."""

    rates: tuple[float, ...] = DEFAULT_RATES
    modes: tuple[str, ...] = MODES
    seconds: float = 60.0
    session_s: float = 5.0
    pool_size: int | None = None
    room_stock: int | None = None
    profile: str = "realistic"
    database_url: str = PG_URL
    fill_timeout_s: float = 300.0

    def fill_timeout_for(self, pool: int) -> float:
        """How long a pool of `pool` machines may take to fill: made at Fly's create limit
        (paced at one each 1.1 s), with room to spare."""
        return max(self.fill_timeout_s, 1.5 * pool)

    def pool_for(self, rate: float) -> int:
        """The pool's size at `rate` (all regions together): --pool-size, else enough machines
        for R sessions over a session and its cycle."""
        if self.pool_size is not None:
            return self.pool_size
        return max(1, math.ceil(rate * (self.session_s + POOL_CYCLE_MARGIN_S)))

    def stock_for(self, rate: float) -> int:
        """DAILY_ROOM_STOCK at `rate`: --room-stock, else STOCK_S of starts."""
        if self.room_stock is not None:
            return self.room_stock
        return min(MAX_STOCK, max(1, math.ceil(rate * STOCK_S)))


def spread(total: int) -> tuple[tuple[str, ...], int]:
    """The regions a pool of `total` machines takes (POOL_SIZE is at most 100 a region) and
    the POOL_SIZE of each."""
    count = min(len(REGIONS), max(1, math.ceil(total / MAX_POOL_SIZE)))
    return REGIONS[:count], min(MAX_POOL_SIZE, math.ceil(total / count))


@dataclass
class Answer:
    """One offered start: when it was sent (seconds into the window), its answer and time."""

    sent_s: float
    key: str
    seconds: float
    session_id: str | None = None


@dataclass
class Samples:
    """The dispatcher's gauges, every SAMPLE_S: (seconds into the window, value) by name."""

    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, at: float, name: str, value: float) -> None:
        self.series.setdefault(name, []).append((at, value))

    def figures(self, since: float) -> dict[str, Any]:
        """Per gauge: its first, last and highest value, and its slope (per second) after
        `since`."""
        out: dict[str, Any] = {}
        for name, points in sorted(self.series.items()):
            late = [(t, v) for t, v in points if t >= since]
            out[name] = {
                "first": points[0][1],
                "last": points[-1][1],
                "max": max(v for _, v in points),
                "slope_per_s": slope(late),
            }
        return out


def slope(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of (t, v) points; None with fewer than 3."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as `name{labels}` -> value."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = METRIC.match(line.strip())
        if match:
            name, labels, value = match.groups()
            key = f"{name}{{{labels}}}" if labels else name
            try:
                values[key] = float(value)
            except ValueError:
                continue
    return values


GAUGES = {
    "fly_creates_queued": 'dispatcher_paced_queue{call="fly_create"}',
    "room_creates_queued": 'dispatcher_paced_queue{call="daily_room_create"}',
    "room_deletes_queued": 'dispatcher_paced_queue{call="daily_room_delete"}',
    "rooms_awaiting_delete": "dispatcher_rooms_awaiting_delete",
    "room_stock": "dispatcher_room_stock",
}
COUNTERS = {
    "pool_claims": "dispatcher_pool_claims_total",
    "pool_misses": "dispatcher_pool_misses_total",
    "pool_recycled": "dispatcher_pool_recycled_total",
    "pool_recycle_failures": "dispatcher_pool_recycle_failures_total",
    "pool_start_failures": "dispatcher_pool_start_failures_total",
    "room_stock_misses": "dispatcher_room_stock_misses_total",
}


class Database:
    """Reads of the dispatcher's tables (never through the dispatcher)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def pool_states(self) -> Counter[str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.text("SELECT state, count(*) FROM pool_machines GROUP BY state")
            )
            return Counter({row[0]: int(row[1]) for row in rows})

    async def sessions(self, ids: list[str]) -> dict[str, tuple[str, float, float | None]]:
        """(state, created_at, ready_at) of each of `ids`."""
        wanted = set(ids)
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.text("SELECT id, state, created_at, ready_at FROM sessions")
            )
            return {
                r[0]: (r[1], float(r[2]), None if r[3] is None else float(r[3]))
                for r in rows
                if r[0] in wanted
            }

    async def room_stock(self) -> int:
        async with self.engine.connect() as conn:
            return int(await conn.scalar(sa.text("SELECT count(*) FROM room_stock")) or 0)


async def fill_stock(db: Database, size: int, timeout_s: float) -> float:
    """Wait until the room stock holds `size` rooms; how long it took."""
    began = time.monotonic()
    while await db.room_stock() < size:
        if time.monotonic() - began > timeout_s:
            raise TimeoutError(f"the room stock did not reach {size} rooms in {timeout_s:.0f} s")
        await asyncio.sleep(0.5)
    return time.monotonic() - began


async def fill_pool(db: Database, size: int, timeout_s: float) -> float:
    """Wait until `size` pool machines are available; how long it took."""
    began = time.monotonic()
    while (await db.pool_states())["available"] < size:
        if time.monotonic() - began > timeout_s:
            raise TimeoutError(f"the pool did not reach {size} machines in {timeout_s:.0f} s")
        await asyncio.sleep(1.0)
    return time.monotonic() - began


async def offer(url: str, rate: float, seconds: float, body: bytes) -> list[Answer]:
    """POST /start at `rate` a second for `seconds`, open-loop (each as a user of its own, at
    its time whatever the answers before it); every answer."""
    count = max(1, round(rate * seconds))
    answers: list[Answer] = []
    timeout = httpx.Timeout(START_TIMEOUT_S, connect=30.0)
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=100)
    async with httpx.AsyncClient(
        base_url=url, timeout=timeout, limits=limits, trust_env=False
    ) as http:
        began = time.monotonic()

        async def one(index: int) -> None:
            delay = began + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.monotonic()
            user = f"rate-{index:06d}"
            headers = {"Authorization": f"Bearer {token(user)}", "Content-Type": "application/json"}
            try:
                response = await http.post("/start", content=body, headers=headers)
            except httpx.HTTPError as exc:
                key, sid = f"error {type(exc).__name__}", None
            else:
                try:
                    data = response.json()
                except ValueError:
                    data = {}
                data = data if isinstance(data, dict) else {}
                sid = data.get("sessionId") if response.status_code == 200 else None
                key = "200" if sid else f"{response.status_code} {data.get('code') or '-'}"
            answers.append(Answer(sent - began, key, time.monotonic() - sent, sid))

        await asyncio.gather(*(one(i) for i in range(count)))
    return sorted(answers, key=lambda a: a.sent_s)


async def sample(url: str, samples: Samples, began: float, stop: asyncio.Event) -> None:
    """Read the dispatcher's /metrics every SAMPLE_S until `stop`."""
    async with httpx.AsyncClient(base_url=url, timeout=10.0, trust_env=False) as http:
        while not stop.is_set():
            try:
                values = parse_metrics((await http.get("/metrics")).text)
            except httpx.HTTPError:
                values = {}
            at = time.monotonic() - began
            for name, key in GAUGES.items():
                if key in values:
                    samples.add(at, name, values[key])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_S)


async def counters(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=10.0, trust_env=False) as http:
        values = parse_metrics((await http.get("/metrics")).text)
    return {name: values.get(key, 0.0) for name, key in COUNTERS.items()}


def refused(fly: FlyEmulator, daily: DailyEmulator) -> dict[str, dict[str, int]]:
    """The emulators' 429s so far, by operation."""
    return {"fly": dict(fly.limiter.refused), "daily": dict(daily.limiter.refused)}


def _minus(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


async def run_one(options: RateOptions, mode: str, rate: float, workdir: Path) -> dict[str, Any]:
    """One mode at one rate, on a fresh dispatcher, database and emulators."""
    fly = fly_emulator(light_machines=True, regions=dict.fromkeys(REGIONS))
    daily = daily_emulator()
    latency_profile.apply(fly, daily, latency_scale=PROFILES[options.profile])
    regions, per_region = spread(options.pool_for(rate))
    if mode == "cold":
        regions, per_region = regions[:1], 0
    pool_size = per_region * len(regions)
    stock = options.stock_for(rate) if mode == "stock" else 0
    result: dict[str, Any] = {
        "mode": mode,
        "rate": rate,
        "pool_size": pool_size,
        "room_stock": stock,
        "regions": list(regions),
    }
    async with (
        fresh_database(options.database_url, prefix="rate_") as database_url,
        emulators(fly=fly, daily=daily) as urls,
    ):
        env = latency_profile.dispatcher_pacing() | {
            "DISPATCHER_NAME": "rate",
            "FLY_REGION": ",".join(regions),
            "MAX_SESSIONS": "100000",
            "MAX_SESSIONS_PER_USER": "1",
            "READY_TIMEOUT_S": "60",
            "SESSION_MAX_DURATION_S": str(int(options.session_s) + 120),
            "POOL_SIZE": str(per_region),
            "POOL_MODE": "stopped",
            "POOL_INTERVAL_S": "1",
            "POOL_RECYCLE": "true" if mode in ("recycle", "stock") else "false",
            "DAILY_ROOM_STOCK": str(stock),
        }
        engine = create_async_engine(engine_url(database_url))
        db = Database(engine)
        try:
            async with dispatcher_process(
                urls, workdir, db=database_url, env=env, log_level="WARNING"
            ) as proc:
                await proc.start()
                if pool_size:
                    result["pool_fill_s"] = await fill_pool(
                        db, pool_size, options.fill_timeout_for(pool_size)
                    )
                if stock:
                    result["stock_fill_s"] = await fill_stock(db, stock, options.fill_timeout_s)
                before = refused(fly, daily)
                requests_before = len(fly.requests), len(daily.requests)
                script = {"exit_after_s": options.session_s, "ready_delay_s": 0.3}
                body = json.dumps({"createDailyRoom": True, "body": {"testBot": script}}).encode()
                samples, stop = Samples(), asyncio.Event()
                cpu_before = CpuMark.take(proc.pid)
                began = time.monotonic()
                sampler = asyncio.create_task(sample(proc.url, samples, began, stop))
                answers = await offer(proc.url, rate, options.seconds, body)
                window_s = time.monotonic() - began
                cpu = cores(CpuMark.take(proc.pid).since(cpu_before))
                stop.set()
                await sampler
                after = refused(fly, daily)
                requests = (
                    len(fly.requests) - requests_before[0],
                    len(daily.requests) - (requests_before[1]),
                )
                ids = [a.session_id for a in answers if a.session_id]
                states = await settle(db, ids)
                result |= figures(options, rate, answers, states, samples)
                result["upstream_429"] = {
                    "fly": _minus(after["fly"], before["fly"]),
                    "daily": _minus(after["daily"], before["daily"]),
                }
                result["upstream_requests"] = {"fly": requests[0], "daily": requests[1]}
                result["window_s"] = window_s
                result["cpu"] = cpu
                result["counters"] = await counters(proc.url)
                result["pool_at_end"] = dict(await db.pool_states())
                result["sustained"] = sustained(result, rate)
                proc.terminate()
                try:
                    await proc.wait(60)
                except TimeoutError:
                    await proc.aclose()
        finally:
            await engine.dispose()
    return result


def cores(spent: dict[str, float | None]) -> dict[str, float]:
    """CPU seconds over a window as cores on average: the dispatcher's, this process's (the
    emulators, their light bots, the load), and the machine's busy share."""
    wall = spent["wall_s"] or 1.0
    return {
        "dispatcher_cores": (spent["dispatcher_s"] or 0.0) / wall,
        "bench_cores": (spent["bench_s"] or 0.0) / wall,
        "machine_busy": spent["machine_busy"] or 0.0,
    }


async def settle(db: Database, ids: list[str]) -> dict[str, tuple[str, float, float | None]]:
    """The sessions once none is still starting (or SETTLE_S has passed)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        states = await db.sessions(ids)
        pending = [s for s, _, _ in states.values() if s in ("starting", "dispatched")]
        if not pending or time.monotonic() > deadline:
            return states
        await asyncio.sleep(1.0)


def figures(
    options: RateOptions,
    rate: float,
    answers: list[Answer],
    states: dict[str, tuple[str, float, float | None]],
    samples: Samples,
) -> dict[str, Any]:
    """What one run achieved."""
    half = options.seconds / 2
    ok = [a for a in answers if a.session_id]
    late = [a for a in answers if a.sent_s >= half]
    late_ok = [a for a in late if a.session_id]
    to_ready = [
        ready - created
        for created, ready in ((c, r) for _, c, r in states.values())
        if ready is not None
    ]
    ours_429 = sum(1 for a in answers if a.key.startswith("429"))
    return {
        "offered": len(answers),
        "started": len(ok),
        "starts_per_s": len(ok) / options.seconds,
        "second_half_starts_per_s": len(late_ok) / (options.seconds - half),
        "answers": dict(sorted(Counter(a.key for a in answers).items())),
        "ours_429": ours_429,
        "ours_429_second_half": sum(1 for a in late if a.key.startswith("429")),
        "start_s": summary([a.seconds for a in ok], (50, 95), count=True),
        "to_ready_s": summary(to_ready, (50, 95), count=True),
        "never_ready": sum(1 for _, _, r in states.values() if r is None),
        "session_states": dict(Counter(s for s, _, _ in states.values())),
        "backlog": samples.figures(half),
    }


def sustained(result: dict[str, Any], rate: float) -> bool:
    """At least 90% of the rate achieved in the second half, no 429 of ours there, and
    neither create queue growing."""
    if result["second_half_starts_per_s"] < SUSTAINED_SHARE * rate:
        return False
    if result["ours_429_second_half"]:
        return False
    for name in ("fly_creates_queued", "room_creates_queued"):
        growth = (result["backlog"].get(name) or {}).get("slope_per_s")
        if growth is not None and growth > GROWING_SLOPE:
            return False
    return True


async def run_rates(
    options: RateOptions,
    workdir: Path,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every mode at every rate, one fresh run each; the whole report."""
    report: dict[str, Any] = {
        "options": asdict(options) | {"database_url": "(a fresh database each run)"},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": os.getloadavg(),
        },
        "limits": latency_profile.describe(),
        "runs": [],
    }
    began = time.perf_counter()
    for mode in options.modes:
        for rate in sorted(options.rates):
            stamp = datetime.now(UTC).strftime("%H:%M:%S")
            print(f"[{stamp}] {mode} at {rate:g}/s", file=sys.stderr, flush=True)
            try:
                run = await run_one(options, mode, rate, workdir)
            except Exception as exc:  # a run that fell over is reported, the next one tried
                run = {"mode": mode, "rate": rate, "error": f"{type(exc).__name__}: {exc}"}
            run["loadavg_after"] = os.getloadavg()
            report["runs"].append(run)
            if progress is not None:
                progress(report)
    report["machine"]["loadavg_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - began
    report["best"] = {
        mode: max(
            (r["rate"] for r in report["runs"] if r["mode"] == mode and r.get("sustained")),
            default=None,
        )
        for mode in options.modes
    }
    return report


def _p(figures: Any) -> str:
    if not figures:
        return "-"
    return f"{ms(figures['p50'], '')} / {ms(figures['p95'], ' ms')}"


def _backlog(run: dict[str, Any], name: str) -> str:
    figure = (run.get("backlog") or {}).get(name)
    if not figure:
        return "-"
    growth = figure["slope_per_s"]
    grows = "-" if growth is None else f"{growth:+.2f}/s"
    return f"{figure['last']:.0f} (max {figure['max']:.0f}, {grows})"


def _upstream(run: dict[str, Any]) -> str:
    up = run.get("upstream_429") or {}
    parts = [f"{api} {op} {n}" for api in ("fly", "daily") for op, n in (up.get(api) or {}).items()]
    return ", ".join(parts) or "0"


def _cpu(run: dict[str, Any]) -> str:
    cpu = run.get("cpu")
    if not cpu:
        return "-"
    return (
        f"{cpu['dispatcher_cores']:.2f} / {cpu['bench_cores']:.2f} core, "
        f"{cpu['machine_busy'] * 100:.0f}%"
    )


def format_report(report: dict[str, Any]) -> str:
    """The report as printed: one line per run."""
    o = report["options"]
    lines = [
        f"start rate: one dispatcher (PostgreSQL, a real process), Fly emulator (light "
        f"machines) and Daily emulator with their documented limits, profile {o['profile']}; "
        f"{report['date']}; {report['machine']['cpus']} CPUs, load average before "
        + " ".join(f"{v:.2f}" for v in report["machine"]["loadavg_before"]),
        f"each run: starts offered open-loop for {o['seconds']:g} s (429s not retried), "
        f"sessions of {o['session_s']:g} s after ready",
        "",
    ]
    head = [
        "mode",
        "R/s",
        "pool",
        "achieved/s",
        "2nd half/s",
        "429 ours",
        "429 upstream",
        "start p50/p95",
        "to ready p50/p95",
        "Fly creates queued",
        "room creates queued",
        "rooms awaiting delete",
        "CPU dispatcher/bench/busy",
        "sustained",
    ]
    rows = [head]
    for run in report["runs"]:
        if "error" in run:
            rows.append([run["mode"], f"{run['rate']:g}", "-", run["error"][:60]] + [""] * 10)
            continue
        rows.append(
            [
                run["mode"],
                f"{run['rate']:g}",
                str(run["pool_size"]),
                f"{run['starts_per_s']:.2f}",
                f"{run['second_half_starts_per_s']:.2f}",
                str(run["ours_429"]),
                _upstream(run),
                _p(run["start_s"]),
                _p(run["to_ready_s"]),
                _backlog(run, "fly_creates_queued"),
                _backlog(run, "room_creates_queued"),
                _backlog(run, "rooms_awaiting_delete"),
                _cpu(run),
                "yes" if run["sustained"] else "no",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    lines.append("")
    for run in report["runs"]:
        if "error" in run:
            continue
        c = run["counters"]
        lines.append(
            f"{run['mode']} at {run['rate']:g}/s: answers {run['answers']}; pool claims "
            f"{c['pool_claims']:.0f}, misses {c['pool_misses']:.0f}, recycled "
            f"{c['pool_recycled']:.0f} (failed {c['pool_recycle_failures']:.0f}); room stock "
            f"{run.get('room_stock', 0)}, misses {c['room_stock_misses']:.0f}; pool at end "
            f"{run['pool_at_end']}; never ready {run['never_ready']}; load after "
            + " ".join(f"{v:.1f}" for v in run["loadavg_after"])
        )
    best = report.get("best") or {}
    lines.append(
        "highest sustained rate: "
        + ", ".join(f"{mode} {'-' if r is None else f'{r:g}/s'}" for mode, r in best.items())
    )
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, ...]:
    values = tuple(float(part) for part in text.split(",") if part.strip())
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("rates are positive numbers, comma-separated")
    return values


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(part.strip() for part in text.split(",") if part.strip())
    if not modes or set(modes) - set(MODES):
        raise argparse.ArgumentTypeError(f"modes are some of {','.join(MODES)}")
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=_floats, default=DEFAULT_RATES, metavar="R,R,...")
    parser.add_argument("--modes", type=_modes, default=MODES, metavar="cold,pool,recycle,stock")
    parser.add_argument("--seconds", type=float, default=60.0, help="the window of each run")
    parser.add_argument("--session-s", type=float, default=5.0, help="a session after ready")
    parser.add_argument(
        "--pool-size", type=int, help="machines in all (default: R x (session + 3 s))"
    )
    parser.add_argument(
        "--room-stock", type=int, help=f"stock mode's rooms (default: R x {STOCK_S:g} s)"
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="realistic")
    parser.add_argument("--database-url", default=PG_URL, help="the PostgreSQL server to use")
    parser.add_argument("--out", type=Path, help="write the report as JSON here too")
    args = parser.parse_args()
    options = RateOptions(
        rates=args.rates,
        modes=args.modes,
        seconds=args.seconds,
        session_s=args.session_s,
        pool_size=args.pool_size,
        room_stock=args.room_stock,
        profile=args.profile,
        database_url=args.database_url,
    )
    started = time.perf_counter()

    def progress(report: dict[str, Any]) -> None:
        if args.out is not None:
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="rate-") as workdir:
        report = asyncio.run(run_rates(options, Path(workdir), progress))
    emit(format_report(report), report, args.out, started=started)


if __name__ == "__main__":
    main()
