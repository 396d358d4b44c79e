"""What is left to do once a session's end is recorded: its machine destroyed (or, a pool
machine with POOL_RECYCLE, handed back to the pool) and its room's delete queued. A clean-up
that fails is recorded on the session (`cleanup_failed`) for the reconciler and for on-call."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from dispatcher.machines import MachineBackend, MachineRef
from dispatcher.store import Session, Store

if TYPE_CHECKING:  # the janitor records its own failures here
    from dispatcher.janitor import RoomJanitor

log = logging.getLogger(__name__)

# Takes back the machine of an ended session instead of its destroy (the warm pool's
# `Recycling.recycle`, with POOL_RECYCLE): whether it did.
Recycler = Callable[[str, MachineRef], Awaitable[bool]]


async def record_failure(store: Store, session_id: str, what: str, error: BaseException) -> None:
    """Record a clean-up step that failed (`what`: machine_destroy, room_delete, ...)."""
    await store.record(session_id, "cleanup_failed", {"what": what, "error": str(error)})


class Cleanup:
    """Destroys or recycles an ended session's machine and queues its room's delete."""

    def __init__(
        self,
        store: Store,
        machines: MachineBackend,
        janitor: RoomJanitor,
        recycler: Recycler | None = None,
    ) -> None:
        self._store = store
        self._machines = machines
        self._janitor = janitor
        self._recycler = recycler

    async def __call__(self, session: Session, ref: MachineRef | None) -> None:
        """Clean up after `session` (its end recorded), its machine `ref` if it had one."""
        if ref is not None and not await self._recycled(session, ref):
            try:
                await self._machines.destroy(ref)
            except Exception as exc:
                log.warning("machine_destroy failed: %s", exc)
                await record_failure(self._store, session.id, "machine_destroy", exc)
        self._janitor.submit(session)

    async def _recycled(self, session: Session, ref: MachineRef) -> bool:
        """Whether the pool took the machine back (a failure to ask means a destroy)."""
        if self._recycler is None:
            return False
        try:
            taken = await self._recycler(session.id, ref)
        except Exception as exc:
            log.warning("recycling the machine failed: %s", exc)
            return False
        if taken:
            await self._store.record(session.id, "machine_recycled", {"machine_id": ref.id})
        return taken
