"""Capacity limits, create pacing and Idempotency-Key at the HTTP API: the real dispatcher
under uvicorn against the Fly and Daily emulators, with the test bot as the machines' image
(and the idempotent wait on a store of its own, with a short wait passed in)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.errors import InProgress, http_status
from dispatcher.idempotency import Idempotency, IdempotentStarts
from dispatcher.store import ACTIVE_STATES, FAILED, Session, Store
from testkit.harness import Stack, daily_emulator, dispatcher_stack, fly_emulator
from testkit.waits import eventually


def machine_creates(stack: Stack) -> int:
    """How many create calls the Fly emulator received."""
    assert stack.fly is not None
    return sum(1 for r in stack.fly.requests if r.method == "POST" and r.path.endswith("/machines"))


def created_for(stack: Stack) -> set[str]:
    """The sessions the Fly emulator was asked to create a machine for (a create retried after
    a 429 counts once: this is what a start made, not how many calls it took)."""
    assert stack.fly is not None
    return {
        r.body["config"]["metadata"]["session_id"]
        for r in stack.fly.requests
        if r.method == "POST" and r.path.endswith("/machines")
    }


def room_creates(stack: Stack) -> int:
    """How many create-room calls the Daily emulator received."""
    assert stack.daily is not None
    return sum(1 for r in stack.daily.requests if r.method == "POST" and r.path == "/rooms")


def machines_of(stack: Stack, sid: str) -> list[Any]:
    """Every machine ever made for a session (destroyed ones included)."""
    assert stack.fly is not None
    return [m for m in stack.fly.machines.values() if m.config["metadata"]["session_id"] == sid]


def assert_retry_later(response: httpx.Response, code: str) -> None:
    """A 429 JSON answer with `code` and a Retry-After of at least a second."""
    assert response.status_code == 429, response.text
    assert response.json()["code"] == code
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["retry-after"]) >= 1


async def end_all(stack: Stack, sessions: dict[str, str]) -> None:
    """DELETE sessions (id -> user) and wait until each has ended (its bot exited)."""
    for sid, user in sessions.items():
        response = await stack.http.delete(f"/sessions/{sid}", headers=stack.headers(user))
        assert response.status_code == 202, response.text
    for sid, user in sessions.items():
        await stack.wait_state(sid, "ended", user=user)


async def keyed_start(
    stack: Stack, key: str | bytes, payload: Any = None, *, user: str = "user-1"
) -> httpx.Response:
    """POST /start with an Idempotency-Key."""
    headers: dict[str, Any] = {**stack.headers(user), "Idempotency-Key": key}
    body = {"createDailyRoom": True} if payload is None else payload
    return await stack.http.post("/start", json=body, headers=headers)


async def sessions_in_store(tmp_path: Path) -> list[Session]:
    """Every session row of the harness dispatcher's SQLite store, read beside it."""
    db = await Store.open(f"sqlite:///{tmp_path}/dispatcher.db")
    try:
        return await db.list_sessions()
    finally:
        await db.close()


async def key_is_free(tmp_path: Path, user: str, key: str) -> bool:
    """Whether no start holds the key in the harness dispatcher's store (probed by claiming it
    and giving it back at once)."""
    db = await Store.open(f"sqlite:///{tmp_path}/dispatcher.db")
    try:
        held = await db.claim_key(user, key, "probe", "s-probe")
        if held is None:
            await db.release_key(user, key, "s-probe")
        return held is None
    finally:
        await db.close()


# -- capacity ---------------------------------------------------------------------------------


async def test_per_user_cap(tmp_path: Path) -> None:
    """MAX_SESSIONS_PER_USER: a user's third start is 429 user-at-capacity and makes nothing,
    another user still starts, and an ended session frees the slot."""
    async with dispatcher_stack(tmp_path, env={"MAX_SESSIONS_PER_USER": "2"}) as stack:
        assert stack.fly is not None and stack.daily is not None
        first, second = (await stack.start(), await stack.start())
        assert first.status_code == 200 and second.status_code == 200, second.text
        a, b = first.json()["sessionId"], second.json()["sessionId"]

        refused = await stack.start()
        assert_retry_later(refused, "user-at-capacity")
        assert created_for(stack) == {a, b} and room_creates(stack) == 2
        assert set(stack.daily.rooms) == {a, b}

        other = await stack.start(user="user-2")
        assert other.status_code == 200, other.text
        c = other.json()["sessionId"]
        assert (await stack.session(c, "user-2"))["user"] == "user-2"

        await end_all(stack, {a: "user-1"})
        again = await stack.start()
        assert again.status_code == 200, again.text
        d = again.json()["sessionId"]
        assert d not in (a, b, c)
        assert created_for(stack) == {a, b, c, d} and room_creates(stack) == 4
        await end_all(stack, {b: "user-1", c: "user-2", d: "user-1"})


async def test_total_cap(tmp_path: Path) -> None:
    """MAX_SESSIONS: past it any user's start is 429 at-capacity and makes nothing."""
    async with dispatcher_stack(tmp_path, env={"MAX_SESSIONS": "2"}) as stack:
        assert stack.daily is not None
        a = (await stack.start(user="user-1")).json()["sessionId"]
        b = (await stack.start(user="user-2")).json()["sessionId"]
        refused = await stack.start(user="user-3")
        assert_retry_later(refused, "at-capacity")
        assert created_for(stack) == {a, b} and room_creates(stack) == 2
        await end_all(stack, {a: "user-1"})
        c = await stack.start(user="user-3")
        assert c.status_code == 200, c.text
        await end_all(stack, {b: "user-2", c.json()["sessionId"]: "user-3"})


# -- create pacing ----------------------------------------------------------------------------


async def test_create_pacing_refuses_past_the_queue_bound(tmp_path: Path) -> None:
    """Creates are paced under Fly's limit (the emulator never refuses one); a burst beyond
    CREATE_QUEUE_WAIT_S of queue is answered 429 queue-full and leaves nothing behind."""
    fly = fly_emulator(limits={"create": (1.0, 1)})
    env = {"FLY_CREATE_RATE": "1", "FLY_CREATE_BURST": "1", "CREATE_QUEUE_WAIT_S": "1.5"}
    async with dispatcher_stack(tmp_path, env=env, fly=fly) as stack:
        assert stack.daily is not None
        users = [f"user-{i}" for i in range(6)]
        answers = await asyncio.gather(*(stack.start(user=u) for u in users))
        started = {
            r.json()["sessionId"]: u for r, u in zip(answers, users, strict=True) if r.is_success
        }
        refused = [r for r in answers if not r.is_success]
        for response in refused:
            assert_retry_later(response, "queue-full")
        # The first two always fit (waits of 0 s and about 1 s); six at once overflow 1.5 s.
        assert len(started) >= 2 and refused
        assert len(started) + len(refused) == 6

        assert fly.limiter.refused.get("create", 0) == 0
        assert machine_creates(stack) == len(started)
        for sid in started:
            assert len(machines_of(stack, sid)) == 1
        assert set(stack.daily.rooms) == set(started)
        assert room_creates(stack) == len(started)
        rows = await sessions_in_store(tmp_path)
        assert {s.id for s in rows} == set(started)
        assert all(s.state in ACTIVE_STATES for s in rows)
        await end_all(stack, started)


@pytest.mark.slow
async def test_queued_creates_reach_fly_after_their_turn(tmp_path: Path) -> None:
    """Starts one after the other under a create pacing equal to Fly's own limit: each create
    that had to wait for its turn still reaches Fly after Fly's bucket refilled (no 429)."""
    fly = fly_emulator(limits={"create": (1.0, 1)})
    env = {"FLY_CREATE_RATE": "1", "FLY_CREATE_BURST": "1", "CREATE_QUEUE_WAIT_S": "5"}
    async with dispatcher_stack(tmp_path, env=env, fly=fly) as stack:
        started: dict[str, str] = {}
        for user in ("user-1", "user-2", "user-3"):
            response = await stack.start(user=user)
            assert response.status_code == 200, response.text
            started[response.json()["sessionId"]] = user
        assert fly.limiter.refused.get("create", 0) == 0
        assert machine_creates(stack) == 3
        await end_all(stack, started)


@pytest.mark.slow
async def test_create_retries_wait_for_their_turn_too(tmp_path: Path) -> None:
    """A create that failed (503, after using Fly's token) is retried in its own turn under the
    pacing, not at once into Fly's empty bucket: Fly never answers 429."""
    fly = fly_emulator(limits={"create": (1.0, 1)})
    fly.faults.add("create", status=503, times=2)
    env = {"FLY_CREATE_RATE": "1", "FLY_CREATE_BURST": "1", "CREATE_QUEUE_WAIT_S": "5"}
    async with dispatcher_stack(tmp_path, env=env, fly=fly) as stack:
        response = await stack.start()
        assert response.status_code == 200, response.text
        assert [op for op, _ in fly.faults.fired] == ["create", "create"]
        assert fly.limiter.refused.get("create", 0) == 0
        assert machine_creates(stack) == 3
        await end_all(stack, {response.json()["sessionId"]: "user-1"})


# -- Idempotency-Key ------------------------------------------------------------------------


async def test_same_key_same_request_answers_the_first_answer(tmp_path: Path) -> None:
    """A retried start with the same key and body gets the same answer and no second VM; a
    different body under that key is 422; another user's identical key is its own start."""
    async with dispatcher_stack(tmp_path) as stack:
        assert stack.fly is not None and stack.daily is not None
        payload = {"createDailyRoom": True, "body": {"persona": "pirate"}}
        first = await keyed_start(stack, "order-42", payload)
        assert first.status_code == 200, first.text
        second = await keyed_start(stack, "order-42", payload)
        assert second.status_code == 200, second.text
        assert second.json() == first.json()
        sid = first.json()["sessionId"]
        assert len(stack.fly.machines) == 1 and len(machines_of(stack, sid)) == 1
        assert list(stack.daily.rooms) == [sid] and room_creates(stack) == 1

        reused = await keyed_start(stack, "order-42", {**payload, "body": {"persona": "cat"}})
        assert reused.status_code == 422, reused.text
        assert reused.json()["code"] == "idempotency-key-reused"
        assert machine_creates(stack) == 1

        theirs = await keyed_start(stack, "order-42", payload, user="user-2")
        assert theirs.status_code == 200, theirs.text
        other = theirs.json()["sessionId"]
        assert other != sid
        assert (await stack.session(other, "user-2"))["user"] == "user-2"
        assert machine_creates(stack) == 2 and room_creates(stack) == 2
        await end_all(stack, {sid: "user-1", other: "user-2"})


async def test_concurrent_starts_with_one_key_make_one_session(tmp_path: Path) -> None:
    """Two starts racing with the same key both answer the one session made."""
    fly = fly_emulator()
    fly.latency.per_op["create"] = 0.5
    async with dispatcher_stack(tmp_path, fly=fly) as stack:
        assert stack.daily is not None
        one, two = await asyncio.gather(keyed_start(stack, "k-race"), keyed_start(stack, "k-race"))
        assert one.status_code == 200, one.text
        assert two.status_code == 200, two.text
        assert one.json() == two.json()
        sid = one.json()["sessionId"]
        assert len(fly.machines) == 1 and len(machines_of(stack, sid)) == 1
        assert list(stack.daily.rooms) == [sid] and room_creates(stack) == 1
        await end_all(stack, {sid: "user-1"})


@pytest.mark.parametrize("fails", ["daily", "fly"])
async def test_a_failed_start_releases_its_key(tmp_path: Path, fails: str) -> None:
    """A start that fails (Daily or Fly refuses its create) frees its key: the retry under
    the same key makes a new session."""
    fly, daily = fly_emulator(), daily_emulator()
    if fails == "daily":
        daily.faults.add("create_room", status=400, body={"error": "invalid-request-error"})
    else:
        fly.faults.add("create", status=422, body={"error": "invalid machine config"})
    async with dispatcher_stack(tmp_path, fly=fly, daily=daily) as stack:
        failed = await keyed_start(stack, "k-retry")
        assert failed.status_code == 502, failed.text
        assert failed.json()["code"] == "upstream-error"
        assert fails in failed.json()["detail"].lower()
        (failed_session,) = await sessions_in_store(tmp_path)
        assert failed_session.state == "failed"
        assert await key_is_free(tmp_path, "user-1", "k-retry")
        await eventually(
            lambda: all(m.state == "destroyed" for m in machines_of(stack, failed_session.id)),
            what="the failed start's machine destroyed",
        )

        retried = await keyed_start(stack, "k-retry")
        assert retried.status_code == 200, retried.text
        sid = retried.json()["sessionId"]
        assert sid != failed_session.id
        assert (await stack.session(sid))["state"] in ("dispatched", "ready")
        await eventually(lambda: list(daily.rooms) == [sid], what="the failed start's room gone")
        assert len(machines_of(stack, sid)) == 1
        assert not await key_is_free(tmp_path, "user-1", "k-retry")
        again = await keyed_start(stack, "k-retry")
        assert again.json() == retried.json()
        await end_all(stack, {sid: "user-1"})


async def test_a_start_still_in_flight_is_409_after_the_wait(tmp_path: Path) -> None:
    """A retry that outwaits the idempotent wait (0.3 s here) while the first start is still in
    flight gets 409 idempotency-key-in-progress with Retry-After; once it finished, the first
    answer, and the start ran once."""
    store = await Store.open(f"sqlite:///{tmp_path}/dispatcher.db")
    try:
        starts = IdempotentStarts(store, abandoned_after_s=60, wait_s=0.3)
        key = Idempotency("k-slow", hashlib.sha256(b"{}").hexdigest())
        finish = asyncio.Event()
        calls: list[str] = []

        async def start() -> dict[str, Any]:
            calls.append("start")
            await finish.wait()
            return {"sessionId": "s-0123456789abcdef", "dailyRoom": "room"}

        first_task = asyncio.create_task(starts.run("user-1", key, "s-0123456789abcdef", start))
        await eventually(lambda: calls == ["start"], what="the first start running")
        with pytest.raises(InProgress) as waiting:
            await starts.run("user-1", key, "s-1123456789abcdef", start)
        assert waiting.value.code == "idempotency-key-in-progress"
        assert http_status(waiting.value) == 409
        assert int(waiting.value.headers()["Retry-After"]) >= 1
        finish.set()
        first = await first_task
        assert await starts.run("user-1", key, "s-2123456789abcdef", start) == first
        assert calls == ["start"]
    finally:
        await store.close()


async def test_a_key_held_by_an_abandoned_start_is_taken_over(tmp_path: Path) -> None:
    """A key whose start failed without an answer (its dispatcher died mid-start) does not
    block a retry: the retry starts a new session under it."""
    raw = b'{"createDailyRoom": true}'
    async with dispatcher_stack(tmp_path) as stack:
        db = await Store.open(f"sqlite:///{tmp_path}/dispatcher.db")
        try:
            now = time.time()
            orphan = Session(
                id="s-0123456789abcdef",
                user_id="user-1",
                state=FAILED,
                transport="daily",
                dispatcher="test-dispatcher",
                created_at=now,
                updated_at=now,
                expires_at=now + 60,
                end_reason="start_interrupted",
            )
            await db.create_session(orphan, max_sessions=10)
            digest = hashlib.sha256(raw).hexdigest()
            assert await db.claim_key("user-1", "k-orphan", digest, orphan.id) is None
        finally:
            await db.close()
        headers = {
            **stack.headers(),
            "Idempotency-Key": "k-orphan",
            "Content-Type": "application/json",
        }
        response = await stack.http.post("/start", content=raw, headers=headers)
        assert response.status_code == 200, response.text
        sid = response.json()["sessionId"]
        assert sid != orphan.id
        assert machine_creates(stack) == 1
        again = await stack.http.post("/start", content=raw, headers=headers)
        assert again.json() == response.json()
        await end_all(stack, {sid: "user-1"})


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("", id="empty"),
        pytest.param("key\twith-a-tab", id="not-printable"),
        pytest.param("k" * 256, id="too-long"),
        pytest.param("clé-1".encode(), id="non-ascii"),
    ],
)
async def test_invalid_keys_are_refused(tmp_path: Path, key: str | bytes) -> None:
    """A key that is empty, over 255 characters, not printable or not ASCII is 400 and makes
    nothing."""
    async with dispatcher_stack(tmp_path) as stack:
        response = await keyed_start(stack, key)
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid-idempotency-key"
        assert machine_creates(stack) == 0 and room_creates(stack) == 0


async def test_longest_key_is_accepted(tmp_path: Path) -> None:
    """A key of exactly 255 printable ASCII characters is valid."""
    async with dispatcher_stack(tmp_path) as stack:
        key = "K-" + "x" * 253
        first = await keyed_start(stack, key)
        assert first.status_code == 200, first.text
        assert (await keyed_start(stack, key)).json() == first.json()
        assert machine_creates(stack) == 1
        await end_all(stack, {first.json()["sessionId"]: "user-1"})
