"""The session state machine: each operation of dispatcher/lifecycle.py moves a session from the
states its row of the table allows, and from no other, on a real store (SQLite, PostgreSQL)."""

from __future__ import annotations

import time
from typing import assert_never

import pytest

from dispatcher import lifecycle
from dispatcher.lifecycle import (
    ALLOWED,
    END_REASON_VALUES,
    STATE_VALUES,
    TERMINAL_STATES,
    TRANSITIONS,
    EndReason,
    Op,
    State,
)
from dispatcher.store import Session, Store


def stored(sid: str, state: State) -> Session:
    """A session row in `state`, with a machine (so every operation could apply to it)."""
    now = time.time()
    return Session(
        id=sid,
        user_id="u1",
        state=state,
        transport="daily",
        dispatcher="test",
        created_at=now,
        updated_at=now,
        expires_at=now + 60,
        machine_id="m-0",
    )


async def apply(store: Store, op: Op, session: Session) -> Session | None:
    """Call the named operation for `op` as its callers do."""
    sid = session.id
    match op:
        case Op.DISPATCH:
            return await lifecycle.dispatch(
                store, sid, machine_id="m-1", region="iad", machine_version="v1", pooled=False
            )
        case Op.MARK_READY:
            return await lifecycle.mark_ready(store, sid)
        case Op.REQUEST_END:
            return await lifecycle.request_end(
                store, sid, EndReason.DELETED, {"reason": EndReason.DELETED, "by": "u1"}
            )
        case Op.END_FROM_ROOM:
            details = {"reason": EndReason.MEETING_ENDED, "source": "webhook"}
            return await lifecycle.end_from_room(store, sid, EndReason.MEETING_ENDED, details)
        case Op.FAIL_START:
            reason = EndReason.MACHINE_CREATE_FAILED
            return await lifecycle.fail_start(store, sid, reason, {"error": "UpstreamError"})
        case Op.INTERRUPT_START:
            return await lifecycle.interrupt_start(store, session, {"source": "reconciler"})
        case Op.FINISH | Op.FAIL:
            return await lifecycle.finish(
                store,
                sid,
                failed=op == Op.FAIL,
                reason=EndReason.COMPLETED,
                exit_code=0,
                details={"exit_code": 0},
            )
        case _:
            assert_never(op)


@pytest.mark.parametrize("op", list(Op))
async def test_each_operation_moves_from_its_states_only(store: Store, op: Op) -> None:
    """From each state of its row, the operation moves the session to its target and logs the
    change; from every other state it is refused (None), the session and its log untouched."""
    rule = TRANSITIONS[op]
    for state in State:
        sid = f"s-{op}-{state}"
        session = stored(sid, state)
        await store.create_session(session, max_sessions=1000)
        moved = await apply(store, op, session)
        after = await store.get(sid)
        log = [(e.kind, e.state) for e in await store.events(sid)]
        assert after is not None
        if state in rule.sources:
            assert moved is not None and moved.state == rule.target, (op, state)
            assert after.state == rule.target
            assert log[-1] == ("state", rule.target)
        else:
            assert moved is None, (op, state)
            assert after.state == state and after.updated_at == session.updated_at
            assert log == [("state", state)]


@pytest.mark.parametrize(
    ("op", "field", "value"),
    [
        (Op.DISPATCH, "machine_id", "m-1"),
        (Op.REQUEST_END, "end_reason", "deleted"),
        (Op.END_FROM_ROOM, "end_reason", "meeting_ended"),
        (Op.FAIL_START, "end_reason", "machine_create_failed"),
        (Op.INTERRUPT_START, "end_reason", "start_interrupted"),
        (Op.FINISH, "exit_code", 0),
    ],
)
async def test_operations_record_what_they_did(
    store: Store, op: Op, field: str, value: object
) -> None:
    """An operation stores its reason or machine with the state, as the same strings as ever;
    an end requested records when, a session over records when it ended."""
    (source,) = TRANSITIONS[op].from_states[:1]
    session = stored(f"s-{op}", source)
    await store.create_session(session, max_sessions=10)
    moved = await apply(store, op, session)
    assert moved is not None and getattr(moved, field) == value
    if moved.state == State.ENDING:
        assert moved.end_requested_at is not None and moved.ended_at is None
    if moved.state in TERMINAL_STATES:
        assert moved.ended_at is not None


async def test_mark_ready_records_when(store: Store) -> None:
    """A session marked ready has its ready time, and its event says the bot said so."""
    await store.create_session(stored("s-ready", State.DISPATCHED), max_sessions=10)
    ready = await lifecycle.mark_ready(store, "s-ready")
    assert ready is not None and ready.ready_at is not None
    assert (await store.events("s-ready"))[-1].details == {"source": "bot"}


async def test_interrupt_start_needs_the_state_it_saw(store: Store) -> None:
    """A stuck start seen in `starting` is not failed if it moved on since (its bot called
    back, or a DELETE came): the compare-and-set is on the state the reconciler saw."""
    seen = stored("s-seen", State.STARTING)
    await store.create_session(seen, max_sessions=10)
    assert await lifecycle.mark_ready(store, "s-seen") is not None
    assert await lifecycle.interrupt_start(store, seen, {"source": "reconciler"}) is None
    after = await store.get("s-seen")
    assert after is not None and after.state == State.READY


def test_the_table() -> None:
    """Terminal states have no way out, every state is reached, and the stored values (and
    the lists the OpenAPI document shows) are the strings they always were."""
    assert set(TRANSITIONS) == set(Op)
    assert not any(source in TERMINAL_STATES for source, _ in ALLOWED)
    reached = {State.STARTING} | {target for _, target in ALLOWED}
    assert reached == set(State)
    assert STATE_VALUES == ("starting", "dispatched", "ready", "ending", "ended", "failed")
    assert {
        "deleted",
        "max_duration",
        "ready_timeout",
        "dispatcher_stopped",
        "meeting_ended",
        "participant_left",
        "start_interrupted",
        "room_create_failed",
        "machine_create_failed",
        "dispatcher_lost",
        "oom_killed",
        "exited_before_ready",
        "completed",
        "crashed",
    } == set(END_REASON_VALUES)
