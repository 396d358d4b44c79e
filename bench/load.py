"""Load: N starts at concurrency C against the Fly and Daily emulators with recorded latencies.

    .venv/bin/python bench/load.py [--starts 500] [--concurrency 100] [--profile realistic]
                                   [--limits both|realistic|lifted] [--database-url URL]
                                   [--bot testbot|light] [--out report.json]

The emulators run in this process, configured by bench/latency_profile.py (every figure with
its source); the dispatcher runs as a real child process under uvicorn (`python -m dispatcher
serve`, log level WARNING, a fresh SQLite file per configuration unless --database-url). Every
start is a different user with its own JWT. Each bot is a real process (the test bot image, or
with `--bot light` a minimal one, to spend less of this machine's CPU on bots, which on Fly run
on their own VMs) that calls ready, lives `--bot-seconds` and exits, so its machine is destroyed
on its own; the bench then waits for every session to end and every machine to be gone before
stopping the dispatcher.
Room deletes are not waited for: the dispatcher paces its batch delete calls under Daily's 2
deletes/s whatever the limits, and those still queued at the stop are left to the reconciler
(and the rooms' exp).

Two configurations (`--limits both`, the default):
- realistic: Fly's documented limits (create 1/s, burst 3, per app) and the dispatcher's create
  pacing set to match (FLY_CREATE_RATE=1, FLY_CREATE_BURST=3, CREATE_QUEUE_WAIT_S): past what
  the queue can start within CREATE_QUEUE_WAIT_S, a start is answered 429 queue-full at once;
- lifted: every limit of both APIs x1000 and the pacing raised to match, as for an org with
  raised limits or several bot apps: what is left is the dispatcher's own overhead, and this
  machine's, which also runs every bot process and the emulators.

Time to answer is measured by the client, from sending `POST /start` to its answer. CPU is
attributed from /proc and getrusage: the dispatcher process, this process (emulators and load
client), the bot processes, and what is left of the machine's busy time (other processes).
The event loop lag of this process says how late the emulators answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jwt

from bench import latency_profile
from bench.report import CpuMark, emit, ms, pct, percentile, secs, summary
from dispatcher import app as dispatcher_app
from testkit.harness import (
    BOT_IMAGE,
    JWT_SECRET,
    daily_emulator,
    dispatcher_process,
    emulators,
    fly_emulator,
)
from testkit.waits import wait_until

ROOT = Path(__file__).resolve().parent.parent

PROFILES = {"realistic": 1.0, "fast": 0.1}
"""Latency profiles: the recorded latencies times this factor ("fast" is for smoke tests)."""
LIMIT_SCALES = {"realistic": 1.0, "lifted": 1000.0}
"""Rate limits (and the dispatcher's create pacing) times this factor."""
TERMINAL = ("ended", "failed")
BOTS = ("testbot", "light")
"""testbot: testkit/fakes/images/testbot (checks the whole bot contract; ~60-100 ms of CPU a run,
mostly imports). light: the same callbacks over a raw socket, nothing checked (~20-30 ms)."""
LIGHT_BOT = """import json, os, socket, time

env = os.environ
hostport = env["DISPATCHER_URL"].split("://", 1)[1].split("/", 1)[0]
host, port = hostport.rsplit(":", 1)


def post(what, body):
    data = json.dumps(body).encode()
    head = (
        f"POST /internal/sessions/{env['SESSION_ID']}/{what} HTTP/1.1\\r\\nHost: {hostport}\\r\\n"
        f"Authorization: Bearer {env['BOT_CALLBACK_TOKEN']}\\r\\n"
        f"Content-Type: application/json\\r\\nContent-Length: {len(data)}\\r\\n"
        "Connection: close\\r\\n\\r\\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + data)
        while sock.recv(65536):
            pass


post("ready", {})
script = json.loads(env.get("SESSION_BODY") or "{}").get("testBot") or {}
time.sleep(float(script.get("exit_after_s", 2)))
post("ended", {"reason": "completed", "exit_code": 0})
"""
POLL_S = 1.0
END_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class LoadOptions:
    """One invocation of the bench."""

    starts: int = 500
    concurrency: int = 100
    profile: str = "realistic"
    limits: tuple[str, ...] = ("realistic", "lifted")
    database_url: str | None = None
    bot_seconds: float = 2.0
    create_queue_wait_s: float = 10.0
    bot: str = "testbot"

    @property
    def latency_scale(self) -> float:
        return PROFILES[self.profile]


@dataclass
class Answer:
    """One `POST /start` as the client saw it."""

    user: str
    status: int
    code: str | None
    session_id: str | None
    seconds: float
    error: str | None = None

    @property
    def key(self) -> str:
        """How answers are counted: `200`, `429 queue-full`, `error ConnectError`, ..."""
        if self.error:
            return f"error {self.error}"
        return str(self.status) if self.status == 200 else f"{self.status} {self.code or '-'}"


# -- CPU accounting ----------------------------------------------------------------------------


class LoopLag:
    """How late this process's event loop wakes up (the emulators and the client share it)."""

    def __init__(self, tick_s: float = 0.01) -> None:
        self.tick_s = tick_s
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            self.lags.append(max(0.0, time.perf_counter() - before - self.tick_s))

    def __enter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


# -- the load ----------------------------------------------------------------------------------


def token(user: str) -> str:
    """A client JWT for `user`, valid for an hour."""
    claims = {"sub": user, "exp": int(time.time()) + 3600}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def start_headers(users: list[str]) -> dict[str, dict[str, str]]:
    """Each user's request headers (made before the load: signing is the client's work)."""
    return {
        user: {"Authorization": f"Bearer {token(user)}", "Content-Type": "application/json"}
        for user in users
    }


async def fire(
    url: str, headers: dict[str, dict[str, str]], body: bytes, concurrency: int
) -> list[Answer]:
    """POST /start once per user, `concurrency` at a time; each answer with its time."""
    pending: Iterator[str] = iter(headers)
    answers: list[Answer] = []
    timeout = httpx.Timeout(300.0, connect=30.0)
    tls = httpx.create_ssl_context()  # unused (plain HTTP), but made once, not per client

    async def worker() -> None:
        # A client (one keep-alive connection) per worker: httpcore's pool scans every one of
        # its connections for each request, which at 100 connections made the client, not the
        # dispatcher, the bottleneck (9 ms of CPU per request).
        async with httpx.AsyncClient(
            base_url=url, timeout=timeout, verify=tls, trust_env=False
        ) as http:
            for user in pending:
                started = time.perf_counter()
                try:
                    response = await http.post("/start", content=body, headers=headers[user])
                except httpx.HTTPError as exc:
                    seconds = time.perf_counter() - started
                    answers.append(Answer(user, 0, None, None, seconds, type(exc).__name__))
                    continue
                seconds = time.perf_counter() - started
                try:
                    data = response.json()
                except ValueError:
                    data = {}
                data = data if isinstance(data, dict) else {}
                answers.append(
                    Answer(
                        user,
                        response.status_code,
                        data.get("code"),
                        data.get("sessionId") if response.status_code == 200 else None,
                        seconds,
                    )
                )

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    parse = datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


async def wait_for_sessions(url: str, answers: list[Answer]) -> dict[str, dict[str, Any]]:
    """Poll every started session until it is over (or END_TIMEOUT_S passes); the last view
    of each, by session id (a session the dispatcher does not know maps to {})."""
    owners = {a.session_id: a.user for a in answers if a.session_id}
    headers = {sid: {"Authorization": f"Bearer {token(user)}"} for sid, user in owners.items()}
    seen: dict[str, dict[str, Any]] = {}
    gate = asyncio.Semaphore(20)
    deadline = time.monotonic() + END_TIMEOUT_S
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:

        async def look(sid: str) -> None:
            async with gate:
                response = await http.get(f"/sessions/{sid}", headers=headers[sid])
            seen[sid] = response.json() if response.status_code == 200 else {}

        while True:
            todo = [sid for sid in owners if seen.get(sid, {}).get("state") not in TERMINAL]
            if not todo or time.monotonic() > deadline:
                return seen
            await asyncio.gather(*(look(sid) for sid in todo))
            if any(seen[sid].get("state") not in TERMINAL for sid in todo):
                await asyncio.sleep(POLL_S)


def bot_image(bot: str, workdir: Path) -> dict[str, Any]:
    """The Fly emulator's options for the bot image: the test bot's (default) or a light one."""
    if bot == "testbot":
        return {}
    package = workdir / "lightbot" / "bot_runtime"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(LIGHT_BOT)
    return {"images": {BOT_IMAGE: package.parent}}


async def run_mode(mode: str, options: LoadOptions, workdir: Path) -> dict[str, Any]:
    """One configuration: emulators, a dispatcher process, the load, the end of every session."""
    scale = LIMIT_SCALES[mode]
    fly, daily = fly_emulator(**bot_image(options.bot, workdir)), daily_emulator()
    latency_profile.apply(fly, daily, scale_limits=scale, latency_scale=options.latency_scale)
    pacing = latency_profile.dispatcher_pacing(scale_limits=scale)
    users = [f"load-{mode}-{i:04d}" for i in range(options.starts)]
    body = json.dumps(
        {"createDailyRoom": True, "body": {"testBot": {"exit_after_s": options.bot_seconds}}}
    ).encode()
    database_url = options.database_url or f"sqlite:///{workdir}/dispatcher-{mode}.db"
    async with emulators(fly=fly, daily=daily) as urls:
        env = pacing | {
            "DISPATCHER_NAME": f"load-{mode}",
            "MAX_SESSIONS": str(max(1000, options.starts * 2)),
            "MAX_SESSIONS_PER_USER": "10",
            "CREATE_QUEUE_WAIT_S": f"{options.create_queue_wait_s:g}",
            "READY_TIMEOUT_S": "60",
            "SESSION_MAX_DURATION_S": "600",
        }
        async with dispatcher_process(
            urls, workdir, db=database_url, env=env, log_level="WARNING"
        ) as proc:
            await proc.start()
            headers = start_headers(users)
            begin = CpuMark.take(proc.pid)
            with LoopLag() as lag:
                answers = await fire(proc.url, headers, body, options.concurrency)
            loaded = CpuMark.take(proc.pid)
            ending = time.perf_counter()
            # Machines first (in this process, no polling of the dispatcher), then the sessions.
            machines_gone = await wait_until(
                lambda: not any(m.active for m in fly.machines.values()), END_TIMEOUT_S
            )
            sessions = await wait_for_sessions(proc.url, answers)
            ended_after_s = time.perf_counter() - ending
            end = CpuMark.take(proc.pid)
            peak_rss = proc.peak_rss_bytes()
            leftover = {
                "active_sessions": sum(
                    1
                    for a in answers
                    if a.session_id and sessions.get(a.session_id, {}).get("state") not in TERMINAL
                ),
                "live_machines": sum(1 for m in fly.machines.values() if m.active),
                "bot_processes": sum(1 for m in fly.machines.values() if m.process is not None),
                "rooms_not_yet_deleted": len(daily.rooms),
            }
            proc.terminate()
            exit_code = await proc.wait(60)
            log = proc.log_text()
    return report_of(
        mode,
        options,
        answers,
        sessions,
        fly_state={
            "machines_created": len(fly.machines),
            "requests": len(fly.requests),
            "rate_limited": dict(fly.limiter.refused),
        },
        daily_state={
            "rooms_created": sum(
                1 for r in daily.requests if r.method == "POST" and r.path.endswith("/rooms")
            ),
            "requests": len(daily.requests),
            "rate_limited": dict(daily.limiter.refused),
        },
        extra={
            "pacing": pacing | {"CREATE_QUEUE_WAIT_S": f"{options.create_queue_wait_s:g}"},
            "limit_scale": scale,
            "peak_rss_bytes": peak_rss,
            "cpu_load": loaded.since(begin),
            "cpu_total": end.since(begin),
            "loop_lag_s": summary(lag.lags),
            "ended_after_s": ended_after_s,
            "machines_gone": machines_gone,
            "leftover": leftover,
            "dispatcher_exit_code": exit_code,
            "dispatcher_log": {
                "warnings": log.count(" WARNING "),
                "errors": log.count(" ERROR "),
                "first": [
                    line.split(" ", 2)[-1]
                    for line in log.splitlines()
                    if " WARNING " in line or " ERROR " in line
                ][:5],
            },
        },
    )


def report_of(
    mode: str,
    options: LoadOptions,
    answers: list[Answer],
    sessions: dict[str, dict[str, Any]],
    *,
    fly_state: dict[str, Any],
    daily_state: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The figures of one configuration."""
    by_key: dict[str, list[float]] = {}
    for answer in answers:
        by_key.setdefault(answer.key, []).append(answer.seconds)
    ok = [a for a in answers if a.status == 200]
    wall = extra["cpu_load"]["wall_s"]
    critical = latency_profile.critical_path_s(options.latency_scale)
    p50 = percentile([a.seconds for a in ok], 50) if ok else None
    states = Counter(sessions.get(a.session_id or "", {}).get("state", "unknown") for a in ok)
    ready = [
        s
        for a in ok
        if (s := _seconds_between(*_span(sessions.get(a.session_id or "", {})))) is not None
    ]
    return {
        "mode": mode,
        "cpus": os.cpu_count() or 1,
        "starts": len(answers),
        "concurrency": options.concurrency,
        "status": dict(sorted(Counter(a.key for a in answers).items())),
        "answer_s": {key: summary(values) for key, values in sorted(by_key.items())},
        "load_wall_s": wall,
        "answers_per_s": len(answers) / wall if wall else None,
        "sessions_per_s": len(ok) / wall if wall else None,
        "critical_path_s": critical,
        "p50_over_critical_path": p50 / critical if p50 is not None else None,
        "ready_s": summary(ready),
        "session_states": dict(sorted(states.items())),
        "sessions_started": len(ok),
        "sessions_known": sum(1 for a in ok if sessions.get(a.session_id or "")),
        "fly": fly_state,
        "daily": daily_state,
        **extra,
    }


def _span(session: dict[str, Any]) -> tuple[str | None, str | None]:
    return session.get("createdAt"), session.get("readyAt")


async def run_load(options: LoadOptions, workdir: Path | None = None) -> dict[str, Any]:
    """Every configuration of `options.limits`, one after the other; the whole report."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="load-")))
        runs = [await run_mode(mode, options, workdir) for mode in options.limits]
    return {
        "options": asdict(options),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "memory_gib": round(
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
            ),
        },
        "database": "postgresql" if options.database_url else "sqlite",
        "runs": runs,
    }


# -- the printout ------------------------------------------------------------------------------


def _dist(figures: dict[str, float], unit: Any = secs) -> str:
    if not figures:
        return "-"
    return "  ".join(f"{name} {unit(value)}" for name, value in figures.items())


def format_report(report: dict[str, Any]) -> str:
    """The report as printed."""
    o = report["options"]
    scale = PROFILES[o["profile"]]
    fly_create = latency_profile.FLY_LATENCY["create"].value * scale
    room_create = latency_profile.DAILY_LATENCY["create_room"].value * scale
    boot = latency_profile.FLY_BOOT.value * scale
    m = report["machine"]
    lines = [
        f"load: {o['starts']} starts at concurrency {o['concurrency']}, profile {o['profile']}, "
        f"{report['database']}, {o['bot']} bots that end {o['bot_seconds']:g} s after ready",
        f"machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, Python {m['python']}; dispatcher, "
        "emulators + client, and bots share it",
        f"profile: Fly create {ms(fly_create)}, boot {ms(boot)}, other Fly calls "
        f"{ms(0.05 * scale)}-{ms(0.1 * scale)}; Daily create_room {ms(room_create)}, other "
        f"calls {ms(0.15 * scale)}-{ms(0.25 * scale)} (bench/latency_profile.py: sources)",
    ]
    for run in report["runs"]:
        lines += ["", *_format_run(run)]
    return "\n".join(lines)


def _format_run(run: dict[str, Any]) -> list[str]:
    pacing = run["pacing"]
    cpu, total = run["cpu_load"], run["cpu_total"]
    if run["mode"] == "realistic":
        title = "limits realistic: Fly create 1/s burst 3 per app, Daily 20/s, deletes 2/s"
    else:
        title = f"limits lifted: every Fly and Daily limit x{run['limit_scale']:g}"
    slack = getattr(dispatcher_app, "CREATE_PACING_SLACK", 0.0)
    paced = float(pacing["FLY_CREATE_RATE"]) / (1 + slack)
    lines = [
        f"{title}; dispatcher FLY_CREATE_RATE={pacing['FLY_CREATE_RATE']} (paced at {paced:.3g}/s)"
        f" FLY_CREATE_BURST={pacing['FLY_CREATE_BURST']} "
        f"CREATE_QUEUE_WAIT_S={pacing['CREATE_QUEUE_WAIT_S']}",
        f"  answers           {run['starts']} in {secs(run['load_wall_s'])}: "
        f"{run['answers_per_s']:.1f}/s, of which 200: {run['sessions_per_s']:.1f}/s",
        "  status            "
        + ", ".join(f"{key}: {count}" for key, count in run["status"].items()),
    ]
    for key, figures in run["answer_s"].items():
        lines.append(f"  time to answer    {key + ':':<17} {_dist(figures)}")
    ratio = run["p50_over_critical_path"]
    note = " (includes the wait in the create queue)" if run["mode"] == "realistic" else ""
    lines += [
        f"  critical path     {secs(run['critical_path_s'])} (the slower of Fly create and Daily "
        f"create_room); p50 of 200s / critical path = "
        + ("-" if ratio is None else f"{ratio:.2f}")
        + note,
        f"  time to ready     {_dist(run['ready_s'])} (session created -> bot's ready callback)",
        f"  dispatcher        peak RSS {run['peak_rss_bytes'] / 2**20:.0f} MiB; CPU "
        f"{_cpu(cpu['dispatcher_s'])} over {secs(cpu['wall_s'])} of load "
        f"({_core(cpu['dispatcher_s'], cpu['wall_s'])}); "
        f"{_per(total['dispatcher_s'], run['starts'], 1000)} ms a start, "
        f"{_per(total['dispatcher_s'], run['sessions_started'], 1000)} ms a session, "
        "up to its end",
        f"  bench process     CPU {_cpu(cpu['bench_s'])} (emulators + client, "
        f"{_core(cpu['bench_s'], cpu['wall_s'])}); event loop lag "
        f"{_dist({k: v for k, v in run['loop_lag_s'].items() if k in ('p99', 'max')}, ms)}",
        f"  whole machine     {pct(cpu['machine_busy'])} busy during the load; until every "
        f"session ended: dispatcher {_cpu(total['dispatcher_s'])}, bench {_cpu(total['bench_s'])},"
        f" {run['fly']['machines_created']} bots {_cpu(total['bots_s'])}, other processes "
        f"{_cpu(_others(total, run['cpus']))} CPU over {secs(total['wall_s'])}",
        f"  upstream          Fly: {run['fly']['machines_created']} machines created, "
        f"{run['fly']['requests']} requests, 429s {_counts(run['fly']['rate_limited'])}; "
        f"Daily: {run['daily']['rooms_created']} rooms created, {run['daily']['requests']} "
        f"requests, 429s {_counts(run['daily']['rate_limited'])}",
    ]
    left = run["leftover"]
    lines.append(
        f"  end               sessions {_counts(run['session_states'])} within "
        f"{secs(run['ended_after_s'])} after the last answer; left: {left['active_sessions']} "
        f"active sessions, {left['live_machines']} machines, {left['bot_processes']} bot "
        f"processes; {left['rooms_not_yet_deleted']} rooms still queued for deletion at stop"
    )
    log = run["dispatcher_log"]
    lines.append(
        f"  dispatcher log    {log['warnings']} warnings, {log['errors']} errors; "
        f"exit code {run['dispatcher_exit_code']} (SIGTERM)"
    )
    lines += [f"                    {line}" for line in log["first"]]
    return lines


def _others(cpu: dict[str, Any], cpus: int) -> float | None:
    """CPU seconds the machine spent on processes other than ours (e.g. other test runs)."""
    if cpu["machine_busy"] is None or cpu["dispatcher_s"] is None:
        return None
    busy = cpu["machine_busy"] * cpu["wall_s"] * cpus
    return max(0.0, float(busy - cpu["dispatcher_s"] - cpu["bench_s"] - cpu["bots_s"]))


def _cpu(seconds: float | None) -> str:
    return secs(seconds, 1)


def _per(total: float | None, count: int, unit: float = 1.0) -> str:
    return "-" if total is None or not count else f"{total / count * unit:.1f}"


def _core(cpu_s: float | None, wall_s: float) -> str:
    return "-" if cpu_s is None or not wall_s else f"{cpu_s / wall_s:.2f} core"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="realistic")
    parser.add_argument("--limits", choices=["both", *LIMIT_SCALES], default="both")
    parser.add_argument("--database-url", help="postgresql://... (default: a SQLite file)")
    parser.add_argument(
        "--bot-seconds", type=float, default=2.0, help="each bot's life after ready"
    )
    parser.add_argument("--create-queue-wait-s", type=float, default=10.0)
    parser.add_argument("--bot", choices=BOTS, default="testbot", help="the bot image")
    parser.add_argument("--out", type=Path, help="write the report as JSON here too")
    args = parser.parse_args()
    options = LoadOptions(
        starts=args.starts,
        concurrency=args.concurrency,
        profile=args.profile,
        limits=tuple(LIMIT_SCALES) if args.limits == "both" else (args.limits,),
        database_url=args.database_url,
        bot_seconds=args.bot_seconds,
        create_queue_wait_s=args.create_queue_wait_s,
        bot=args.bot,
    )
    started = time.perf_counter()
    report = asyncio.run(run_load(options))
    emit(format_report(report), report, args.out, started=started)


if __name__ == "__main__":
    main()
