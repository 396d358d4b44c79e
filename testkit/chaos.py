"""The fault-injection scenario: a burst of sessions against a real dispatcher process while the
Fly and Daily emulators misbehave, bots crash and the dispatcher is SIGKILLed and restarted; then
the invariants, checked against the store and the emulators once the reconciler has settled.

One run (`run_chaos`):

1. The Fly and Daily emulators are served in this process with their rate limits on; the
   dispatcher is a child process (`testkit.procs.DispatcherProcess`) on a SQLite file, its
   reconciler every 0.5 s and its create pacing set to the emulator's create limit.
2. `concurrency` clients post `sessions` starts, each bot scripted through its body: most are
   normal (ready, then the client DELETEs the session after a moment), others crash before
   ready, exit non-zero after ready, are OOM-killed by the emulator after ready, or never call
   ready (ready timeout). Each start carries an Idempotency-Key: one that cannot connect (the
   dispatcher is down) is retried, one whose answer was lost (the dispatcher died under it) is
   sent again with the same key, as a careful client would (the session the dead dispatcher
   was starting is then one that was never accepted), and so is one answered 429 (after its
   Retry-After) or 409 `idempotency-key-in-progress`.
3. A director works through a seeded plan keyed to the number of starts sent: it queues faults
   on the emulators (Fly: 429 bursts with Retry-After, 5xx, dropped connections, 16 s answers
   past the dispatcher's 15 s upstream timeout, creates that succeed but answer 500 or time out,
   `insufficient_capacity` in the first region; Daily: 429 and 5xx, on room creates and
   deletes, and room creates that time out) and SIGKILLs the dispatcher, restarting it on the
   same port. The timeouts are queued right after the first restart, so that their starts run
   to the end (the adoption path) instead of dying with the process.
4. Then the faults are cleared and the run waits (bounded) until every session is terminal, no
   machine is left and no room of an ended session remains, and checks:
   - lost: accepted sessions (200) neither terminal nor really running (ready or dispatched
     with its machine started);
   - stuck: sessions never accepted that are still live (they hold capacity forever);
   - leaked machines: machines not destroyed whose session is not live with that machine;
   - leaked rooms: rooms whose session is not live (or unknown);
   - duplicates: sessions that got more than one machine (destroyed ones included).

START_TIMEOUT_S is 20 s, above what a start takes with a 15 s upstream timeout and its retries
(a start that takes longer is failed by the reconciler and answers 503 `start-interrupted`):
it is also how long the sessions whose start died with the dispatcher wait before the
reconciler fails them, and the clients that send those starts again wait for that, so it
bounds a run's length from below. Daily's room deletes (about 2 a second) bound it too.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from inspect import signature
from pathlib import Path
from typing import Any

import httpx
import jwt

from dispatcher.app import create_app
from dispatcher.store import Store
from testkit.chaos_report import ChaosReport, check, settle
from testkit.fakes.common import Fault
from testkit.fakes.daily import DailyEmulator
from testkit.fakes.fly import FlyEmulator
from testkit.harness import (
    JWT_SECRET,
    daily_emulator,
    dispatcher_process,
    emulators,
    fly_emulator,
)
from testkit.procs import DispatcherProcess

# The emulator's create limit, raised from Fly's 1/s so that pacing does not dominate a run;
# FLY_CREATE_RATE/BURST say the same (the dispatcher paces 10% under it by itself).
CREATE_RATE, CREATE_BURST = 4.0, 6
UPSTREAM_TIMEOUT_S: float = signature(create_app).parameters["upstream_timeout_s"].default
TIMEOUT_DELAY_S = UPSTREAM_TIMEOUT_S + 1
START_TIMEOUT_S = 20
CHAOS_ENV = {
    "RECONCILE_INTERVAL_S": "0.5",
    "START_TIMEOUT_S": str(START_TIMEOUT_S),
    "READY_TIMEOUT_S": "5",
    "BOT_STOP_TIMEOUT_S": "1",
    "SESSION_MAX_DURATION_S": "40",
    "MAX_SESSIONS": "100000",
    "MAX_SESSIONS_PER_USER": "100000",
    "FLY_CREATE_RATE": str(CREATE_RATE),
    "FLY_CREATE_BURST": str(CREATE_BURST),
    "CREATE_QUEUE_WAIT_S": "2",
}
START_CLIENT_TIMEOUT_S = 60.0
MAX_LOST_ANSWERS = 3
PATIENCE_S = 60.0  # how long a client sends a start again (429, key in progress)
CAPACITY = {"error": "insufficient resources to create machine", "status": "insufficient_capacity"}
RATE_LIMITED = {"error": "rate limit exceeded", "status": "rate_limited"}
# Operations that every session or reconciler pass calls (a fault on `get`, which only the
# reconciler calls now and then, may never fire).
FLY_OPS = ("create", "list", "stop", "destroy", "events")
DAILY_OPS = ("create_room", "delete_rooms")  # the janitor deletes rooms in batch calls
# Fault kinds queued on the emulators, and how often an extra one of each is drawn.
FAULT_WEIGHTS = {
    "fly 429 burst": 3,
    "fly 5xx": 3,
    "fly dropped connection": 2,
    "fly create 500 after success": 2,
    "fly insufficient_capacity": 2,
    "fly timeout": 0.3,
    "daily 429": 2,
    "daily 5xx": 2,
    "daily timeout": 0.3,
}
TIMEOUT_KINDS = ("fly timeout", "daily timeout")
BOT_KINDS = ("crash before ready", "exit non-zero after ready", "oom", "ready timeout")
SIGKILL = "dispatcher SIGKILL"
OOM = "bot OOM-killed"


@dataclass
class Injected:
    """A fault queued on an emulator; `fired` counts the answers it spoiled."""

    kind: str
    target: str
    op: str
    fault: Fault
    times: int

    @property
    def fired(self) -> int:
        return self.times - max(0, self.fault.times)


@dataclass
class _Run:
    """The state a run shares between its clients and its director."""

    http: httpx.AsyncClient
    proc: DispatcherProcess
    fly: FlyEmulator
    daily: DailyEmulator
    fly_url: str
    rng: random.Random
    report: ChaosReport
    scripts: list[str]
    users: int
    issued: int = 0
    done: bool = False
    moved: asyncio.Event = field(default_factory=asyncio.Event)
    faults: list[Injected] = field(default_factory=list)
    followups: set[asyncio.Task[None]] = field(default_factory=set)
    say: Callable[[str], None] = print


async def run_chaos(
    tmp_path: Path,
    *,
    sessions: int,
    concurrency: int,
    seed: int,
    kills: int = 1,
    users: int = 8,
    extra_faults: float = 0.3,
    settle_timeout_s: float = 60.0,
    say: Callable[[str], None] | None = None,
) -> ChaosReport:
    """One fault-injection run (see the module's docstring); `extra_faults` is the number of
    faults drawn at random per session, beyond one of every kind."""
    started = time.monotonic()
    rng = random.Random(seed)
    report = ChaosReport()
    fly = fly_emulator(limits={"create": (CREATE_RATE, CREATE_BURST), "list": (5.0, 10)})
    daily = daily_emulator()
    async with emulators(fly=fly, daily=daily) as urls:
        assert urls.fly_url is not None
        db = f"sqlite:///{tmp_path}/chaos.db"
        async with (
            dispatcher_process(urls, tmp_path, db=db, env=CHAOS_ENV) as proc,
            httpx.AsyncClient(base_url=proc.url, trust_env=False, timeout=30) as http,
        ):
            await proc.start()
            run = _Run(
                http, proc, fly, daily, urls.fly_url, rng, report, _scripts(rng, sessions), users
            )
            run.say = say or (lambda _: None)
            plan = _plan(rng, sessions, kills, extra_faults)
            director = asyncio.create_task(_direct(run, plan))
            await asyncio.gather(*(_client(run) for _ in range(concurrency)))
            run.say(f"every start answered after {time.monotonic() - started:.1f} s")
            await asyncio.gather(*run.followups)
            run.done = True
            run.moved.set()
            await director
            report.burst_s = time.monotonic() - started
            fly.faults.clear()
            daily.faults.clear()
            for item in run.faults:
                report.injected[item.kind] += item.fired
                report.unfired[item.kind] += item.fired == 0
            run.say(f"burst over after {report.burst_s:.1f} s: settling")
            store = await Store.open(f"sqlite:///{tmp_path}/chaos.db")
            try:
                settle_start = time.monotonic()
                report.settled = await settle(store, fly, daily, settle_timeout_s)
                report.settle_s = time.monotonic() - settle_start
                await check(report, store, fly, daily)
            finally:
                await store.close()
            report.natural_429 = Counter(
                {f"fly {k}": v for k, v in fly.limiter.refused.items()}
                | {f"daily {k}": v for k, v in daily.limiter.refused.items()}
            )
            if report.violations:
                lines = [x for x in proc.log_text().splitlines() if '"logger": "httpx"' not in x]
                report.details.append("dispatcher log tail:\n" + "\n".join(lines[-60:]))
    report.wall_s = time.monotonic() - started
    return report


# -- the plan -----------------------------------------------------------------------------------


def _scripts(rng: random.Random, sessions: int) -> list[str]:
    """Each session's bot behaviour: every misbehaviour at least twice, then ~60% normal."""
    scripts = list(BOT_KINDS) * 2
    while len(scripts) < sessions:
        scripts.append("normal" if rng.random() < 0.6 else rng.choice(BOT_KINDS))
    scripts = scripts[:sessions]
    rng.shuffle(scripts)
    return scripts


def _plan(rng: random.Random, sessions: int, kills: int, extra: float) -> list[tuple[float, str]]:
    """(starts sent, action): every fault kind once early on, extras drawn at random, the
    kills spread over the burst, and the timeouts right after the first restart."""
    kill_at = [sessions * 0.8 * (i + 1) / (kills + 1) for i in range(kills)]
    plan = [(at, SIGKILL) for at in kill_at]
    first = [k for k in FAULT_WEIGHTS if k not in TIMEOUT_KINDS]
    plan += [(rng.uniform(0.05, 0.6) * sessions, kind) for kind in first]
    timeouts_at = kill_at[0] if kill_at else rng.uniform(0.1, 0.3) * sessions
    plan += [(timeouts_at, kind) for kind in TIMEOUT_KINDS]
    kinds, weights = list(FAULT_WEIGHTS), list(FAULT_WEIGHTS.values())
    for _ in range(round(extra * sessions)):
        plan.append((rng.uniform(0, 0.9) * sessions, rng.choices(kinds, weights)[0]))
    order = {SIGKILL: 0}  # at the same count: the kill first, so timeouts follow the restart
    return sorted(plan, key=lambda item: (item[0], order.get(item[1], 1)))


def _faults(rng: random.Random, kind: str) -> tuple[str, str, Fault]:
    """A fault of `kind`: (emulator, operation, fault)."""
    if kind == "fly 429 burst":
        retry_after = {"Retry-After": "1"}
        fault = Fault(429, RATE_LIMITED, retry_after, times=rng.randint(2, 4))
        return "fly", rng.choice(FLY_OPS), fault
    if kind == "fly 5xx":
        op = rng.choice((*FLY_OPS, "wait"))
        return "fly", op, Fault(rng.choice((500, 502, 503)), times=rng.randint(1, 2))
    if kind == "fly dropped connection":
        op = rng.choice(FLY_OPS)
        return "fly", op, Fault(0, apply_first=op != "list" and rng.random() < 0.5)
    if kind == "fly create 500 after success":
        return "fly", "create", Fault(500, apply_first=True)
    if kind == "fly insufficient_capacity":
        return "fly", "create", Fault(412, CAPACITY, times=rng.randint(1, 3), region="iad")
    if kind == "fly timeout":
        return "fly", "create", Fault(504, apply_first=True, delay_s=TIMEOUT_DELAY_S)
    if kind == "daily 429":
        return "daily", rng.choice(DAILY_OPS), Fault(429, times=rng.randint(1, 3))
    if kind == "daily 5xx":
        status = rng.choice((500, 502, 503))
        return "daily", rng.choice(DAILY_OPS), Fault(status, apply_first=rng.random() < 0.5)
    if kind == "daily timeout":
        return "daily", "create_room", Fault(504, apply_first=True, delay_s=TIMEOUT_DELAY_S)
    raise ValueError(kind)


async def _direct(run: _Run, plan: list[tuple[float, str]]) -> None:
    """Carry out the plan as the starts go out."""
    for at, action in plan:
        while run.issued < at and not run.done:
            run.moved.clear()
            await run.moved.wait()
        if action == SIGKILL:
            if run.done:
                continue  # the burst is over: a kill now would not be mid-burst
            run.proc.kill()
            assert await run.proc.wait(10) == -signal.SIGKILL
            run.report.injected[SIGKILL] += 1
            run.say(f"SIGKILL after {run.issued} starts")
            await asyncio.sleep(run.rng.uniform(0.2, 1.0))
            await run.proc.restart()
            run.say("restarted")
            continue
        target, op, fault = _faults(run.rng, action)
        emulator = run.fly if target == "fly" else run.daily
        emulator.faults.add(op, fault)
        run.faults.append(Injected(action, target, op, fault, fault.times))


# -- the clients --------------------------------------------------------------------------------


def _headers(user: str) -> dict[str, str]:
    token = jwt.encode({"sub": user, "exp": int(time.time()) + 900}, JWT_SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


def _bot_script(rng: random.Random, kind: str) -> dict[str, Any]:
    if kind == "crash before ready":
        return {"exit_before_ready": rng.choice((1, 2, 70)), "no_ended": rng.random() < 0.5}
    if kind == "exit non-zero after ready":
        return {
            "exit_after_s": rng.uniform(0.2, 2.0),
            "exit_code": rng.choice((1, 2, 70)),
            "no_ended": rng.random() < 0.5,
        }
    if kind == "ready timeout":
        return {"skip_ready": True}
    return {}


async def _client(run: _Run) -> None:
    """Post starts one after another until every session has been sent."""
    while run.issued < len(run.scripts):
        index = run.issued
        run.issued += 1
        run.moved.set()
        kind = run.scripts[index]
        user = f"user-{index % run.users}"
        payload = {"createDailyRoom": True, "body": {"testBot": _bot_script(run.rng, kind)}}
        outcome, sid = await _start(run, payload, user)
        run.report.sessions += 1
        if sid is None:
            run.report.refused[outcome] += 1
            continue
        run.report.accepted.append(sid)
        run.report.played[kind] += 1
        if kind in ("normal", "oom"):
            task = asyncio.create_task(_follow_up(run, sid, user, kind))
            run.followups.add(task)


async def _start(run: _Run, payload: Any, user: str) -> tuple[str, str | None]:
    """POST /start, as a careful client: with an Idempotency-Key, sent again (same key) when
    the answer was lost, when the key is still in progress, and after a 429's Retry-After
    (for a minute at most); (outcome, session id if accepted)."""
    headers = _headers(user) | {"Idempotency-Key": secrets.token_hex(8)}
    lost = 0
    give_up = time.monotonic() + PATIENCE_S
    while True:
        try:
            answer = await run.http.post(
                "/start", json=payload, headers=headers, timeout=START_CLIENT_TIMEOUT_S
            )
        except httpx.ConnectError:
            await asyncio.sleep(0.1)  # never sent: the dispatcher is down, try again
            continue
        except httpx.TransportError as exc:
            lost += 1
            timeout = isinstance(exc, httpx.TimeoutException)
            if lost > MAX_LOST_ANSWERS:
                return "client timeout" if timeout else "no answer (dispatcher killed)", None
            run.report.retries["start sent again after a lost answer"] += 1
            continue
        code = _code(answer)
        in_progress = answer.status_code == 409 and code == "idempotency-key-in-progress"
        if in_progress and time.monotonic() < give_up:
            run.report.retries["409 idempotency-key-in-progress, sent again"] += 1
            await asyncio.sleep(1)
            continue
        if answer.status_code == 429 and time.monotonic() < give_up:
            run.report.retries[f"429 {code}, sent again after Retry-After"] += 1
            retry_after = float(answer.headers.get("retry-after") or 1)
            await asyncio.sleep(min(retry_after, 5.0) * run.rng.uniform(0.5, 1.0))
            continue
        if answer.status_code == 200:
            if lost:
                run.report.retries["accepted after a lost answer"] += 1
            return "200", str(answer.json()["sessionId"])
        return f"{answer.status_code} {code}", None


def _code(answer: httpx.Response) -> str | None:
    try:
        body = answer.json()
    except ValueError:
        return "not json"
    return body.get("code") if isinstance(body, dict) else None


async def _request(http: httpx.AsyncClient, method: str, url: str, user: str) -> httpx.Response:
    """A GET or DELETE (idempotent), retried across a dispatcher restart for up to 60 s."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await http.request(method, url, headers=_headers(user), timeout=40)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _follow_up(run: _Run, sid: str, user: str, kind: str) -> None:
    """A normal session is DELETEd after a moment; an OOM one is OOM-killed once ready."""
    if kind == "oom" and await _oom_once_ready(run, sid):
        run.report.injected[OOM] += 1
        return
    await asyncio.sleep(run.rng.uniform(0.2, 3.0))
    answer = await _request(run.http, "DELETE", f"/sessions/{sid}", user)
    if answer.status_code != 202:
        run.report.client_errors.append(f"DELETE {sid}: {answer.status_code} {answer.text}")


async def _oom_once_ready(run: _Run, sid: str) -> bool:
    """OOM-kill the session's machine once its bot called ready; whether it was done."""
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        machine = next(
            (m for m in run.fly.machines.values() if m.metadata.get("session_id") == sid), None
        )
        if machine is not None and machine.process is not None:
            if f"testbot session={sid} ready status=200" in machine.logs:
                async with httpx.AsyncClient(base_url=run.fly_url, trust_env=False) as control:
                    answer = await control.post(f"/_emulator/machines/{machine.id}/oom")
                return answer.status_code == 200
        elif machine is not None and machine.state == "destroyed":
            return False
        await asyncio.sleep(0.1)
    return False
