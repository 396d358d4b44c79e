"""The session state machine: its states, its end reasons, and the one table of transitions.

Every state change of a session is one of the named operations below, each a compare-and-set
in the store from the states its row of `TRANSITIONS` allows: a caller names what it does
(`mark_ready`, `request_end`, ...), never which states it moves from.

A session is `starting` until its machine is made, `dispatched` until its bot calls back,
`ready` until an end is asked for, `ending` until its machine has exited, then `ended` or
`failed`; a start that fails or is interrupted fails from where it got to.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispatcher.machines import MachineExit
    from dispatcher.store import Session, Store


class State(StrEnum):
    """Where a session is; stored as its value."""

    STARTING = "starting"
    DISPATCHED = "dispatched"
    READY = "ready"
    ENDING = "ending"
    ENDED = "ended"
    FAILED = "failed"


ACTIVE_STATES = (State.STARTING, State.DISPATCHED, State.READY, State.ENDING)
TERMINAL_STATES = (State.ENDED, State.FAILED)


class EndReason(StrEnum):
    """Why a session ended, as the dispatcher records it. A bot may report a reason of its own
    (any `[a-z0-9_]{1,64}`, dispatcher/callbacks.py), stored as it came."""

    # Decided by the dispatcher: a DELETE, the time limits, the dispatcher stopping (Ctrl-C,
    # SIGTERM) and ending the sessions of bots that cannot outlive it (local processes).
    DELETED = "deleted"
    MAX_DURATION = "max_duration"
    READY_TIMEOUT = "ready_timeout"
    DISPATCHER_STOPPED = "dispatcher_stopped"
    # From Daily's webhooks (dispatcher/webhooks.py): the meeting is over, or the user left.
    MEETING_ENDED = "meeting_ended"
    PARTICIPANT_LEFT = "participant_left"
    # A start that did not finish: its dispatcher died mid-start (found by the reconciler), or
    # its room or machine could not be made.
    START_INTERRUPTED = "start_interrupted"
    ROOM_CREATE_FAILED = "room_create_failed"
    MACHINE_CREATE_FAILED = "machine_create_failed"
    # From the machine's exit, when nobody gave a reason before: its bot died with its
    # dispatcher (a local process), the kernel's OOM killer, or how the bot exited.
    DISPATCHER_LOST = "dispatcher_lost"
    OOM_KILLED = "oom_killed"
    EXITED_BEFORE_READY = "exited_before_ready"
    COMPLETED = "completed"
    CRASHED = "crashed"


# Reasons a bot's own report or its machine's exit never overrides.
DISPATCHER_REASONS = frozenset(
    {
        EndReason.DELETED,
        EndReason.MAX_DURATION,
        EndReason.READY_TIMEOUT,
        EndReason.DISPATCHER_STOPPED,
    }
)
# Ends that are a person's doing: before the bot was ready, they are not a failure.
USER_ENDED = frozenset(
    {
        EndReason.DELETED,
        EndReason.MEETING_ENDED,
        EndReason.PARTICIPANT_LEFT,
        EndReason.DISPATCHER_STOPPED,
    }
)

# For the OpenAPI document: every state, and every end reason the dispatcher records.
STATE_VALUES: tuple[str, ...] = tuple(state.value for state in State)
END_REASON_VALUES: tuple[str, ...] = tuple(reason.value for reason in EndReason)


class Op(StrEnum):
    """The operations that change a session's state."""

    DISPATCH = "dispatch"
    MARK_READY = "mark_ready"
    REQUEST_END = "request_end"
    END_FROM_ROOM = "end_from_room"
    FAIL_START = "fail_start"
    INTERRUPT_START = "interrupt_start"
    FINISH = "finish"
    FAIL = "fail"


@dataclass(frozen=True)
class Transition:
    """The states an operation moves a session from, and the state it moves it to."""

    sources: frozenset[State]
    target: State

    @property
    def from_states(self) -> tuple[State, ...]:
        """The sources in the order of `State`."""
        return tuple(state for state in State if state in self.sources)


def _rule(target: State, *sources: State) -> Transition:
    return Transition(frozenset(sources), target)


TRANSITIONS: Mapping[Op, Transition] = MappingProxyType(
    {
        # The start made its machine (and room).
        Op.DISPATCH: _rule(State.DISPATCHED, State.STARTING),
        # The bot joined; from `starting` too: a fast bot calls back before its start answers.
        Op.MARK_READY: _rule(State.READY, State.STARTING, State.DISPATCHED),
        # A DELETE, a time limit, the dispatcher stopping, or the bot's own `ended` report.
        Op.REQUEST_END: _rule(State.ENDING, State.STARTING, State.DISPATCHED, State.READY),
        # Daily says the room is over: a session still starting is left to its start.
        Op.END_FROM_ROOM: _rule(State.ENDING, State.DISPATCHED, State.READY),
        # A start that failed half-way; `ready`/`ending` too: a machine made by an ambiguous
        # create may have called back meanwhile.
        Op.FAIL_START: _rule(State.FAILED, State.STARTING, State.READY, State.ENDING),
        # A start its dispatcher never finished (from the state the reconciler saw).
        Op.INTERRUPT_START: _rule(State.FAILED, *ACTIVE_STATES),
        # The machine exited: the session is over, ended or failed.
        Op.FINISH: _rule(State.ENDED, *ACTIVE_STATES),
        Op.FAIL: _rule(State.FAILED, *ACTIVE_STATES),
    }
)

# Every (from, to) pair some operation makes.
ALLOWED: frozenset[tuple[State, State]] = frozenset(
    (source, rule.target) for rule in TRANSITIONS.values() for source in rule.sources
)


async def _move(
    store: Store,
    op: Op,
    session_id: str,
    *,
    seen: str | None = None,
    details: dict[str, Any] | None = None,
    events: Sequence[tuple[str, dict[str, Any]]] = (),
    **values: Any,
) -> Session | None:
    """Apply `op` to a session (only from `seen`, when given); None if its state forbade it."""
    rule = TRANSITIONS[op]
    sources = rule.from_states if seen is None else tuple(s for s in rule.from_states if s == seen)
    return await store.transition(
        session_id, rule.target, from_states=sources, details=details, events=events, **values
    )


async def dispatch(
    store: Store,
    session_id: str,
    *,
    machine_id: str,
    region: str | None,
    machine_version: str | None,
    pooled: bool,
    events: Sequence[tuple[str, dict[str, Any]]] = (),
) -> Session | None:
    """A starting session got its machine (`events` recorded with the change)."""
    return await _move(
        store,
        Op.DISPATCH,
        session_id,
        machine_id=machine_id,
        region=region,
        machine_version=machine_version,
        details={"machine_id": machine_id, "region": region, "pooled": pooled},
        events=events,
    )


async def mark_ready(store: Store, session_id: str) -> Session | None:
    """The session's bot called back ready."""
    return await _move(
        store, Op.MARK_READY, session_id, ready_at=time.time(), details={"source": "bot"}
    )


async def request_end(
    store: Store, session_id: str, reason: str, details: dict[str, Any], **values: Any
) -> Session | None:
    """Ask a live session to end, for `reason` (the dispatcher's or its bot's)."""
    return await _move(
        store, Op.REQUEST_END, session_id, end_reason=reason, details=details, **values
    )


async def end_from_room(
    store: Store, session_id: str, reason: EndReason, details: dict[str, Any]
) -> Session | None:
    """End a dispatched or ready session whose room says it is over."""
    return await _move(store, Op.END_FROM_ROOM, session_id, end_reason=reason, details=details)


async def fail_start(
    store: Store, session_id: str, reason: EndReason, details: dict[str, Any]
) -> Session | None:
    """Fail a start whose room or machine could not be made."""
    return await _move(
        store,
        Op.FAIL_START,
        session_id,
        end_reason=reason,
        ended_at=time.time(),
        details=details,
    )


async def interrupt_start(
    store: Store, session: Session, details: dict[str, Any]
) -> Session | None:
    """Fail a start nobody will finish, if the session is still as it was seen."""
    return await _move(
        store,
        Op.INTERRUPT_START,
        session.id,
        seen=session.state,
        end_reason=EndReason.START_INTERRUPTED,
        ended_at=time.time(),
        details=details,
    )


async def finish(
    store: Store,
    session_id: str,
    *,
    failed: bool,
    reason: str,
    exit_code: int | None,
    details: dict[str, Any],
) -> Session | None:
    """Record a live session as over (`failed` or ended), with its reason and exit code."""
    return await _move(
        store,
        Op.FAIL if failed else Op.FINISH,
        session_id,
        end_reason=reason,
        exit_code=exit_code,
        ended_at=time.time(),
        details=details,
    )


async def finish_on_exit(
    store: Store, session: Session, machine_id: str, exit: MachineExit
) -> tuple[Session | None, str, int | None]:
    """Finish a live session whose machine exited: the session, its end reason, its exit code.

    The reason is the one already asked for (a DELETE, a time limit...), else read from the
    exit: OOM (which wins over any but the dispatcher's own), lost with an earlier dispatcher,
    exited before ready, completed (0) or crashed. The exit code is the machine's, except when
    the bot reported its own and the machine then died of the stop the dispatcher sent
    (SIGTERM, or SIGKILL after the grace): the bot's report wins (the machine's code stays in
    the event). A machine lost with an earlier dispatcher keeps what the store knew."""
    reached_ready = session.ready_at is not None or session.end_reason in USER_ENDED
    reason = session.end_reason
    if exit.oom_killed and reason not in DISPATCHER_REASONS:
        reason = EndReason.OOM_KILLED
    if reason is None:
        if exit.lost:
            reason = EndReason.DISPATCHER_LOST
        elif not reached_ready:
            reason = EndReason.EXITED_BEFORE_READY
        elif exit.exit_code in (0, None):
            reason = EndReason.COMPLETED
        else:
            reason = EndReason.CRASHED
    stopped_after_report = (
        session.exit_code is not None and exit.requested_stop and exit.signal is not None
    )
    exit_code = exit.exit_code
    if exit_code is None or stopped_after_report:
        exit_code = session.exit_code
    details: dict[str, Any] = {
        "machine_id": machine_id,
        "exit_code": exit_code,
        "oom_killed": exit.oom_killed,
        "requested_stop": exit.requested_stop,
        "signal": exit.signal,
    }
    if exit_code != exit.exit_code and exit.exit_code is not None:
        details["machine_exit_code"] = exit.exit_code
    if exit.lost:
        details["lost"] = True
    ended = await finish(
        store,
        session.id,
        failed=not reached_ready or reason == EndReason.READY_TIMEOUT,
        reason=reason,
        exit_code=exit_code,
        details=details,
    )
    return ended, reason, exit_code
