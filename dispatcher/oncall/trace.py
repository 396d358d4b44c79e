"""`dispatcher trace ID`: a session's timeline from the store, Fly and Daily."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dispatcher.errors import DispatcherError
from dispatcher.machines.fly_api import FlyAPI, exit_of
from dispatcher.oncall.clients import Clients
from dispatcher.oncall.text import (
    details_text,
    event_time,
    one_line,
    print_json,
    reason,
    seconds,
    session_json,
    table,
    trace_id,
    unknown,
)
from dispatcher.rooms.daily_api import DailyAPI
from dispatcher.store import Event, Session, iso

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
        return unknown(session_id)
    log = await clients.store.events(session_id)
    notes = lost_notes(log)
    steps = store_steps(log)
    steps += await fly_steps(clients.fly, session, notes)
    steps += await room_steps(clients.daily, session, notes)
    steps.sort(key=lambda s: s.at)
    timed = _timed(steps, session.created_at)
    if as_json:
        print_json({"session": session_json(session), "steps": timed, "notes": notes})
        return 0
    print(
        f"session {session.id}  user {session.user_id}  {session.state}"
        f"  {reason(session)}  machine {session.machine_id or '-'}"
        f" in {session.region or '-'}  trace {trace_id(session) or '-'}"
    )
    if session.error is not None:
        print(f"error: {one_line(session.error)}")
    rows = [
        (
            t["at"][11:23],
            seconds(t["sincePrevious"]),
            seconds(t["sinceRequest"]),
            t["source"],
            t["step"],
            details_text(t["details"]),
        )
        for t in timed
    ]
    print(table(("time (UTC)", "+prev", "+start", "source", "step", "details"), rows))
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
        at = event_time(event.get("timestamp"))
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
