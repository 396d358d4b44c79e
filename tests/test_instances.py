"""Several dispatcher instances on one PostgreSQL database.

Two real dispatcher processes (testkit/procs.py) share a fresh PostgreSQL database, the
DISPATCHER_NAME and the Fly and Daily emulators served in this process; each has its own port
and its own DISPATCHER_URL, which the bots it starts call back. They share the sessions, the
caps (MAX_SESSIONS, MAX_SESSIONS_PER_USER, checked atomically under an advisory lock) and one
reconciler, run by whichever holds the PostgreSQL advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from dispatcher.store import Store
from testkit.fakes.daily import DailyEmulator
from testkit.fakes.fly import FlyEmulator
from testkit.harness import (
    BOT_APP,
    JWT_SECRET,
    daily_emulator,
    dispatcher_process,
    emulators,
    fly_emulator,
)
from testkit.procs import DispatcherProcess
from testkit.waits import eventually

# Creates and lists unthrottled at the emulator (the dispatcher paces nothing either): the
# subject here is the shared store, not Fly's rate limits.
EMULATOR_LIMITS = {"create": (1000.0, 1000), "list": (1000.0, 1000)}
ROLE_CHECKS = 5


def headers(user: str) -> dict[str, str]:
    token = jwt.encode({"sub": user, "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Instance:
    """One dispatcher process and a client for it."""

    proc: DispatcherProcess
    http: httpx.AsyncClient

    async def start(self, user: str, body: Any = None) -> httpx.Response:
        payload: dict[str, Any] = {"createDailyRoom": True}
        if body is not None:
            payload["body"] = body
        return await self.http.post("/start", json=payload, headers=headers(user))

    async def started(self, user: str, body: Any = None) -> str:
        answer = await self.start(user, body)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["sessionId"])

    async def session(self, sid: str, user: str) -> dict[str, Any]:
        answer = await self.http.get(f"/sessions/{sid}", headers=headers(user))
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    async def wait_state(self, sid: str, user: str, state: str) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        async def reached() -> bool:
            nonlocal seen
            seen = await self.session(sid, user)
            assert seen["state"] != "failed", seen
            return bool(seen["state"] == state)

        await eventually(reached, timeout=20, what=f"{sid} {state} (last: {seen})")
        return seen

    async def role(self) -> str:
        answer = await self.http.get("/healthz")
        assert answer.status_code == 200, answer.text
        return str(answer.json()["reconciler"])


@dataclass
class Pair:
    """Two instances on one database, the emulators, and the store for the test's own reads."""

    a: Instance
    b: Instance
    store: Store
    fly: FlyEmulator
    daily: DailyEmulator
    others: list[Instance] = field(default_factory=list)

    @property
    def all(self) -> list[Instance]:
        """Every instance, the pair first."""
        return [self.a, self.b, *self.others]


@contextlib.asynccontextmanager
async def two_instances(tmp_path: Path, database_url: str, **extra: str) -> AsyncIterator[Pair]:
    """Emulators and two dispatcher processes on `database_url` (env plus `extra`); on the way
    out every session left active is deleted and its machine waited for, then both stop."""
    fly = fly_emulator(limits=EMULATOR_LIMITS)
    async with several_instances(tmp_path, database_url, 2, fly, **extra) as pair:
        yield pair


@contextlib.asynccontextmanager
async def several_instances(
    tmp_path: Path, database_url: str, count: int, fly: FlyEmulator, **extra: str
) -> AsyncIterator[Pair]:
    """`count` dispatcher processes on `database_url` and the emulators (`fly` as given); the
    pair is the first two, `others` the rest. On the way out every session left active is
    deleted and its machine waited for, then all stop."""
    async with (
        emulators(fly=fly, daily=daily_emulator(rate_limits=False)) as urls,
        contextlib.AsyncExitStack() as stack,
    ):
        instances = []
        for _ in range(count):
            env = {"FLY_CREATE_RATE": "1000", "FLY_CREATE_BURST": "1000", **extra}
            proc = await stack.enter_async_context(
                dispatcher_process(urls, tmp_path, db=database_url, env=env)
            )
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=proc.url, timeout=30, trust_env=False)
            )
            instances.append(Instance(proc, http))
        assert len({i.proc.port for i in instances}) == count
        # One after the other: the first creates the tables.
        for instance in instances:
            await instance.proc.start()
        store = await Store.open(database_url)
        stack.push_async_callback(store.close)
        pair = Pair(instances[0], instances[1], store, fly, urls.daily, instances[2:])
        yield pair
        await end_everything(pair)
        for instance in instances:
            if instance.proc.running:
                instance.proc.terminate()
                assert await instance.proc.wait(30) == -signal.SIGTERM


async def end_everything(pair: Pair) -> None:
    """DELETE every active session through a running instance; wait for them to be over and
    for every machine to be destroyed."""
    running = next(i for i in pair.all if i.proc.running)
    for session in await pair.store.active_sessions():
        answer = await running.http.delete(
            f"/sessions/{session.id}", headers=headers(session.user_id)
        )
        assert answer.status_code == 202, answer.text

    async def over() -> bool:
        return await pair.store.count_active() == 0

    await eventually(over, timeout=30, what="every session over")
    await eventually(
        lambda: all(m.state == "destroyed" for m in pair.fly.machines.values()),
        timeout=30,
        what="every machine destroyed",
    )


def live_machines(fly: FlyEmulator) -> list[Any]:
    return [m for m in fly.machines.values() if m.state not in ("stopped", "destroyed")]


async def settled_roles(*instances: Instance) -> list[str]:
    """The reconciler roles of `instances` once exactly one leads and that held for several
    polls in a row (spanning a few RECONCILE_INTERVAL_S)."""
    history: list[list[str]] = []

    async def settled() -> bool:
        roles = [await i.role() for i in instances]
        history.append(roles)
        recent = history[-ROLE_CHECKS:]
        return (
            len(recent) == ROLE_CHECKS
            and roles.count("leader") == 1
            and all(r == roles for r in recent)
        )

    try:
        await eventually(settled, timeout=30, what="exactly one leader, stable", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last roles seen: {history[-ROLE_CHECKS:]}") from None
    return history[-1]


# -- visibility -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_session_started_on_one_instance_is_seen_and_deleted_on_the_other(
    tmp_path: Path, pg_database_url: str
) -> None:
    """A session started on A: its bot calls A back; B shows it to its owner (and to nobody
    else) and deletes it: 202, then ended, its machine destroyed and its room deleted."""
    async with two_instances(tmp_path, pg_database_url) as pair:
        a, b = pair.a, pair.b
        sid = await a.started("user-1")
        on_a = await a.wait_state(sid, "user-1", "ready")
        machine = pair.fly.machines[on_a["machineId"]]
        assert machine.config["env"]["DISPATCHER_URL"] == a.proc.url

        on_b = await b.session(sid, "user-1")
        assert on_b == on_a
        stranger = await b.http.get(f"/sessions/{sid}", headers=headers("user-2"))
        assert stranger.status_code == 404
        assert stranger.json()["code"] == "session-not-found"

        deleted = await b.http.delete(f"/sessions/{sid}", headers=headers("user-1"))
        assert deleted.status_code == 202, deleted.text
        assert deleted.json()["state"] == "ending"
        ended = await b.wait_state(sid, "user-1", "ended")
        assert ended["endReason"] == "deleted"
        assert (await a.session(sid, "user-1"))["state"] == "ended"
        await eventually(lambda: machine.state == "destroyed", what="its machine destroyed")
        await eventually(lambda: sid not in pair.daily.rooms, what="its room deleted")
        assert [r.name for r in pair.daily.deleted] == [sid]

        # And the other way round: B's bots call B back.
        sid_b = await b.started("user-1")
        on_b = await b.wait_state(sid_b, "user-1", "ready")
        assert pair.fly.machines[on_b["machineId"]].config["env"]["DISPATCHER_URL"] == b.proc.url
        assert await a.session(sid_b, "user-1") == on_b


# -- caps -------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_max_sessions_counts_the_sessions_of_both_instances(
    tmp_path: Path, pg_database_url: str
) -> None:
    """MAX_SESSIONS=3 on both: two sessions on A and one on B fill it; a fourth start on
    either answers 429 at-capacity; once one ends, a start on the other instance succeeds."""
    env = {"MAX_SESSIONS": "3", "MAX_SESSIONS_PER_USER": "100"}
    async with two_instances(tmp_path, pg_database_url, **env) as pair:
        a, b = pair.a, pair.b
        first = await a.started("user-1")
        await a.started("user-2")
        await b.started("user-3")

        for instance in (a, b):
            refused = await instance.start("user-4")
            assert refused.status_code == 429, refused.text
            assert refused.json()["code"] == "at-capacity"
            assert int(refused.headers["retry-after"]) >= 1
        assert await pair.store.count_active() == 3
        assert len(pair.fly.machines) == 3

        deleted = await b.http.delete(f"/sessions/{first}", headers=headers("user-1"))
        assert deleted.status_code == 202, deleted.text
        await b.wait_state(first, "user-1", "ended")
        await a.started("user-4")
        assert await pair.store.count_active() == 3


@pytest.mark.slow
async def test_concurrent_starts_on_both_instances_never_exceed_max_sessions(
    tmp_path: Path, pg_database_url: str
) -> None:
    """MAX_SESSIONS=4, ten starts at once, five on each instance: exactly four are accepted,
    six answer 429 at-capacity, and only four sessions, rooms and machines were ever made."""
    env = {"MAX_SESSIONS": "4", "MAX_SESSIONS_PER_USER": "100"}
    async with two_instances(tmp_path, pg_database_url, **env) as pair:
        answers = await asyncio.gather(
            *((pair.a if i % 2 else pair.b).start(f"user-{i}") for i in range(10))
        )
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [200] * 4 + [429] * 6, [a.text for a in answers]
        for answer in answers:
            if answer.status_code == 429:
                assert answer.json()["code"] == "at-capacity"
        accepted = {a.json()["sessionId"] for a in answers if a.status_code == 200}

        active = await pair.store.active_sessions()
        assert {s.id for s in active} == accepted
        assert len(await pair.store.list_sessions(limit=100)) == 4
        assert len(pair.fly.machines) == 4
        assert {m.metadata["session_id"] for m in live_machines(pair.fly)} == accepted
        assert set(pair.daily.rooms) == accepted


@pytest.mark.slow
async def test_max_sessions_per_user_counts_the_sessions_of_both_instances(
    tmp_path: Path, pg_database_url: str
) -> None:
    """MAX_SESSIONS_PER_USER=2 on both: a user with one session on each instance is refused a
    third on either (429 user-at-capacity) while another user is not; ten starts of one user
    at once, five on each instance, leave exactly two sessions."""
    env = {"MAX_SESSIONS": "50", "MAX_SESSIONS_PER_USER": "2"}
    async with two_instances(tmp_path, pg_database_url, **env) as pair:
        a, b = pair.a, pair.b
        await a.started("alice")
        await b.started("alice")
        for instance in (a, b):
            refused = await instance.start("alice")
            assert refused.status_code == 429, refused.text
            assert refused.json()["code"] == "user-at-capacity"
            assert int(refused.headers["retry-after"]) >= 1
        await b.started("bob")

        answers = await asyncio.gather(*(((a, b)[i % 2]).start("carol") for i in range(10)))
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [200] * 2 + [429] * 8, [a.text for a in answers]
        for answer in answers:
            if answer.status_code == 429:
                assert answer.json()["code"] == "user-at-capacity"

        by_user: dict[str, int] = {}
        for session in await pair.store.active_sessions():
            by_user[session.user_id] = by_user.get(session.user_id, 0) + 1
        assert by_user == {"alice": 2, "bob": 1, "carol": 2}
        carol = [m for m in pair.fly.machines.values() if m.metadata["user"] == "carol"]
        assert len(carol) == 2


# -- leadership -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_one_reconciler_leader_and_handover(tmp_path: Path, pg_database_url: str) -> None:
    """RECONCILE_INTERVAL_S=0.3: exactly one instance leads. SIGKILL the leader: the other
    takes over, and its reconciler (or its watch) ends a session of the dead leader whose bot
    exited (no `ended` callback, nobody following it). The killed one restarts as standby.
    SIGTERM of the leader hands over too."""
    async with two_instances(tmp_path, pg_database_url, RECONCILE_INTERVAL_S="0.3") as pair:
        roles = await settled_roles(pair.a, pair.b)
        leader, standby = (pair.a, pair.b) if roles[0] == "leader" else (pair.b, pair.a)
        assert await standby.role() == "standby"

        script = {"testBot": {"exit_after_s": 3, "no_ended": True}}
        sid = await leader.started("user-1", body=script)
        ready = await leader.wait_state(sid, "user-1", "ready")
        machine = pair.fly.machines[ready["machineId"]]

        leader.proc.kill()
        assert await leader.proc.wait(10) == -signal.SIGKILL
        # Killed while its session was still live: no one follows that session now.
        row = await pair.store.get(sid)
        assert row is not None and row.state == "ready", row

        async def took_over() -> bool:
            return await standby.role() == "leader"

        await eventually(took_over, timeout=20, what="the standby taking over")

        ended = await standby.wait_state(sid, "user-1", "ended")
        assert ended["endReason"] == "completed"
        assert ended["exitCode"] == 0
        # Ended by the new leader: its reconciler's pass (which logs once the pass is over) or
        # its follow's watch, whichever comes first (both run on the leader only).
        await eventually(
            lambda: any(
                line in standby.proc.log_text()
                for line in ("1 sessions ended", "the machine has exited (seen by the watch)")
            ),
            what="the new leader's report",
        )
        await eventually(lambda: machine.state == "destroyed", what="its machine destroyed")
        await eventually(lambda: sid not in pair.daily.rooms, what="its room deleted")

        await leader.proc.restart()
        assert await settled_roles(leader, standby) == ["standby", "leader"]

        standby.proc.terminate()
        assert await standby.proc.wait(30) == -signal.SIGTERM

        async def handed_over() -> bool:
            return await leader.role() == "leader"

        await eventually(handed_over, timeout=20, what="leadership handed over on SIGTERM")


# -- following --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_four_instances_together_stay_under_flys_list_limit(
    tmp_path: Path, pg_database_url: str
) -> None:
    """Four instances against Fly's own list limit (1 a second, burst 3, per app), each
    following sessions with the watch every second: only the leader watches, and it finishes
    the sessions of every instance whose bot exited without a word; over many more watch
    passes Fly never answered a list with 429."""
    fly = fly_emulator(limits={"create": (1000.0, 1000)})
    async with several_instances(tmp_path, pg_database_url, 4, fly) as group:
        leader_roles = await settled_roles(*group.all)
        assert leader_roles.count("leader") == 1
        crash = {"testBot": {"exit_after_s": 1, "exit_code": 3, "no_ended": True}}
        crashing = [await i.started(f"user-{n}", crash) for n, i in enumerate(group.all)]
        idle = [await i.started(f"idle-{n}") for n, i in enumerate(group.all)]
        for n, sid in enumerate(crashing):

            async def crashed(sid: str = sid, user: str = f"user-{n}") -> bool:
                seen = await group.a.session(sid, user)
                return seen["state"] == "ended" and seen["endReason"] == "crashed"

            await eventually(crashed, timeout=30, what=f"{sid} ended as crashed")
        for n, sid in enumerate(idle):
            assert (await group.b.session(sid, f"idle-{n}"))["state"] == "ready"

        def watches() -> int:
            path = f"/v1/apps/{BOT_APP}/machines"
            return sum(1 for r in fly.requests if r.path == path and "summary=true" in r.query)

        seen = watches()
        await eventually(lambda: watches() >= seen + 5, timeout=30, what="five more watches")
        assert fly.limiter.refused.get("list", 0) == 0, fly.limiter.refused
