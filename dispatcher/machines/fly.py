"""Bots on Fly Machines: one detached machine per session, created safely, followed to its exit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from dispatcher.config import Settings
from dispatcher.errors import UpstreamError
from dispatcher.machines import BOT_COMMAND, BotSpec, MachineExit, MachineInfo, MachineRef
from dispatcher.machines.fly_api import (
    LIST_PAGE_SIZE,
    MAX_WAIT_S,
    FlyAPI,
    Machine,
    latest_exit,
)
from dispatcher.pacing import Pacer
from dispatcher.upstream import RetryPolicy

log = logging.getLogger(__name__)

GONE_STATES = frozenset({"stopped", "destroyed", "destroying", "failed", "replaced", "migrated"})
INSUFFICIENT_CAPACITY = "insufficient_capacity"
# The metadata key that marks a warm pool machine (it has no session_id until claimed).
POOL_LABEL = "pool"
NAME_TAKEN = "name_taken"
# How long a follower tries to read a stopped machine's exit through an outage.
EXIT_PATIENCE_S = 60.0
# Every list call of this instance (the leader's watch and reconciler, a readiness check, the
# lookups after an ambiguous create) is paced a little under Fly's documented limit for list,
# "1 request, per second, per action ... burst up to 3" per app (docs/reference/fly-machines.md
# §6), the way creates are (CREATE_PACING_SLACK in dispatcher/app.py).
LIST_RATE = 1.0 / 1.1
LIST_BURST = 3
# The watch's pages (`live_ids`) take at most half of that: a page every 2 s at most, whatever
# FOLLOW_INTERVAL_S, leaving the rest of Fly's list budget to the reconciler, readiness checks,
# on-call commands and an operator's `fly machines list`, which share it.
WATCH_LIST_RATE = 0.5
# A watch reads at most this many pages (of LIST_PAGE_SIZE machines) a pass.
MAX_LIST_PAGES = 100


class FlyMachines:
    """The machine backend on the Fly Machines API of the bot app."""

    name = "fly"
    bots_outlive_dispatcher = True

    def __init__(
        self,
        api: FlyAPI,
        settings: Settings,
        retry: RetryPolicy,
        pacer: Pacer | None = None,
        *,
        waits: FlyAPI | None = None,
        page_size: int = LIST_PAGE_SIZE,
    ) -> None:
        self._api = api
        # `wait`s hold their connection while they last: on a client of their own, so that
        # they never take the kept-alive connections creates and stops find free.
        self._waits = waits or api
        self._settings = settings
        self._retry = retry
        # Creates are paced: the caller takes the first attempt's turn (bounded, so that a
        # full queue is refused before anything is made); retries here wait for theirs.
        self._pacer = pacer
        self._lists = Pacer(LIST_RATE, LIST_BURST, what="machine lists")
        self._watch_pages = Pacer(WATCH_LIST_RATE, 1, what="watch lists")
        self._page_size = page_size

    def machine_config(self, spec: BotSpec) -> dict[str, Any]:
        """The machine config for a session: the bot contract, pinned image, no services."""
        metadata = {
            "session_id": spec.session_id,
            "dispatcher": self._settings.dispatcher_name,
            "user": spec.user[:64],
        }
        return self._config(spec.cmd, spec.env, metadata)

    def pool_config(self, env: dict[str, str]) -> dict[str, Any]:
        """The machine config of a warm pool machine: the bot with no session yet."""
        metadata = {"dispatcher": self._settings.dispatcher_name, POOL_LABEL: "true"}
        config = self._config(BOT_COMMAND, env, metadata)
        # A machine to recycle must outlive its bot's exit: stopped, not destroyed.
        config["auto_destroy"] = not self._settings.pool_recycle
        return config

    def _config(
        self, cmd: Sequence[str], env: dict[str, str], metadata: dict[str, str]
    ) -> dict[str, Any]:
        s = self._settings
        return {
            "image": s.bot_image,
            "init": {"cmd": list(cmd)},
            "env": dict(env),
            "guest": {
                "cpu_kind": s.bot_cpu_kind,
                "cpus": s.bot_cpus,
                "memory_mb": s.bot_memory_mb,
            },
            "restart": {"policy": "no"},
            "auto_destroy": True,
            "stop_config": {"signal": "SIGTERM", "timeout": f"{s.bot_stop_timeout_s}s"},
            "metadata": metadata,
        }

    async def create_pooled(
        self, env: dict[str, str], region: str | None, *, launch: bool
    ) -> MachineRef:
        """Make a pool machine: created only (`skip_launch`), or booted (`launch`). One
        attempt: the pool tries again on its next pass."""
        body: dict[str, Any] = {"config": self.pool_config(env), "skip_launch": not launch}
        if region:
            body["region"] = region
        machine = await self._api.create(body)
        return MachineRef(machine.id, machine.region or region, machine.instance_id)

    def pool_image(self) -> str:
        """The image pool machines must run: the current BOT_IMAGE."""
        return self._settings.bot_image or ""

    def pool_dead(self, ref: MachineRef) -> bool:
        """Never known without a call: the reconciler's inventory finds dead pool machines."""
        return False

    async def start(self, ref: MachineRef) -> str | None:
        """Start (or resume) a pool machine; with POOL_RECYCLE, the version (instance_id) it
        runs now, read back with one GET (Fly's start answers `previous_state` only): the
        follow waits for the stop of that version, as the machine is not destroyed when its
        bot exits. None: not asked (the version the pool knows stands)."""
        await self._api.start(ref.id)
        if not self._settings.pool_recycle:
            return None
        try:
            machine = await self._api.get(ref.id)
        except UpstreamError as exc:
            log.warning("pool machine %s started; its version unread: %s", ref.id, exc)
            return None
        return machine.instance_id if machine is not None else None

    async def rotate(self, ref: MachineRef, env: dict[str, str]) -> MachineRef:
        """Give a stopped pool machine a new env (a new POOL_TOKEN) and the current image, and
        leave it stopped (Fly's update with `skip_launch`): its next start boots that config.
        The machine's new version. One attempt."""
        body: dict[str, Any] = {"config": self.pool_config(env), "skip_launch": True}
        machine = await self._api.update(ref.id, body)
        return MachineRef(machine.id, machine.region or ref.region, machine.instance_id, True)

    async def suspend(self, ref: MachineRef, timeout_s: int) -> bool:
        """Suspend a started machine and wait until it is; False if it was not in time."""
        await self._api.suspend(ref.id)
        return await self._waits.wait(ref.id, "suspended", timeout_s=timeout_s)

    async def launch(self, spec: BotSpec) -> MachineRef:
        """Create the session's machine in the first region with capacity."""
        regions: tuple[str | None, ...] = spec.regions or (None,)
        config = self.machine_config(spec)
        for index, region in enumerate(regions):
            body: dict[str, Any] = {"name": spec.session_id, "config": config}
            if region:
                body["region"] = region
            try:
                machine = await self._create_once(spec.session_id, body)
            except UpstreamError as exc:
                if exc.upstream_code == INSUFFICIENT_CAPACITY and index + 1 < len(regions):
                    log.warning("no capacity in %s, trying %s", region, regions[index + 1])
                    continue
                raise
            return MachineRef(machine.id, machine.region or region, machine.instance_id)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _create_once(self, session_id: str, body: dict[str, Any]) -> Machine:
        """Create with retries, never twice: after an ambiguous failure, adopt what exists.

        The machine's name is the session id, unique in the app, so a create that Fly
        already performed answers name_taken instead of making a second machine.
        """
        maybe_created = False
        async for attempt in self._retry.retrying():
            with attempt:
                if maybe_created and (found := await self._find(session_id)):
                    return found
                if attempt.retry_state.attempt_number > 1 and self._pacer is not None:
                    await self._pacer.acquire(bounded=False)
                try:
                    return await self._api.create(body, attempt=attempt.retry_state.attempt_number)
                except UpstreamError as exc:
                    if exc.upstream_code == NAME_TAKEN and (found := await self._find(session_id)):
                        return found
                    maybe_created = maybe_created or exc.ambiguous
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _find(self, session_id: str) -> Machine | None:
        """The session's machine if a create already made it, a destroyed one included: a bot
        that exited at once (auto_destroy) is adopted, as exited, rather than given a second."""
        await self._lists.acquire(bounded=False)
        machines = await self._api.list_machines(
            metadata={"session_id": session_id}, include_deleted=True
        )
        if not machines:
            return None
        found = min(machines, key=lambda m: m.state in ("destroyed", "destroying"))
        log.info("adopted machine %s (%s) after an ambiguous create", found.id, found.state)
        return found

    async def cleanup(self, session_id: str) -> None:
        """Destroy any machine labelled with the session (after an ambiguous launch failure)."""
        await self._lists.acquire(bounded=False)
        for machine in await self._api.list_machines(metadata={"session_id": session_id}):
            if machine.state not in ("destroyed", "destroying"):
                await self._api.destroy(machine.id)

    async def wait_exit(self, ref: MachineRef, timeout_s: float) -> MachineExit | None:
        """Wait in long polls (60 s at most each) until the machine stops or `timeout_s`
        passes. The follow waits so only for a session that is ending, for at most the stop's
        grace period (dispatcher/supervisor.py).

        An upstream failure a retry may cure (5xx, 429, timeouts, dropped connections) is
        waited out, backing off, for as long as `timeout_s` allows: an outage of Fly's API,
        however long, never ends the watch.
        """
        deadline = time.monotonic() + timeout_s
        failures = 0
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                if await self._stopped(ref, remaining):
                    return await self._exit_of(ref, patience_s=deadline - time.monotonic())
                failures = 0
            except UpstreamError as exc:
                if not exc.retryable:
                    raise
                failures += 1
                pause = self._retry.backoff(failures)
                log.warning("following machine %s: %s; again in %.1f s", ref.id, exc, pause)
                await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        return None

    async def _stopped(self, ref: MachineRef, remaining: float) -> bool:
        """One long poll for the machine's stop, then a look at it: whether it is gone."""
        try:
            if await self._waits.wait(
                ref.id,
                "stopped",
                timeout_s=int(min(MAX_WAIT_S, max(1, remaining))),
                version=ref.version,
            ):
                return True
        except UpstreamError as exc:
            if exc.status == 404:
                return True
            if exc.status != 400:
                raise
            # A wait Fly refuses (a version it no longer knows): look at the machine instead,
            # at most once a second.
            await asyncio.sleep(min(1.0, remaining))
        machine = await self._api.get(ref.id)
        return machine is None or machine.state in GONE_STATES

    async def live_ids(self) -> set[str]:
        """The ids of this dispatcher's machines that have not stopped: the pages of one paced
        list call (`summary`: ids and states only; LIST_PAGE_SIZE machines a page, so one page
        up to a thousand machines; a page every 2 s at most, WATCH_LIST_RATE), filtered by
        `metadata.dispatcher`.

        Defensive where Fly's document says little: a page without a `fly-next-cursor` is the
        last, and so is one that repeats a cursor or brings no machine not seen already; at
        most MAX_LIST_PAGES are read. Like every list it may lag: a machine made moments ago
        may be missing (the caller asks such a machine itself)."""
        live: set[str] = set()
        seen: set[str] = set()
        cursors: set[str] = set()
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            await self._watch_pages.acquire(bounded=False)
            await self._lists.acquire(bounded=False)
            page, cursor = await self._api.list_page(
                metadata={"dispatcher": self._settings.dispatcher_name},
                summary=True,
                limit=self._page_size,
                cursor=cursor,
            )
            fresh = [m for m in page if m.id not in seen]
            seen.update(m.id for m in fresh)
            live.update(m.id for m in fresh if m.state not in GONE_STATES)
            if not cursor or not fresh or cursor in cursors:
                return live
            cursors.add(cursor)
        log.warning("the machine list has more than %d pages: read those only", MAX_LIST_PAGES)
        return live

    async def inventory(self) -> list[MachineInfo]:
        """The bot app's machines labelled with this dispatcher (one list call)."""
        await self._lists.acquire(bounded=False)
        machines = await self._api.list_machines(
            metadata={"dispatcher": self._settings.dispatcher_name}
        )
        return [
            MachineInfo(
                id=m.id,
                session_id=m.metadata.get("session_id"),
                pool=m.metadata.get(POOL_LABEL) == "true",
                state=m.state,
                live=m.state not in GONE_STATES,
                region=m.region,
                version=m.instance_id,
                created_at=m.created_at,
            )
            for m in machines
            if m.state not in ("destroyed", "destroying")
        ]

    async def exited(self, ref: MachineRef) -> MachineExit | None:
        """None while the machine runs; its exit (from its events) once it stopped or is gone."""
        machine = await self._api.get(ref.id)
        if machine is not None and machine.state not in GONE_STATES:
            return None
        return await self._exit_of(ref)

    async def _exit_of(self, ref: MachineRef, *, patience_s: float = 0.0) -> MachineExit:
        """How the machine exited, from its events (they may be gone with the machine); a
        failure a retry may cure is tried again for up to `patience_s` (at most a minute)."""
        deadline = time.monotonic() + min(patience_s, EXIT_PATIENCE_S)
        failures = 0
        while True:
            try:
                return latest_exit(await self._api.events(ref.id)) or MachineExit()
            except UpstreamError as exc:
                failures += 1
                pause = self._retry.backoff(failures)
                if not exc.retryable or time.monotonic() + pause > deadline:
                    return MachineExit()
                await asyncio.sleep(pause)

    async def stop(self, ref: MachineRef, grace_s: int) -> None:
        """Fly's stop: SIGTERM, then SIGKILL after the grace period; gone counts as stopped."""
        try:
            await self._api.stop(ref.id, signal="SIGTERM", timeout_s=grace_s)
        except UpstreamError as exc:
            # Fly refuses (412) to stop a destroyed machine: so it meets a retried stop whose
            # first try took effect, once the bot has exited and its machine auto-destroyed.
            if exc.status != 412:
                raise
            machine = await self._api.get(ref.id)
            if machine is not None and machine.state not in GONE_STATES:
                raise

    async def destroy(self, ref: MachineRef) -> None:
        """Force-destroy the machine (404 counts as done)."""
        await self._api.destroy(ref.id)

    def address(self, ref: MachineRef) -> str | None:
        """None: bots on Fly are joined through Daily, never proxied to."""
        return None

    async def check(self) -> None:
        """Raise if the bot app's machines cannot be listed."""
        await self._lists.acquire(bounded=False)
        await self._api.list_machines(metadata={"dispatcher": self._settings.dispatcher_name})

    def kill_all(self) -> None:
        """Nothing: machines outlive the dispatcher by design."""

    async def aclose(self) -> None:
        """Nothing to release: machines outlive the dispatcher by design."""
