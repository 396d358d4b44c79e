"""The warm pool's bot side: boot, load everything, then learn the session from the dispatcher.

A pooled machine is created before any session: its env has DISPATCHER_URL, POOL_TOKEN (this
machine's secret), BOT_TRANSPORT and Fly's FLY_MACHINE_ID (a local worker gets its process's
id there), and no SESSION_ID; POOL_TRANSPORTS, when set, lists every transport its session may
use (a local worker serves webrtc or Daily). The runtime imports Pipecat and those
transports, then the team's module (its module-level work runs, as Pipecat Cloud's docs advise
for loading models), loads Silero's model and builds its trace exporters
(`bot_runtime.preload`), then long-polls `GET /internal/machines/{id}/assignment` until the
dispatcher answers with a session: the contract's variables (`env`) and command line (`args`) a
cold bot would have been started with. `bot_runtime.__main__` then runs that session as if
started cold, with the machine's env overlaid with the assignment's: only joining the room is
left.

Each poll asks the dispatcher to hold it `POLL_WAIT_S` and gives up `POLL_MARGIN_S` later, on
a fresh connection. A machine of POOL_MODE=suspended is frozen with its poll outstanding, and
the connection may be dead when it wakes: a watch ticking every `WATCH_TICK_S` notices that
it was paused (a tick late by over `PAUSE_S` on the monotonic or the wall clock), abandons
the poll and asks again at once. The same watch ends the wait on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from loguru import logger

from bot_runtime.contract import BOT_TRANSPORT, DAILY, DISPATCHER_URL, SESSION_ID
from bot_runtime.entrypoint import EntryPointSpec
from bot_runtime.outcome import EXIT_CONFIG, EXIT_ERROR, EXIT_OK
from bot_runtime.preload import TRANSPORT_MODULES, Preloaded, preload
from bot_runtime.signals import StopSignals

POOL_TOKEN = "POOL_TOKEN"  # noqa: S105 (a variable name, not a secret)
POOL_TRANSPORTS = "POOL_TRANSPORTS"
FLY_MACHINE_ID = "FLY_MACHINE_ID"
# The code of the 410 that retires a machine (an image change, a smaller pool).
RETIRED_CODE = "pool-machine-retired"

POLL_WAIT_S = 5
POLL_MARGIN_S = 2.0
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 2.0
WATCH_TICK_S = 0.25
PAUSE_S = 1.0

STOPPED = "stopped"
PAUSED = "paused"

T = TypeVar("T")


def is_pooled(environ: Mapping[str, str]) -> bool:
    """Whether `environ` is a pooled machine's: a POOL_TOKEN and no SESSION_ID."""
    return not environ.get(SESSION_ID, "").strip() and bool(environ.get(POOL_TOKEN, "").strip())


def _required(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise ValueError(f"missing environment variable {name}")
    return value


@dataclass(frozen=True, kw_only=True)
class PoolEnv:
    """A pooled machine's own environment: who it is, whom it asks; the token out of `repr`."""

    dispatcher_url: str
    machine_id: str
    pool_token: str = field(repr=False)
    transport: str = DAILY
    # Every transport to preload (POOL_TRANSPORTS; unset: `transport` alone).
    transports: tuple[str, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> PoolEnv:
        """Read it; a missing variable raises ValueError naming it."""
        transport = environ.get(BOT_TRANSPORT, "").strip() or DAILY
        listed = [t.strip() for t in environ.get(POOL_TRANSPORTS, "").split(",") if t.strip()]
        unknown = [t for t in listed if t not in TRANSPORT_MODULES]
        if unknown:
            raise ValueError(f"{POOL_TRANSPORTS} has an unknown transport: {unknown[0]}")
        return cls(
            dispatcher_url=_required(environ, DISPATCHER_URL).rstrip("/"),
            machine_id=_required(environ, FLY_MACHINE_ID),
            pool_token=_required(environ, POOL_TOKEN),
            transport=transport,
            transports=tuple(dict.fromkeys(listed or [transport])),
        )


@dataclass(frozen=True)
class Assignment:
    """A session for this machine: the contract's variables and the bot's command line."""

    env: Mapping[str, str] = field(repr=False)
    args: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, body: Any) -> Assignment:
        """Parse a 200's body; ValueError if it is not `{"env": {str: str}, "args": [str]}`."""
        env = body.get("env") if isinstance(body, dict) else None
        args = body.get("args", []) if isinstance(body, dict) else None
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError("`env` must be an object of strings")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ValueError("`args` must be a list of strings")
        return cls(env, tuple(args))

    def environ(self, machine: Mapping[str, str]) -> dict[str, str]:
        """The session's environment: the machine's, overlaid with the assignment's."""
        return {**machine, **self.env}


class AssignmentError(Exception):
    """An answer that is no assignment; `retryable` says whether asking again may help.

    A 410 `retired` the machine; any other final answer (401, 404, a malformed 200) means
    the machine is misconfigured. The message never carries the request's headers.
    """

    def __init__(
        self, status: int | None, *, retryable: bool, code: str | None = None, detail: str = ""
    ) -> None:
        self.status = status
        self.retryable = retryable
        self.code = code
        what = f"status {status}" if status is not None else "no answer"
        why = ": ".join(part for part in (code, detail) if part)
        super().__init__(f"assignment: {what}" + (f" ({why})" if why else ""))

    @property
    def retired(self) -> bool:
        """Whether the dispatcher retired this machine (exit 0, no session)."""
        return self.status == 410


class AssignmentClient:
    """`GET /internal/machines/{id}/assignment`: one long poll per `poll()`."""

    def __init__(
        self,
        pool: PoolEnv,
        http: httpx.AsyncClient,
        *,
        wait_s: int = POLL_WAIT_S,
        margin_s: float = POLL_MARGIN_S,
    ) -> None:
        self._pool = pool
        self._http = http
        self._wait_s = wait_s
        self._timeout_s = wait_s + margin_s

    def url(self) -> str:
        """This machine's assignment URL."""
        machine = quote(self._pool.machine_id, safe="")
        return f"{self._pool.dispatcher_url}/internal/machines/{machine}/assignment"

    async def poll(self) -> Assignment | None:
        """Ask once, letting the dispatcher hold the request `wait_s`; None: not assigned yet."""
        headers = {"Authorization": f"Bearer {self._pool.pool_token}"}
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.get(
                    self.url(),
                    params={"wait": self._wait_s},
                    headers=headers,
                    timeout=self._timeout_s,
                )
        except (httpx.TransportError, TimeoutError) as exc:
            raise AssignmentError(None, retryable=True, detail=type(exc).__name__) from exc
        status = response.status_code
        if status == 204:
            return None
        if status == 200:
            try:
                return Assignment.from_json(response.json())
            except ValueError as exc:
                raise AssignmentError(200, retryable=False, detail=f"malformed: {exc}") from exc
        code, detail = _error_fields(response)
        retryable = status in (408, 429) or status >= 500
        raise AssignmentError(status, retryable=retryable, code=code, detail=detail)


def _error_fields(response: httpx.Response) -> tuple[str | None, str]:
    """The `code` and `detail` of a JSON error body, if it is one."""
    try:
        body = response.json()
    except ValueError:
        return None, ""
    if not isinstance(body, dict):
        return None, ""
    code, detail = body.get("code"), body.get("detail")
    return (code if isinstance(code, str) else None), (detail if isinstance(detail, str) else "")


class AssignmentWaiter:
    """Asks until the dispatcher assigns a session, through errors, pauses and restarts.

    204s are asked again at once; network errors, 408, 429 and 5xx after a capped
    exponential backoff (jittered); a pause (see the module's docstring) abandons the poll
    and asks again at once. A stop request ends the wait with None; a final answer raises.
    """

    def __init__(
        self,
        client: AssignmentClient,
        stop_requested: Callable[[], str | None],
        *,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        tick_s: float = WATCH_TICK_S,
        pause_s: float = PAUSE_S,
    ) -> None:
        self._client = client
        self._stop_requested = stop_requested
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._tick_s = tick_s
        self._pause_s = pause_s

    async def wait(self) -> Assignment | None:
        """The assignment, or None if a stop was requested first."""
        failures = 0
        while not self._stop_requested():
            poll = asyncio.ensure_future(self._client.poll())
            interrupted = await self._until(poll)
            if interrupted == STOPPED:
                return None
            if interrupted == PAUSED:
                failures = 0
                continue
            try:
                assignment = poll.result()
            except AssignmentError as exc:
                if not exc.retryable:
                    raise
                failures += 1
                delay = self._backoff(failures)
                logger.info(f"{exc}; asking again in {delay:.1f} s")
                if await self._until(asyncio.ensure_future(asyncio.sleep(delay))) == STOPPED:
                    return None
                continue
            if assignment is not None:
                return assignment
            failures = 0
        return None

    def _backoff(self, failures: int) -> float:
        delay = min(self._backoff_max_s, self._backoff_initial_s * 2 ** (failures - 1))
        return random.uniform(delay / 2, delay)

    async def _until(self, work: asyncio.Future[T]) -> str | None:
        """Wait for `work`; None once it is done, else why it was abandoned (and cancelled)."""
        watch = asyncio.ensure_future(self._watch())
        both: tuple[asyncio.Future[Any], ...] = (work, watch)
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pending = [task for task in both if not task.done()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if work.done() and not work.cancelled():
            return None
        return watch.result()

    async def _watch(self) -> str:
        """Tick until a stop is requested (STOPPED) or a tick comes late (PAUSED)."""
        monotonic, wall = time.monotonic(), time.time()
        while True:
            await asyncio.sleep(self._tick_s)
            if self._stop_requested():
                return STOPPED
            now_monotonic, now_wall = time.monotonic(), time.time()
            late_s = max(now_monotonic - monotonic, now_wall - wall) - self._tick_s
            if late_s > self._pause_s:
                logger.info(f"Paused for {late_s:.1f} s: asking for the assignment again")
                return PAUSED
            monotonic, wall = now_monotonic, now_wall


@dataclass(frozen=True)
class Assigned:
    """A pooled bot's session: its environment and command line, and what was preloaded."""

    environ: dict[str, str] = field(repr=False)
    args: tuple[str, ...]
    preloaded: Preloaded


def boot(environ: Mapping[str, str], spec: EntryPointSpec) -> tuple[PoolEnv, Preloaded] | int:
    """Read the machine's own variables and preload; the exit code if that failed.

    Exit codes: 1 preloading failed, 2 a missing variable. The team's module is imported
    here, before the runtime takes over the logs (see `bot_runtime.logs`).
    """
    try:
        pool = PoolEnv.from_environ(environ)
    except ValueError as exc:
        logger.error(f"Pooled bot misconfigured: {exc}")
        return EXIT_CONFIG
    try:
        return pool, preload(environ, pool.transports or pool.transport, spec)
    except Exception:
        logger.exception("Preloading failed")
        return EXIT_ERROR


def wait_for_session(
    pool: PoolEnv, preloaded: Preloaded, *, environ: Mapping[str, str], signals: StopSignals
) -> Assigned | int:
    """Wait for the assignment; the session, or the exit code if none came.

    Exit codes: 0 retired or stopped, 2 refused (a bad token, an unknown machine). No
    callback in any case: there is no session.
    """
    logger.info(preloaded.describe())
    try:
        assignment = asyncio.run(_wait(pool, lambda: signals.reason))
    except AssignmentError as exc:
        if exc.retired:
            logger.info(f"Retired by the dispatcher ({exc}): exiting")
            return EXIT_OK
        logger.error(f"Pooled bot misconfigured ({exc}): exiting")
        return EXIT_CONFIG
    if assignment is None:
        logger.info(f"Stopped ({signals.reason}) before any assignment: exiting")
        return EXIT_OK
    return Assigned(assignment.environ(environ), assignment.args, preloaded)


async def _wait(pool: PoolEnv, stop_requested: Callable[[], str | None]) -> Assignment | None:
    logger.info(f"Asking for an assignment at {pool.dispatcher_url}")
    # No kept-alive connections: one left over from before a pause may be dead.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as http:
        return await AssignmentWaiter(AssignmentClient(pool, http), stop_requested).wait()
