"""On-call commands: `dispatcher sessions list|show|stop` and `dispatcher trace ID`.

They read the service's own settings (so they work from `fly ssh console` on the dispatcher),
open its store, and ask Fly and Daily directly; they never start the HTTP app.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.clients import upstreams
from dispatcher.config import Settings
from dispatcher.errors import DispatcherError
from dispatcher.machines.fly import POOL_LABEL, FlyMachines
from dispatcher.machines.fly_api import FlyAPI, exit_of
from dispatcher.rooms.daily_api import DailyAPI
from dispatcher.sessions import end_session
from dispatcher.store import Event, PoolRows, Session, Store, iso
from dispatcher.upstream import RetryPolicy

OPERATOR = "operator"
_RETRY = RetryPolicy(attempts=3, deadline_s=10.0)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def add_commands(commands: Any) -> None:
    """Register `sessions` and `trace` on the top-level subparsers."""
    sessions = commands.add_parser("sessions", help="list, show or stop sessions (on-call)")
    verbs = sessions.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="sessions, newest first")
    listing.add_argument("--state", help="only sessions in this state")
    listing.add_argument("--user", help="only this user's sessions")
    listing.add_argument("--since", type=duration, help="created within, e.g. 30m, 1h, 2d")
    listing.add_argument("--limit", type=int, default=50, help="default 50")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    show = verbs.add_parser("show", help="one session and its event log")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="JSON instead of text")
    stop = verbs.add_parser("stop", help="end a session as an operator (SIGTERM, grace, SIGKILL)")
    stop.add_argument("id")
    trace = commands.add_parser("trace", help="a session's timeline: store, Fly and Daily")
    trace.add_argument("id")
    trace.add_argument("--json", action="store_true", help="JSON instead of a table")
    pool = commands.add_parser("pool", help="the warm pool (on-call)")
    status = pool.add_subparsers(dest="verb", required=True).add_parser(
        "status", help="pool machines by region and state, claims and misses"
    )
    status.add_argument(
        "--since", type=duration, default=3600.0, help="claims and misses within (default 1h)"
    )
    status.add_argument("--json", action="store_true", help="JSON instead of text")


def duration(text: str) -> float:
    """Seconds from `90s`, `30m`, `1h` or `2d`."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30m, 1h, 2d)")
    return float(match[1]) * _UNITS[match[2]]


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run an on-call command; its exit status."""
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    async with clients(settings) as opened:
        if args.command == "trace":
            return await trace(opened, args.id, as_json=args.json)
        if args.command == "pool":
            return await pool_status(opened, since_s=args.since, as_json=args.json)
        if args.verb == "list":
            return await list_sessions(opened.store, args)
        if args.verb == "show":
            return await show(opened.store, args.id, as_json=args.json)
        return await stop(opened, args.id)


@dataclass
class Clients:
    """The store, and the Fly and Daily APIs when the settings configure them."""

    settings: Settings
    store: Store
    fly: FlyAPI | None
    daily: DailyAPI | None


@contextlib.asynccontextmanager
async def clients(settings: Settings) -> AsyncIterator[Clients]:
    """The store and the upstream clients `settings` configure, closed on exit."""
    store = await Store.open(settings.database_url)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(store.close)
        apis = await stack.enter_async_context(upstreams(settings, _RETRY, timeout_s=10))
        yield Clients(settings, store, apis.fly, apis.daily)


# -- pool status ---------------------------------------------------------------------------------


async def pool_status(clients: Clients, *, since_s: float, as_json: bool) -> int:
    """`pool status`: the pool's machines from the store (with Fly's state of each when Fly is
    configured), and how many starts it served and missed within `since_s`."""
    s = clients.settings
    rows = PoolRows(clients.store, s.dispatcher_name)
    machines = await rows.all()
    claims, misses = await rows.dispatches(time.time() - since_s)
    fly_state: dict[str, str] = {}
    if clients.fly is not None:
        listed = await clients.fly.list_machines(
            metadata={"dispatcher": s.dispatcher_name, POOL_LABEL: "true"}
        )
        fly_state = {m.id: m.state for m in listed}
    by_state = Counter((m.region or "any", m.state) for m in machines)
    errors = await _local_pool_errors(s)
    summary = {
        "size": s.pool_size,
        "mode": s.pool_mode,
        "image": s.bot_image,
        "machines": {f"{region}/{state}": n for (region, state), n in sorted(by_state.items())},
        "claims": claims,
        "misses": misses,
        "sinceSeconds": since_s,
        # This instance's counters since it started (None: its /metrics did not answer).
        "thisInstance": errors,
    }
    if as_json:
        listing = [
            {
                "machineId": m.machine_id,
                "region": m.region or None,
                "state": m.state,
                "flyState": fly_state.get(m.machine_id),
                "image": m.image,
                "sessionId": m.session_id,
                "createdAt": iso(m.created_at),
            }
            for m in machines
        ]
        _print_json(summary | {"pool": listing})
        return 0
    print(
        f"pool: {s.pool_size} per region ({s.pool_mode}), image {s.bot_image or '-'}; "
        f"within {_age(since_s)}: {claims} starts from the pool, {misses} cold"
    )
    if errors is not None:
        print(
            f"this instance since it started: {errors['startFailures']:.0f} pool machines "
            f"failed to start, {errors['replenishErrors']:.0f} could not be made or suspended"
        )
    table = [
        (
            m.machine_id,
            m.region or "any",
            m.state,
            fly_state.get(m.machine_id, "-"),
            "current" if m.image == s.bot_image else m.image,
            m.session_id or "-",
            _age(time.time() - m.created_at),
        )
        for m in machines
    ]
    print(_table(("machine", "region", "state", "fly", "image", "session", "age"), table))
    return 0


async def _local_pool_errors(settings: Settings) -> dict[str, float] | None:
    """The pool's error counters of the dispatcher serving on this machine (the port of
    DISPATCHER_URL, where /metrics is served), or None when it does not answer."""
    port = urlsplit(settings.dispatcher_url or "").port
    if port is None:
        return None
    try:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:
            response = await http.get(f"http://127.0.0.1:{port}/metrics")
            response.raise_for_status()
    except httpx.HTTPError:
        return None
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    return {
        "startFailures": values.get("dispatcher_pool_start_failures_total", 0.0),
        "replenishErrors": values.get("dispatcher_pool_replenish_errors_total", 0.0),
    }


# -- sessions list / show / stop --------------------------------------------------------------


async def list_sessions(store: Store, args: argparse.Namespace) -> int:
    """`sessions list`: a table or JSON, newest first."""
    since = time.time() - args.since if args.since else None
    found = await store.list_sessions(
        state=args.state, user=args.user, limit=args.limit, created_after=since
    )
    if args.json:
        _print_json([_session_json(s) for s in found])
        return 0
    header = ("id", "state", "user", "region", "machine", "created", "ready", "ended", "reason")
    rows = [
        (
            s.id,
            s.state,
            s.user_id,
            s.region or "",
            s.machine_id or "",
            _clock(s.created_at),
            _clock(s.ready_at),
            _clock(s.ended_at),
            _reason(s),
        )
        for s in found
    ]
    print(_table(header, rows))
    return 0


async def show(store: Store, session_id: str, *, as_json: bool) -> int:
    """`sessions show ID`: the session and its event log."""
    session = await store.get(session_id)
    if session is None:
        return _unknown(session_id)
    log = await store.events(session_id)
    if as_json:
        events = [
            {"at": iso(e.at), "kind": e.kind, "state": e.state, "details": e.details} for e in log
        ]
        _print_json({"session": _session_json(session), "events": events})
        return 0
    for key, value in _session_json(session).items():
        print(f"{key + ':':<16}{'' if value is None else _one_line(str(value))}")
    print()
    rows = [(_clock(e.at), e.kind, e.state or "", _details(e.details)) for e in log]
    print(_table(("at", "kind", "state", "details"), rows))
    return 0


async def stop(clients: Clients, session_id: str) -> int:
    """`sessions stop ID`: end it as DELETE does, by `operator`; exit 1 when unknown."""
    session = await clients.store.get(session_id)
    if session is None:
        return _unknown(session_id)
    if clients.fly is None:
        print(
            f"dispatcher: {session_id}: this dispatcher runs bots as its own local processes; "
            "end it through its HTTP API (DELETE /sessions/{id})"
        )
        return 2
    grace = clients.settings.bot_stop_timeout_s
    machines = FlyMachines(clients.fly, clients.settings, _RETRY)
    ending = await end_session(clients.store, machines, session_id, by=OPERATOR, grace_s=grace)
    if ending is None:
        print(f"{session_id} is already {session.state} ({_reason(session) or 'no reason'})")
        return 0
    print(f"{session_id}: {session.state} -> ending (reason deleted, by {OPERATOR})")
    if ending.machine_id:
        print(f"machine {ending.machine_id}: SIGTERM sent, SIGKILL after {grace} s")
    return 0


# -- trace ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One point of a session's timeline."""

    at: float
    source: str  # store | fly | daily
    step: str
    details: dict[str, Any] = field(default_factory=dict)


async def trace(clients: Clients, session_id: str, *, as_json: bool) -> int:
    """`trace ID`: the store's event log, Fly's machine events and the Daily room, by time."""
    session = await clients.store.get(session_id)
    if session is None:
        return _unknown(session_id)
    log = await clients.store.events(session_id)
    notes = lost_notes(log)
    steps = store_steps(log)
    steps += await fly_steps(clients.fly, session, notes)
    steps += await room_steps(clients.daily, session, notes)
    steps.sort(key=lambda s: s.at)
    timed = _timed(steps, session.created_at)
    if as_json:
        _print_json({"session": _session_json(session), "steps": timed, "notes": notes})
        return 0
    print(
        f"session {session.id}  user {session.user_id}  {session.state}"
        f"  {_reason(session)}  machine {session.machine_id or '-'}"
        f" in {session.region or '-'}  trace {_trace_id(session) or '-'}"
    )
    if session.error is not None:
        print(f"error: {_one_line(session.error)}")
    rows = [
        (
            t["at"][11:23],
            _seconds(t["sincePrevious"]),
            _seconds(t["sinceRequest"]),
            t["source"],
            t["step"],
            _details(t["details"]),
        )
        for t in timed
    ]
    print(_table(("time (UTC)", "+prev", "+start", "source", "step", "details"), rows))
    for note in notes:
        print(f"note: {note}")
    return 0


def store_steps(log: Sequence[Event]) -> list[Step]:
    """The store's event log: state changes as `state <name>`, other events by kind."""
    return [
        Step(e.at, "store", f"state {e.state}" if e.kind == "state" else e.kind, e.details)
        for e in log
    ]


def lost_notes(log: Sequence[Event]) -> list[str]:
    """A note for each bot whose end was never seen: it died with its dispatcher (a local
    process of a dispatcher killed, or stopped before its bots had ended)."""
    return [
        f"the bot (machine {e.details.get('machine_id')}) was lost with its dispatcher, which "
        "stopped before the bot's end was seen: how the bot ended is unknown"
        for e in log
        if e.kind == "state" and e.details.get("lost")
    ]


async def fly_steps(fly: FlyAPI | None, session: Session, notes: list[str]) -> list[Step]:
    """Fly's events of the session's machine (launch, start, stop, exit with its code, ...)."""
    if session.machine_id is None:
        return []
    if fly is None:
        notes.append("machines are local processes: no Fly events")
        return []
    try:
        events = await fly.events(session.machine_id)
    except DispatcherError as exc:
        if getattr(exc, "status", None) == 404:
            notes.append(f"Fly no longer knows machine {session.machine_id} (destroyed, purged)")
        else:
            notes.append(f"Fly events unavailable: {exc.detail}")
        return []
    steps = []
    for event in events:
        at = _event_time(event.get("timestamp"))
        if at is None:
            continue
        details: dict[str, Any] = {"source": event.get("source")}
        exit = exit_of(event)
        if exit is not None:
            details |= {k: v for k, v in asdict(exit).items() if v is not None and k != "lost"}
        step = f"machine {event.get('type')} ({event.get('status')})"
        steps.append(Step(at, "fly", step, details))
    return steps


async def room_steps(daily: DailyAPI | None, session: Session, notes: list[str]) -> list[Step]:
    """The Daily room now: whether it exists, and who is in it."""
    if session.transport != "daily" or not session.room_name:
        return []
    if daily is None:
        notes.append("no DAILY_API_KEY: the room was not looked up")
        return []
    now = time.time()
    try:
        room = await daily.get_room(session.room_name)
        if room is None:
            return [Step(now, "daily", "room gone (now)", {"room": session.room_name})]
        present = await daily.presence(session.room_name)
    except DispatcherError as exc:
        notes.append(f"Daily room unavailable: {exc.detail}")
        return []
    names = [str(p.get("userName") or p.get("userId") or "?") for p in present]
    details = {"room": room.name, "present": len(present), "participants": names}
    return [Step(now, "daily", "room exists (now)", details)]


def _timed(steps: Sequence[Step], requested_at: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    previous: float | None = None
    for s in steps:
        out.append(
            {
                "at": iso(s.at),
                "source": s.source,
                "step": s.step,
                "details": s.details,
                "sincePrevious": None if previous is None else round(s.at - previous, 3),
                "sinceRequest": round(s.at - requested_at, 3),
            }
        )
        previous = s.at
    return out


# -- formatting -------------------------------------------------------------------------------


def _session_json(s: Session) -> dict[str, Any]:
    extra = {
        "dispatcher": s.dispatcher,
        "roomDeletedAt": iso(s.room_deleted_at),
        "endRequestedAt": iso(s.end_requested_at),
        "traceId": _trace_id(s),
    }
    return s.public() | extra


def _trace_id(s: Session) -> str | None:
    """The session's trace (its spans and its bot's, and its log records' `trace_id`)."""
    parts = (s.traceparent or "").split("-")
    return parts[1] if len(parts) == 4 else None


def _unknown(session_id: str) -> int:
    print(f"dispatcher: no session {session_id}")
    return 1


def _reason(s: Session) -> str:
    if s.end_reason is None:
        return ""
    return s.end_reason + ("" if s.exit_code is None else f" (exit {s.exit_code})")


def _event_time(value: Any) -> float | None:
    """Fly's event timestamps are unix milliseconds (an RFC 3339 string is accepted too)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value / 1000
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _clock(ts: float | None) -> str:
    return (iso(ts) or "")[:19].replace("T", " ")


def _age(seconds: float) -> str:
    """A span of time the way people say it: 45s, 12m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:+.3f}s"


def _details(details: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={_one_line(str(v))}" for k, v in details.items() if v not in (None, "", [])
    )


def _one_line(text: str) -> str:
    """Text for one line of a terminal: control characters (newlines, escapes) as escapes."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    head = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    return "\n".join(line.rstrip() for line in (head, *lines))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))
