"""What a chaos run (testkit/chaos.py) did, and the invariants it checks once settled: from the
store and the emulators' own state, no accepted session lost, no unaccepted one left live, no
machine without a live session, no room of an ended session, no session with two machines."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dispatcher.store import Session, Store
from testkit.fakes.daily import DailyEmulator
from testkit.fakes.fly import FlyEmulator


@dataclass
class ChaosReport:
    """What a run did and what it left behind."""

    sessions: int = 0
    accepted: list[str] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    played: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    unfired: Counter[str] = field(default_factory=Counter)
    natural_429: Counter[str] = field(default_factory=Counter)
    end_states: Counter[str] = field(default_factory=Counter)
    machines_created: int = 0
    rooms_created: int = 0
    lost: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    leaked_machines: list[str] = field(default_factory=list)
    leaked_rooms: list[str] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    client_errors: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    burst_s: float = 0.0
    settle_s: float = 0.0
    wall_s: float = 0.0
    settled: bool = False

    @property
    def violations(self) -> int:
        """How many invariant violations the run found."""
        return (
            len(self.lost)
            + len(self.stuck)
            + len(self.leaked_machines)
            + len(self.leaked_rooms)
            + len(self.duplicates)
            + len(self.client_errors)
        )

    def table(self) -> str:
        """The figures as a Markdown table."""
        rows: list[tuple[str, Any]] = [
            ("sessions (starts sent)", self.sessions),
            ("accepted (200)", len(self.accepted)),
        ]
        rows += [(f"refused: {k}", v) for k, v in sorted(self.refused.items())]
        rows += [(f"client: {k}", v) for k, v in sorted(self.retries.items())]
        rows += [(f"bot played: {k}", v) for k, v in sorted(self.played.items())]
        rows += [(f"injected: {k}", v) for k, v in sorted(self.injected.items())]
        rows += [(f"queued, never fired: {k}", v) for k, v in sorted(self.unfired.items()) if v]
        rows += [(f"emulator's own 429s: {k}", v) for k, v in sorted(self.natural_429.items())]
        rows += [(f"ended as {k}", v) for k, v in sorted(self.end_states.items())]
        rows += [
            ("machines created", self.machines_created),
            ("rooms created", self.rooms_created),
            ("**lost sessions**", len(self.lost)),
            ("**stuck unaccepted sessions**", len(self.stuck)),
            ("**leaked machines**", len(self.leaked_machines)),
            ("**leaked rooms**", len(self.leaked_rooms)),
            ("**sessions with two machines**", len(self.duplicates)),
            (
                "burst / settle / wall time",
                f"{self.burst_s:.0f} s / {self.settle_s:.0f} s / {self.wall_s:.0f} s",
            ),
        ]
        lines = ["| figure | value |", "| --- | --- |"]
        return "\n".join(lines + [f"| {k} | {v} |" for k, v in rows])


async def _sessions(store: Store) -> dict[str, Session]:
    return {s.id: s for s in await store.list_sessions(limit=1_000_000)}


async def settle(store: Store, fly: FlyEmulator, daily: DailyEmulator, timeout_s: float) -> bool:
    """Wait until every session is terminal, no machine is left and no room remains."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sessions = await _sessions(store)
        if (
            not any(s.active for s in sessions.values())
            and all(m.state == "destroyed" for m in fly.machines.values())
            and not daily.rooms
        ):
            return True
        await asyncio.sleep(0.25)
    return False


async def check(report: ChaosReport, store: Store, fly: FlyEmulator, daily: DailyEmulator) -> None:
    """Compute the invariants from the store and the emulators' state."""
    sessions = await _sessions(store)
    machines = fly.machines
    for sid in report.accepted:
        s = sessions.get(sid)
        if s is not None and not s.active:
            continue
        running = (
            s is not None
            and s.state in ("ready", "dispatched")
            and s.machine_id in machines
            and machines[s.machine_id].state == "started"
        )
        if not running:
            report.lost.append(sid)
    accepted = set(report.accepted)
    report.stuck = [s.id for s in sessions.values() if s.active and s.id not in accepted]
    for m in machines.values():
        owner = sessions.get(m.metadata.get("session_id", ""))
        if m.state != "destroyed" and not (owner and owner.active and owner.machine_id == m.id):
            report.leaked_machines.append(f"{m.id} ({m.state}) of {owner.id if owner else '?'}")
    for name in daily.rooms:
        owner = sessions.get(name)
        if owner is None or not owner.active:
            report.leaked_rooms.append(name)
    per_session = Counter(m.metadata.get("session_id") for m in machines.values())
    report.duplicates = {sid: n for sid, n in per_session.items() if sid and n > 1}
    report.machines_created = len(machines)
    report.rooms_created = len(daily.rooms) + len(daily.deleted)
    report.end_states = Counter(f"{s.state} ({s.end_reason})" for s in sessions.values())
    suspects = {*report.lost, *report.stuck, *report.leaked_rooms, *report.duplicates}
    suspects |= {entry.rsplit(" of ", 1)[1] for entry in report.leaked_machines}
    suspects |= {entry.split()[1].rstrip(":") for entry in report.client_errors}
    for sid in sorted(suspects - {"?"}):
        s = sessions.get(sid)
        timeline = [
            f"{e.kind}:{e.state or ''} {e.details}" for e in await store.events(sid)
        ] if s else []  # fmt: skip
        state = f"{s.state} machine={s.machine_id} reason={s.end_reason}" if s else "unknown"
        report.details.append(f"{sid}: {state}\n    " + "\n    ".join(timeline))
