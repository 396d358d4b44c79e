"""Scale: what one dispatcher spends to follow N live sessions, level after level.

    .venv/bin/python bench/scale.py [--levels 1000,5000,10000] [--idle-s 60]
                                    [--create-rate 20] [--concurrency 40] [--gets 200]
                                    [--starts 5] [--exits 5] [--level-timeout-s S]
                                    [--profile realistic|fast] [--database-url URL] [--out f.json]

One dispatcher runs as a real child process (`python -m dispatcher serve`, log level WARNING)
on a fresh PostgreSQL database (created on --database-url's server, dropped after), against the
Fly emulator in light mode (testkit/fakes/fly/light.py: every bot an asyncio task of this
process that calls ready and stays, not a process) and the Daily emulator, both in this process
with bench/latency_profile.py's latencies. It ramps the live sessions to each level in turn,
each start as a user of its own, and at each level, once every bot is ready:

- idle (--idle-s, at least 60 s by default: one whole Fly long poll), nothing asked of the
  dispatcher: its CPU (core-seconds a second, /proc/<pid>/stat), RSS and open sockets
  (/proc/<pid>/fd, sampled every 5 s), and what it asks of Fly and Daily (requests a second,
  from the emulators' request logs, Fly's by operation);
- `GET /sessions/{id}` of random live sessions (--gets, 4 at a time) and a few `POST /start`
  one after the other (--starts; they stay live), each timed by the client;
- followers lost: sessions that were live and ready and no longer are (in the store), and the
  dispatcher's "watching the session failed" log lines;
- exits (--exits of each kind): bots made to exit (exit code 0) with their `ended` callback
  first, and silently; the time from each exit (the machine's exit event) to its session's
  end (`ended_at` in the store). A session not ended within EXIT_TIMEOUT_S counts as a lost
  follower.

Rate limits: Fly's per-machine limits (wait, get, stop...) and its list limit stay as
documented; the create limit (Fly's is 1/s, burst 3, per app) is raised to --create-rate for
the ramp (and the dispatcher's FLY_CREATE_RATE with it), and Daily's 20 requests/s to at least
the same, or 10,000 sessions would take hours to start; the report says so. A ramp that does
not reach its level, or a level that takes longer than its deadline (--level-timeout-s), is
reported as fallen over, and no larger level is tried.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench import latency_profile
from bench.load import PROFILES, LoopLag, token
from bench.report import emit, ms, process_cpu_s, summary
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
from testkit.procs import DispatcherProcess

DEFAULT_LEVELS = (1000, 5000, 10000)
SAMPLE_S = 5.0
EXIT_TIMEOUT_S = 120.0
READY_POLL_S = 1.0
RAMP_ROUNDS = 3
START_TIMEOUT_S = 120.0
GET_CONCURRENCY = 4
PENDING = ("starting", "dispatched")
FOLLOW_FAILED = "watching the session failed"


@dataclass(frozen=True)
class ScaleOptions:
    """One invocation of the bench."""

    levels: tuple[int, ...] = DEFAULT_LEVELS
    idle_s: float = 60.0
    create_rate: float = 20.0
    concurrency: int = 40
    gets: int = 200
    starts: int = 5
    exits: int = 5
    level_timeout_s: float | None = None
    profile: str = "realistic"
    database_url: str = PG_URL
    seed: int = 1

    def deadline_s(self, new_sessions: int) -> float:
        """How long a level may take: its ramp three times over at the create rate (at least
        5 minutes), the idle, and 5 minutes for the probes; or --level-timeout-s."""
        if self.level_timeout_s is not None:
            return self.level_timeout_s
        return max(300.0, 3 * new_sessions / self.create_rate) + self.idle_s + 300.0


class Phase:
    """The step a level is in, announced on stderr as it begins (a long run shows progress)."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.name = "ramp"

    def enter(self, name: str, live: int) -> None:
        self.name = name
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        print(f"[{stamp}] level {self.level}: {name} ({live} live)", file=sys.stderr, flush=True)


class FellOver(Exception):
    """A level could not be reached or measured in time: why."""


# -- the dispatcher's process, from /proc ------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """The process's resident memory now (VmRSS), MiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def open_sockets(pid: int) -> int | None:
    """How many sockets the process holds open (its fds that are sockets)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    count = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
    return count


def fly_op(method: str, path: str) -> str:
    """The Machines API operation of a request, from its method and path."""
    parts = path.strip("/").split("/")  # v1 apps <app> machines [<id> [<action> ...]]
    if len(parts) <= 4:
        return {"POST": "create", "GET": "list"}.get(method, method.lower())
    if len(parts) == 5:
        return {"GET": "get", "DELETE": "destroy"}.get(method, method.lower())
    return parts[5]


# -- the sessions, from the store --------------------------------------------------------------


class Sessions:
    """Reads of the dispatcher's sessions table (never through the dispatcher)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def states(self) -> dict[str, tuple[str, str | None]]:
        """Every session's (state, machine id), by id."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.text("SELECT id, state, machine_id FROM sessions"))
            return {row[0]: (row[1], row[2]) for row in rows}

    async def ended_at(self, ids: list[str]) -> dict[str, float]:
        """When each of `ids` that has ended ended (unix time)."""
        query = sa.text("SELECT id, ended_at FROM sessions WHERE ended_at IS NOT NULL")
        async with self.engine.connect() as conn:
            rows = await conn.execute(query)
            wanted = set(ids)
            return {row[0]: float(row[1]) for row in rows if row[0] in wanted}


# -- the client ----------------------------------------------------------------------------


@dataclass
class Client:
    """The bench's users: one per session, each with its own JWT."""

    url: str
    owners: dict[str, str] = field(default_factory=dict)
    _next: int = 0

    def new_user(self) -> str:
        self._next += 1
        return f"scale-{self._next:06d}"

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token(user)}", "Content-Type": "application/json"}

    @contextlib.asynccontextmanager
    async def http(self) -> AsyncIterator[httpx.AsyncClient]:
        timeout = httpx.Timeout(START_TIMEOUT_S, connect=30.0)
        async with httpx.AsyncClient(base_url=self.url, timeout=timeout, trust_env=False) as http:
            yield http

    async def start(self, http: httpx.AsyncClient) -> tuple[str, str | None, float, float | None]:
        """One POST /start as a new user: (status key, session id, seconds, retry after)."""
        user = self.new_user()
        started = time.perf_counter()
        try:
            response = await http.post(
                "/start", content=b'{"createDailyRoom": true}', headers=self.headers(user)
            )
        except httpx.HTTPError as exc:
            return f"error {type(exc).__name__}", None, time.perf_counter() - started, None
        seconds = time.perf_counter() - started
        try:
            data = response.json()
        except ValueError:
            data = {}
        data = data if isinstance(data, dict) else {}
        if response.status_code == 200 and data.get("sessionId"):
            self.owners[data["sessionId"]] = user
            return "200", data["sessionId"], seconds, None
        retry = response.headers.get("retry-after")
        key = f"{response.status_code} {data.get('code') or '-'}"
        return key, None, seconds, float(retry) if retry and retry.isdigit() else None


@dataclass
class Ramp:
    """What starting a level's sessions took."""

    started: list[str] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @classmethod
    def merged(cls, ramps: list[Ramp]) -> Ramp:
        """Several rounds as one."""
        merged = cls()
        for one in ramps:
            merged.started += one.started
            merged.answers += one.answers
            merged.seconds += one.seconds
            merged.wall_s += one.wall_s
        return merged

    def figures(self) -> dict[str, Any]:
        return {
            "started": len(self.started),
            "wall_s": self.wall_s,
            "starts_per_s": len(self.started) / self.wall_s if self.wall_s else None,
            "answers": dict(sorted(self.answers.items())),
            "answer_s": summary(self.seconds, (50, 95)),
        }


async def ramp(client: Client, count: int, concurrency: int, result: Ramp) -> None:
    """Start `count` sessions, `concurrency` at a time; a 429 is tried again after its
    Retry-After (at most 5 s), any other failure after a second (the level's deadline bounds
    it). `result` fills as it goes."""
    left = count
    began = time.perf_counter()

    async def worker() -> None:
        nonlocal left
        async with client.http() as http:
            while left > 0:
                left -= 1
                key, sid, seconds, retry = await client.start(http)
                result.answers[key] += 1
                if sid is not None:
                    result.started.append(sid)
                    result.seconds.append(seconds)
                    continue
                left += 1
                await asyncio.sleep(min(5.0, retry or 1.0))

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    finally:
        result.wall_s = time.perf_counter() - began


async def get_latencies(client: Client, ids: list[str], n: int) -> dict[str, Any]:
    """GET /sessions/{id} of `n` random live sessions, GET_CONCURRENCY at a time."""
    picks: Iterator[str] = iter(random.choices(ids, k=n) if ids else [])
    seconds: list[float] = []
    errors: Counter[str] = Counter()

    async def worker() -> None:
        async with client.http() as http:
            for sid in picks:
                began = time.perf_counter()
                try:
                    response = await http.get(
                        f"/sessions/{sid}", headers=client.headers(client.owners[sid])
                    )
                except httpx.HTTPError as exc:
                    errors[f"error {type(exc).__name__}"] += 1
                    continue
                if response.status_code == 200:
                    seconds.append(time.perf_counter() - began)
                else:
                    errors[str(response.status_code)] += 1

    await asyncio.gather(*(worker() for _ in range(GET_CONCURRENCY)))
    return {"seconds": summary(seconds, (50, 95), count=True), "errors": dict(errors)}


async def start_latencies(client: Client, n: int) -> tuple[dict[str, Any], list[str]]:
    """`n` POST /start one after the other; their figures and the sessions they started."""
    seconds: list[float] = []
    errors: Counter[str] = Counter()
    started: list[str] = []
    async with client.http() as http:
        for _ in range(n):
            key, sid, took, _ = await client.start(http)
            if sid is None:
                errors[key] += 1
            else:
                started.append(sid)
                seconds.append(took)
    return {"seconds": summary(seconds, (50, 95), count=True), "errors": dict(errors)}, started


def _exited_at(fly: FlyEmulator, machine_id: str) -> float | None:
    machine = fly.machines.get(machine_id)
    exits = machine.exit_events() if machine is not None else []
    if not exits:
        return None
    return datetime.fromisoformat(str(exits[0]["exited_at"]).replace("Z", "+00:00")).timestamp()


async def exits_to_end(
    fly: FlyEmulator, sessions: Sessions, machines: dict[str, str], n: int
) -> tuple[dict[str, Any], list[str], int]:
    """Make `n` bots exit after their `ended` callback and `n` silently, all at once; the time
    from each exit to its session's end by kind, the sessions exited, and how many never
    ended within EXIT_TIMEOUT_S."""
    picks = random.sample(sorted(machines), min(len(machines), 2 * n))
    kinds = {sid: "callback" if i % 2 == 0 else "silent" for i, sid in enumerate(picks)}
    for sid, kind in kinds.items():
        fly.exit_machine(machines[sid], 0, ended=kind == "callback")
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    ended: dict[str, float] = {}
    while time.monotonic() < deadline:
        ended = await sessions.ended_at(picks)
        if len(ended) == len(picks):
            break
        await asyncio.sleep(0.2)
    figures: dict[str, Any] = {}
    never = 0
    for kind in ("callback", "silent"):
        times = []
        left = 0
        for sid in (s for s, k in kinds.items() if k == kind):
            exited = _exited_at(fly, machines[sid])
            if sid in ended and exited is not None:
                times.append(max(0.0, ended[sid] - exited))
            else:
                left += 1
        never += left
        figures[kind] = summary(times, (50,), count=True) | {"not_ended": left}
    return figures, picks, never


# -- one level ---------------------------------------------------------------------------


@dataclass
class Stage:
    """What one run shares between its levels."""

    options: ScaleOptions
    proc: DispatcherProcess
    fly: FlyEmulator
    daily: DailyEmulator
    client: Client
    sessions: Sessions
    live: list[str] = field(default_factory=list)
    ramps: list[Ramp] = field(default_factory=list)  # the current level's

    def alive(self) -> None:
        if not self.proc.running:
            raise FellOver(f"the dispatcher exited with {self.proc.returncode}")


async def wait_ready(stage: Stage, ids: list[str]) -> dict[str, str]:
    """Wait until none of `ids` is still starting (the level's deadline bounds it); each one's
    state then."""
    while True:
        stage.alive()
        states = await stage.sessions.states()
        mine = {sid: states.get(sid, ("unknown", None))[0] for sid in ids}
        if not any(state in PENDING for state in mine.values()):
            return mine
        await asyncio.sleep(READY_POLL_S)


async def idle(stage: Stage, seconds: float) -> dict[str, Any]:
    """Nothing asked of the dispatcher for `seconds`: what it spends and asks meanwhile."""
    pid, fly, daily = stage.proc.pid, stage.fly, stage.daily
    fly_before, daily_before = len(fly.requests), len(daily.requests)
    cpu_before, bench_before = process_cpu_s(pid), time.process_time()
    began = time.perf_counter()
    rss: list[float] = []
    sockets: list[int] = []
    with LoopLag() as lag:
        while (left := seconds - (time.perf_counter() - began)) > 0:
            stage.alive()
            if (value := rss_mib(pid)) is not None:
                rss.append(value)
            if (count := open_sockets(pid)) is not None:
                sockets.append(count)
            await asyncio.sleep(min(SAMPLE_S, left))
    wall = time.perf_counter() - began
    cpu_after, bench_after = process_cpu_s(pid), time.process_time()
    stage.alive()
    rss.append(rss_mib(pid) or 0.0)
    sockets.append(open_sockets(pid) or 0)
    fly_ops = Counter(fly_op(r.method, r.path) for r in fly.requests[fly_before:])
    daily_requests = daily.requests[daily_before:]
    return {
        "wall_s": wall,
        "dispatcher_cpu_core": (
            (cpu_after - cpu_before) / wall
            if cpu_after is not None and cpu_before is not None
            else None
        ),
        "rss_mib": rss[-1],
        "rss_max_mib": max(rss),
        "sockets": sockets[-1],
        "sockets_max": max(sockets),
        "fly_rps": sum(fly_ops.values()) / wall,
        "fly_rps_by_op": {op: n / wall for op, n in sorted(fly_ops.items())},
        "daily_rps": len(daily_requests) / wall,
        "bench_cpu_core": (bench_after - bench_before) / wall,
        "bench_loop_lag_s": summary(lag.lags, (99,)),
        "loadavg": os.getloadavg(),
    }


async def run_level(stage: Stage, level: int) -> dict[str, Any]:
    """Ramp to `level` live sessions and measure it; the figures (with `status`)."""
    deadline_s = stage.options.deadline_s(max(0, level - len(stage.live)))
    report: dict[str, Any] = {"level": level, "status": "ok", "deadline_s": deadline_s}
    phase = Phase(level)
    stage.ramps = []
    try:
        async with asyncio.timeout(deadline_s):
            await _measure_level(stage, level, report, phase)
    except FellOver as exc:
        report["status"] = f"fell over: {exc}"
    except TimeoutError:
        report["status"] = (
            f"fell over: its deadline ({deadline_s:.0f} s) passed in the {phase.name}"
        )
    if report["status"] != "ok":
        report.setdefault("ramp", Ramp.merged(stage.ramps).figures())
        ids = {*stage.live, *(sid for one in stage.ramps for sid in one.started)}
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30):
                states = await stage.sessions.states()
            report["states_at_the_end"] = dict(
                Counter(states.get(sid, ("unknown", None))[0] for sid in ids)
            )
    report["live_after"] = len(stage.live)
    return report


async def _measure_level(stage: Stage, level: int, report: dict[str, Any], phase: Phase) -> None:
    """The steps of a level, each named in `phase` as it begins."""
    options = stage.options
    stage.alive()
    ramps = stage.ramps
    not_ready: Counter[str] = Counter()
    began = time.perf_counter()
    for _ in range(RAMP_ROUNDS):  # sessions that fail to start are replaced, a few times
        if len(stage.live) >= level:
            break
        phase.enter("ramp", len(stage.live))
        ramps.append(Ramp())
        await ramp(stage.client, level - len(stage.live), options.concurrency, ramps[-1])
        phase.enter("wait for ready", len(stage.live))
        states = await wait_ready(stage, stage.live + ramps[-1].started)
        stage.live = [sid for sid, state in states.items() if state == "ready"]
        not_ready += Counter(s for s in states.values() if s != "ready")
    report["ramp"] = Ramp.merged(ramps).figures()
    report["ramp"]["to_ready_s"] = time.perf_counter() - began
    report["not_ready"] = dict(not_ready)
    report["live"] = len(stage.live)
    if len(stage.live) < level:
        raise FellOver(f"{len(stage.live)} of {level} sessions live and ready")
    phase.enter("idle", len(stage.live))
    report["idle"] = await idle(stage, options.idle_s)
    phase.enter("GETs", len(stage.live))
    report["get_session"] = await get_latencies(stage.client, stage.live, options.gets)
    phase.enter("starts", len(stage.live))
    report["start"], probes = await start_latencies(stage.client, options.starts)
    now = await stage.sessions.states()
    seen = {sid: now.get(sid, ("unknown", None))[0] for sid in stage.live}
    lost = {sid: state for sid, state in seen.items() if state != "ready"}
    report["followers_lost"] = {
        "not_ready": len(lost),
        "states": dict(Counter(lost.values())),
        "follow_failures_logged": stage.proc.log_text().count(FOLLOW_FAILED),
    }
    stage.live = [sid for sid in stage.live if sid not in lost]
    phase.enter("wait for the starts' ready", len(stage.live))
    probe_states = await wait_ready(stage, probes)
    stage.live += [sid for sid, state in probe_states.items() if state == "ready"]
    machines = {sid: now[sid][1] for sid in stage.live if sid in now and now[sid][1]}
    phase.enter("exits", len(stage.live))
    report["exit_to_end"], exited, never = await exits_to_end(
        stage.fly, stage.sessions, {sid: mid for sid, mid in machines.items() if mid}, options.exits
    )
    report["followers_lost"]["exits_not_followed"] = never
    report["followers_lost"]["total"] = len(lost) + never
    stage.live = [sid for sid in stage.live if sid not in set(exited)]


# -- the run -----------------------------------------------------------------------------


def configure(fly: FlyEmulator, daily: DailyEmulator, options: ScaleOptions) -> dict[str, Any]:
    """Latencies and limits of both emulators; the limits raised for the ramp, as reported."""
    latency_profile.apply(fly, daily, latency_scale=PROFILES[options.profile])
    rate, burst = options.create_rate, max(3, round(options.create_rate))
    fly.limiter.limits["create"] = (rate, burst)
    daily_rate = max(rate, latency_profile.DAILY_LIMITS["api"].rate)
    daily_burst = max(burst, latency_profile.DAILY_LIMITS["api"].burst)
    daily.limiter.limits["api"] = (daily_rate, daily_burst)
    return {
        "fly_create": {"rate": rate, "burst": burst, "documented": "1/s burst 3 per app"},
        "daily_api": {"rate": daily_rate, "burst": daily_burst, "documented": "20/s"},
        "unchanged": "Fly's per-machine limits (wait, get, stop, destroy...) and list; Daily's "
        "room deletes (2/s)",
    }


async def run_scale(
    options: ScaleOptions,
    workdir: Path,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every level of `options`, one after the other, on one dispatcher; the whole report
    (`progress` gets the report so far after each level)."""
    random.seed(options.seed)
    fly, daily = fly_emulator(light_machines=True), daily_emulator()
    limits = configure(fly, daily, options)
    top = max(options.levels)
    report: dict[str, Any] = {
        "options": asdict(options) | {"database_url": "(a fresh database)"},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": os.getloadavg(),
        },
        "limits_raised_for_the_ramp": limits,
        "levels": [],
    }
    began = time.perf_counter()
    async with (
        fresh_database(options.database_url, prefix="scale_") as database_url,
        emulators(fly=fly, daily=daily) as urls,
    ):
        env = {
            "DISPATCHER_NAME": "scale",
            "MAX_SESSIONS": str(top + 10 * (options.starts + 1) * len(options.levels) + 100),
            "MAX_SESSIONS_PER_USER": "1",
            "FLY_CREATE_RATE": f"{options.create_rate:g}",
            "FLY_CREATE_BURST": str(max(3, round(options.create_rate))),
            "CREATE_QUEUE_WAIT_S": "30",
            "READY_TIMEOUT_S": "120",
            "SESSION_MAX_DURATION_S": "86400",
        }
        engine = create_async_engine(engine_url(database_url))
        try:
            async with dispatcher_process(
                urls, workdir, db=database_url, env=env, log_level="WARNING"
            ) as proc:
                await proc.start()
                report["dispatcher_rss_at_start_mib"] = rss_mib(proc.pid)
                stage = Stage(options, proc, fly, daily, Client(proc.url), Sessions(engine))
                try:
                    for level in sorted(options.levels):
                        figures = await run_level(stage, level)
                        report["levels"].append(figures)
                        if progress is not None:
                            progress(report)
                        if figures["status"] != "ok":
                            break
                finally:
                    report["dispatcher_log"] = _log_summary(proc.log_text())
                    report["dispatcher_exit"] = await _stop(proc)
        finally:
            await engine.dispose()
    report["machine"]["loadavg_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - began
    return report


async def _stop(proc: DispatcherProcess) -> str:
    """SIGTERM, and SIGKILL if it has not exited 60 s later; how it went."""
    if not proc.running:
        return f"exited on its own with {proc.returncode}"
    proc.terminate()
    try:
        return f"exit code {await proc.wait(60)} on SIGTERM"
    except TimeoutError:
        await proc.aclose()
        return "killed: still running 60 s after SIGTERM"


def _log_summary(log: str) -> dict[str, Any]:
    """Warnings and errors by count, and the most frequent messages (JSON or text lines)."""
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            level, message = str(record.get("level")), str(record.get("msg"))
        elif " WARNING " in line or " ERROR " in line:
            level = "WARNING" if " WARNING " in line else "ERROR"
            message = line.split(level, 1)[1].strip()
        else:
            continue
        if level in ("WARNING", "ERROR", "CRITICAL"):
            levels[level] += 1
            message = re.sub(r"\d+(\.\d+)?", "N", re.sub(r"[0-9a-f]{12,}", "<id>", message))
            messages[f"{level} {message[:120]}"] += 1
    return {
        "warnings": levels["WARNING"],
        "errors": levels["ERROR"] + levels["CRITICAL"],
        "follow_failures": log.count(FOLLOW_FAILED),
        "top": [[count, message] for message, count in messages.most_common(8)],
    }


# -- the printout ------------------------------------------------------------------------


def _get(figures: dict[str, Any], *path: str) -> Any:
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _num(value: Any, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _p(figures: Any, unit: Any = ms) -> str:
    if not figures:
        return "-"
    return " / ".join(unit(figures[k]) for k in ("p50", "p95") if k in figures)


def _lost(level: dict[str, Any]) -> str:
    lost = _get(level, "followers_lost")
    if not lost:
        return "-"
    return f"{lost['total']} (log: {lost['follow_failures_logged']} follows failed)"


def _exit(figures: Any) -> str:
    if not figures:
        return "-"
    text = "-" if "p50" not in figures else f"{ms(figures['p50'])} / {ms(figures['max'])}"
    return text + (f" ({figures['not_ended']} never)" if figures.get("not_ended") else "")


def format_report(report: dict[str, Any]) -> str:
    """The report as printed: one column per level."""
    o, limits = report["options"], report["limits_raised_for_the_ramp"]
    levels = report["levels"]
    lines = [
        f"scale: one dispatcher (PostgreSQL, a real process) against the Fly emulator in light "
        f"mode and the Daily emulator, profile {o['profile']}; {report['date']}; "
        f"{report['machine']['cpus']} CPUs, load average before "
        + " ".join(f"{v:.2f}" for v in report["machine"]["loadavg_before"]),
        f"limits raised for the ramp: Fly create {limits['fly_create']['rate']:g}/s burst "
        f"{limits['fly_create']['burst']} (Fly's: 1/s burst 3 per app), Daily "
        f"{limits['daily_api']['rate']:g}/s (Daily's: 20/s); {limits['unchanged']} as documented",
        f"each level: idle {o['idle_s']:g} s, {o['gets']} GETs ({GET_CONCURRENCY} at a time), "
        f"{o['starts']} starts one by one, {o['exits']} exits of each kind",
        "",
    ]

    def line(name: str, cell: Any) -> tuple[str, list[str]]:
        return name, [cell(lv) for lv in levels]

    def loadavg(lv: dict[str, Any]) -> str:
        return " ".join(f"{v:.1f}" for v in _get(lv, "idle", "loadavg") or []) or "-"

    rows = [
        line("live sessions (ready)", lambda lv: _num(_get(lv, "live"))),
        line("ramp: starts/s", lambda lv: _num(_get(lv, "ramp", "starts_per_s"), "{:.1f}")),
        line(
            "dispatcher CPU (core)",
            lambda lv: _num(_get(lv, "idle", "dispatcher_cpu_core"), "{:.3f}"),
        ),
        line("dispatcher RSS (MiB)", lambda lv: _num(_get(lv, "idle", "rss_mib"))),
        line("dispatcher sockets", lambda lv: _num(_get(lv, "idle", "sockets"))),
        line("Fly requests/s (idle)", lambda lv: _num(_get(lv, "idle", "fly_rps"), "{:.1f}")),
        line("Daily requests/s (idle)", lambda lv: _num(_get(lv, "idle", "daily_rps"), "{:.2f}")),
        line("GET /sessions/{id} p50/p95", lambda lv: _p(_get(lv, "get_session", "seconds"))),
        line("POST /start p50/p95", lambda lv: _p(_get(lv, "start", "seconds"))),
        line("followers lost", _lost),
        line("exit->end, ended p50/max", lambda lv: _exit(_get(lv, "exit_to_end", "callback"))),
        line("exit->end, silent p50/max", lambda lv: _exit(_get(lv, "exit_to_end", "silent"))),
        line(
            "bench process CPU (core)",
            lambda lv: _num(_get(lv, "idle", "bench_cpu_core"), "{:.2f}"),
        ),
        line("load average (idle end)", loadavg),
        line("status", lambda lv: str(lv["status"])),
    ]
    head = ["level", *(str(lv["level"]) for lv in levels)]
    table = [head, *([name, *cells] for name, cells in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    for lv in levels:
        ops = _get(lv, "idle", "fly_rps_by_op") or {}
        if ops:
            lines.append(
                f"Fly requests/s by operation at {lv['level']}: "
                + ", ".join(f"{op} {rate:.2f}" for op, rate in ops.items())
            )
    log = report.get("dispatcher_log") or {}
    if log:
        lines.append(
            f"dispatcher log: {log['warnings']} warnings, {log['errors']} errors, "
            f"{log['follow_failures']} follow failures; "
            + str(report.get("dispatcher_exit", "still running"))
        )
        lines += [f"  {count:>6} x {message}" for count, message in log["top"]]
    return "\n".join(lines)


def _levels(text: str) -> tuple[int, ...]:
    levels = tuple(int(part) for part in text.split(",") if part.strip())
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels are positive integers, comma-separated")
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=_levels, default=DEFAULT_LEVELS, metavar="N,N,...")
    parser.add_argument("--idle-s", type=float, default=60.0, help="idle seconds at each level")
    parser.add_argument("--create-rate", type=float, default=20.0, help="creates/s for the ramp")
    parser.add_argument("--concurrency", type=int, default=40, help="starts in flight in the ramp")
    parser.add_argument("--gets", type=int, default=200, help="GET /sessions/{id} per level")
    parser.add_argument("--starts", type=int, default=5, help="timed POST /start per level")
    parser.add_argument("--exits", type=int, default=5, help="bot exits of each kind per level")
    parser.add_argument("--level-timeout-s", type=float, help="a level's deadline")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="realistic")
    parser.add_argument("--database-url", default=PG_URL, help="the PostgreSQL server to use")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the report as JSON here too")
    args = parser.parse_args()
    options = ScaleOptions(
        levels=args.levels,
        idle_s=args.idle_s,
        create_rate=args.create_rate,
        concurrency=args.concurrency,
        gets=args.gets,
        starts=args.starts,
        exits=args.exits,
        level_timeout_s=args.level_timeout_s,
        profile=args.profile,
        database_url=args.database_url,
        seed=args.seed,
    )
    started = time.perf_counter()

    def progress(report: dict[str, Any]) -> None:
        print(format_report(report), file=sys.stderr, flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="scale-") as workdir:
        report = asyncio.run(run_scale(options, Path(workdir), progress))
    emit(format_report(report), report, args.out, started=started)


if __name__ == "__main__":
    main()
