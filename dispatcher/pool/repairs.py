"""The reconciler's pass over the warm pool: rows against Fly's inventory (the list lags, so
what it misses is asked of the machine, or given time)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dispatcher.machines import MachineInfo
from dispatcher.pool.machines import PoolMachines, ref_of
from dispatcher.store import AVAILABLE, CLAIMED, RECYCLING, WARMING, PoolMachine

log = logging.getLogger(__name__)

# Rows whose machine the inventory no longer lists are dropped after this (the list lags).
LIST_LAG_S = 30.0
# A machine labelled as ours but without a row (its row lost, or its create answered an error
# but happened) is destroyed once this old.
ORPHAN_AGE_S = 120.0
# A suspended-mode machine whose bot has not asked for its assignment by then is retired.
WARM_TIMEOUT_S = 300.0
# A recycled machine not back in the pool by then (its dispatcher died mid-way) is destroyed.
RECYCLE_TIMEOUT_S = 300.0


async def repair(
    m: PoolMachines, inventory: Sequence[MachineInfo], live_sessions: set[str], now: float
) -> int:
    """Drop rows whose machine is gone (a bot that crashed while pooled, a session over); offer
    machines suspended by a dispatcher that died before offering them; retire machines that
    never got warm; destroy machines claimed by a session that never got going (its dispatcher
    died between the claim and the start) and pool machines without a row; how many repairs
    were made."""
    listed = {machine.id: machine for machine in inventory}
    rows = {r.machine_id: r for r in await m.rows.all()}
    repairs = 0
    for row in rows.values():
        machine = listed.get(row.machine_id)
        age = now - row.updated_at
        if row.state == WARMING and machine is not None and machine.state == "suspended":
            # Suspended by a dispatcher that died before it could offer the machine.
            await m.rows.move(row.machine_id, AVAILABLE, from_states=(WARMING,))
        elif await _stopped_while_idle(m, row, machine):
            log.warning("pool machine %s stopped while idle: retiring it", row.machine_id)
            await m.retire(row)
        elif row.state == RECYCLING and age > RECYCLE_TIMEOUT_S:
            log.warning("pool machine %s was never recycled: destroying it", row.machine_id)
            await m.drop(ref_of(row))
        elif row.state == WARMING and age > WARM_TIMEOUT_S:
            log.warning("pool machine %s never got warm: retiring it", row.machine_id)
            await m.retire(row)
        elif row.machine_id not in listed and age > LIST_LAG_S:
            await m.rows.forget(row.machine_id)
        elif (
            row.state == CLAIMED
            and row.session_id not in live_sessions
            and age > max(LIST_LAG_S, m.settings.start_timeout_s)
        ):
            log.warning("pool machine %s was claimed by a dead start", row.machine_id)
            await m.drop(ref_of(row))
        else:
            continue
        repairs += 1
    for machine in inventory:
        young = machine.created_at is not None and now - machine.created_at < ORPHAN_AGE_S
        if machine.pool and not machine.session_id and machine.id not in rows and not young:
            log.warning("destroying pool machine %s that has no pool row", machine.id)
            await m.destroy(machine.ref)
            repairs += 1
    return repairs


async def _stopped_while_idle(
    m: PoolMachines, row: PoolMachine, machine: MachineInfo | None
) -> bool:
    """Running mode: whether an unclaimed machine that the inventory misses, or lists as not
    running, has stopped (asked of the machine itself: the list lags)."""
    if m.mode != "running" or row.state not in (WARMING, AVAILABLE):
        return False
    if machine is not None and machine.live:
        return False
    return await m.backend.exited(ref_of(row)) is not None
