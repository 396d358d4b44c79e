"""The on-call commands: `dispatcher sessions list|show|stop`, `dispatcher trace ID` and
`dispatcher pool status`.

They read the service's own settings (so they work from `fly ssh console` on the dispatcher),
open its store, and ask Fly and Daily directly; they never start the HTTP app.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.config import Settings
from dispatcher.machines.fly import POOL_LABEL, FlyMachines
from dispatcher.oncall.clients import RETRY, Clients, clients
from dispatcher.oncall.text import (
    age,
    clock,
    details_text,
    one_line,
    print_json,
    reason,
    session_json,
    table,
    unknown,
)
from dispatcher.oncall.trace import trace
from dispatcher.sessions import end_session
from dispatcher.store import PoolRows, Store, iso

OPERATOR = "operator"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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
    # A local pool's "image" is the serving process's hash of the bot code, which only that
    # process knows: the newest row's is the current one.
    image = (
        s.bot_image if s.machine_backend == "fly" else (machines[-1].image if machines else None)
    )
    summary = {
        "size": s.pool_size,
        "mode": s.pool_mode,
        "recycle": s.pool_recycle,
        "image": image,
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
        print_json(summary | {"pool": listing})
        return 0
    recycling = ", recycling" if s.pool_recycle else ""
    print(
        f"pool: {s.pool_size} per region ({s.pool_mode}{recycling}), image {image or '-'}; "
        f"within {age(since_s)}: {claims} starts from the pool, {misses} cold"
    )
    if errors is not None:
        print(
            f"this instance since it started: {errors['startFailures']:.0f} pool machines "
            f"failed to start, {errors['replenishErrors']:.0f} could not be made or suspended"
            + (
                f"; {errors['recycled']:.0f} recycled, {errors['recycleFailures']:.0f} could "
                "not be (destroyed)"
                if s.pool_recycle
                else ""
            )
        )
    lines = [
        (
            m.machine_id,
            m.region or "any",
            m.state,
            fly_state.get(m.machine_id, "-"),
            "current" if m.image == image else m.image,
            m.session_id or "-",
            age(time.time() - m.created_at),
        )
        for m in machines
    ]
    print(table(("machine", "region", "state", "fly", "image", "session", "age"), lines))
    return 0


async def _local_pool_errors(settings: Settings) -> dict[str, float] | None:
    """The pool's counters of the dispatcher serving on this machine (the port of
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
        "recycled": values.get("dispatcher_pool_recycled_total", 0.0),
        "recycleFailures": values.get("dispatcher_pool_recycle_failures_total", 0.0),
    }


# -- sessions list / show / stop --------------------------------------------------------------


async def list_sessions(store: Store, args: argparse.Namespace) -> int:
    """`sessions list`: a table or JSON, newest first."""
    since = time.time() - args.since if args.since else None
    found = await store.list_sessions(
        state=args.state, user=args.user, limit=args.limit, created_after=since
    )
    if args.json:
        print_json([session_json(s) for s in found])
        return 0
    header = ("id", "state", "user", "region", "machine", "created", "ready", "ended", "reason")
    rows = [
        (
            s.id,
            s.state,
            s.user_id,
            s.region or "",
            s.machine_id or "",
            clock(s.created_at),
            clock(s.ready_at),
            clock(s.ended_at),
            reason(s),
        )
        for s in found
    ]
    print(table(header, rows))
    return 0


async def show(store: Store, session_id: str, *, as_json: bool) -> int:
    """`sessions show ID`: the session and its event log."""
    session = await store.get(session_id)
    if session is None:
        return unknown(session_id)
    log = await store.events(session_id)
    if as_json:
        events = [
            {"at": iso(e.at), "kind": e.kind, "state": e.state, "details": e.details} for e in log
        ]
        print_json({"session": session_json(session), "events": events})
        return 0
    for key, value in session_json(session).items():
        print(f"{key + ':':<16}{'' if value is None else one_line(str(value))}")
    print()
    rows = [(clock(e.at), e.kind, e.state or "", details_text(e.details)) for e in log]
    print(table(("at", "kind", "state", "details"), rows))
    return 0


async def stop(clients: Clients, session_id: str) -> int:
    """`sessions stop ID`: end it as DELETE does, by `operator`; exit 1 when unknown."""
    session = await clients.store.get(session_id)
    if session is None:
        return unknown(session_id)
    if clients.fly is None:
        print(
            f"dispatcher: {session_id}: this dispatcher runs bots as its own local processes; "
            "end it through its HTTP API (DELETE /sessions/{id})"
        )
        return 2
    grace = clients.settings.bot_stop_timeout_s
    machines = FlyMachines(clients.fly, clients.settings, RETRY)
    ending = await end_session(clients.store, machines, session_id, by=OPERATOR, grace_s=grace)
    if ending is None:
        print(f"{session_id} is already {session.state} ({reason(session) or 'no reason'})")
        return 0
    print(f"{session_id}: {session.state} -> ending (reason deleted, by {OPERATOR})")
    if ending.machine_id:
        print(f"machine {ending.machine_id}: SIGTERM sent, SIGKILL after {grace} s")
    return 0
