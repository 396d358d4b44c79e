"""What every part of the warm pool does to a pool machine and its row."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from dispatcher.aio import cancel_and_wait
from dispatcher.config import Settings
from dispatcher.machines import MachineRef, PoolBackend
from dispatcher.metrics import Metrics
from dispatcher.store import AVAILABLE, RETIRED, WARMING, PoolMachine, PoolRows

log = logging.getLogger(__name__)


def ref_of(row: PoolMachine, *, pooled: bool = False) -> MachineRef:
    """The machine a pool row stands for."""
    return MachineRef(row.machine_id, row.region or None, row.version, pooled=pooled)


class PoolMachines:
    """The pool's rows and machine backend, with the actions taken on both (and the background
    tasks that take them)."""

    def __init__(
        self,
        rows: PoolRows,
        backend: PoolBackend,
        settings: Settings,
        metrics: Metrics,
        *,
        dispatcher_url: str,
        transports: Sequence[str],
    ) -> None:
        self.rows = rows
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.dispatcher_url = dispatcher_url
        self.transports = tuple(transports)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def image(self) -> str:
        """What pool machines must run: Fly's BOT_IMAGE, or the local bot code's hash."""
        return self.backend.pool_image()

    @property
    def mode(self) -> str:
        """`stopped`, `suspended` or `running` (POOL_MODE)."""
        return self.settings.pool_mode

    def env(self, token: str) -> dict[str, str]:
        """A pool machine's env: whom to ask for its assignment, with which token."""
        return {
            "DISPATCHER_URL": self.dispatcher_url,
            "POOL_TOKEN": token,
            "BOT_TRANSPORT": self.transports[0],
            # What the bot preloads: every transport its session may use.
            "POOL_TRANSPORTS": ",".join(self.transports),
        }

    async def retire(self, row: PoolMachine) -> None:
        """Destroy an unclaimed machine (another image, dead, or no longer wanted)."""
        if await self.rows.move(row.machine_id, RETIRED, from_states=(WARMING, AVAILABLE)):
            log.info("retiring pool machine %s (image %s)", row.machine_id, row.image)
            await self.destroy(ref_of(row))
            await self.rows.forget(row.machine_id)

    async def drop(self, ref: MachineRef) -> None:
        """Forget a machine's row, then destroy it (one the pool will not offer again)."""
        await self.rows.forget(ref.id)
        await self.destroy(ref)

    async def destroy(self, ref: MachineRef) -> None:
        """Destroy a machine; a failure is logged: still labelled as a pool machine, a later
        pass finds it without a row."""
        try:
            await self.backend.destroy(ref)
        except Exception as exc:
            log.warning("pool machine %s destroy failed: %s", ref.id, exc)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background (cancelled by `aclose`)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Cancel background work (suspends and destroys in flight: the reconciler redoes)."""
        await cancel_and_wait(*self._tasks)
