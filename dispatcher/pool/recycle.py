"""POOL_RECYCLE: a pool machine whose session has ended goes back to the pool.

Once Fly reports the machine stopped it gets a new POOL_TOKEN through Fly's update (the previous
session's bot, which saw the old token, can no longer ask for an assignment) and is offered
again; its next start is a fresh boot of the image (Fly resets the root filesystem on a stop).
A machine that fails to stop or to take its new config is destroyed. What a recycled machine
shares with its previous session: docs/operations.md, "Recycling pool machines".
"""

from __future__ import annotations

import logging
from typing import Any

from dispatcher.auth import new_callback_token
from dispatcher.machines import MachineRef
from dispatcher.pool.machines import PoolMachines
from dispatcher.store import AVAILABLE, CLAIMED, RECYCLING, WARMING

log = logging.getLogger(__name__)

# How long past the stop's grace periods a recycled machine's stop is waited for.
RECYCLE_MARGIN_S = 15.0


class Recycling:
    """Takes back the machines of ended sessions (when POOL_RECYCLE is on)."""

    def __init__(self, machines: PoolMachines) -> None:
        self._m = machines

    @property
    def on(self) -> bool:
        """Whether machines whose session ended come back to the pool (POOL_RECYCLE)."""
        return self._m.settings.pool_recycle

    async def recycle(self, session_id: str, ref: MachineRef) -> bool:
        """Take back the machine of an ended session, if it is a pool machine claimed by it
        and POOL_RECYCLE is on: whether the pool took it (else the caller destroys it). One
        row update now: the old POOL_TOKEN stops working at once (its hash is replaced); the
        wait for the stop and the new config happen in the background, so the session's end
        waits for nothing."""
        if not self.on:
            return False
        rows = self._m.rows
        row = await rows.get(ref.id)
        if row is None or row.state != CLAIMED or row.session_id != session_id:
            return False
        token, token_hash = new_callback_token()
        moved = await rows.move(
            ref.id,
            RECYCLING,
            from_states=(CLAIMED,),
            token_hash=token_hash,
            session_id=None,
            body=None,
        )
        if not moved:
            return False
        version = ref.version or row.version
        target = MachineRef(ref.id, row.region or None, version, pooled=True)
        self._m.spawn(self._recycle(target, token))
        return True

    async def _recycle(self, ref: MachineRef, token: str) -> None:
        """Wait for the machine to stop, give it its new token (and the current image), and
        offer it again; destroy it if any of that fails."""
        m = self._m
        wait_s = 2 * m.settings.bot_stop_timeout_s + RECYCLE_MARGIN_S
        try:
            if await m.backend.wait_exit(ref, wait_s) is None:
                raise TimeoutError(f"not stopped within {wait_s:.0f} s")
            rotated = await m.backend.rotate(ref, m.env(token))
            fields: dict[str, Any] = {"version": rotated.version, "image": m.image}
            if m.mode == "stopped":
                moved = await m.rows.move(ref.id, AVAILABLE, from_states=(RECYCLING,), **fields)
            else:
                # Booted again ahead of a claim: its bot's first ask makes it warm.
                moved = await m.rows.move(ref.id, WARMING, from_states=(RECYCLING,), **fields)
                if moved:
                    await m.backend.start(rotated)
            if not moved:
                raise RuntimeError("its pool row moved on meanwhile")
        except Exception as exc:
            m.metrics.pool_recycle_failed()
            log.warning("pool machine %s could not be recycled (%s): destroying it", ref.id, exc)
            await m.drop(ref)
            return
        m.metrics.pool_recycled()
        log.info("pool machine %s recycled", ref.id)
