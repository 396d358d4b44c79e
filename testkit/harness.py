"""A whole dispatcher on loopback: Fly and Daily emulators, the real app under uvicorn."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt

from dispatcher.app import create_app
from dispatcher.config import Settings
from dispatcher.telemetry import Tracing
from dispatcher.upstream import RetryPolicy
from testkit.fakes import TESTBOT_DIR
from testkit.fakes.daily import DailyEmulator
from testkit.fakes.fly import FlyEmulator
from testkit.net import bind_loopback, free_port, serve
from testkit.procs import DispatcherProcess
from testkit.waits import eventually

BOT_APP = "pipecat-bots"
BOT_IMAGE = "registry.fly.io/pipecat-bots:test-1"
JWT_SECRET = "test-jwt-secret-" + "x" * 32
FLY_TOKEN = "fm2_fly-secret-token-value"
DAILY_KEY = "daily-secret-api-key-" + "0123456789abcdef" * 3
FAST_RETRY = RetryPolicy(
    attempts=5, initial_backoff_s=0.05, max_backoff_s=0.2, max_retry_after_s=2.0, deadline_s=10
)
SECRETS = (FLY_TOKEN, DAILY_KEY, JWT_SECRET)


@dataclass
class Stack:
    """A running dispatcher with its emulators, and helpers to drive it."""

    url: str
    http: httpx.AsyncClient
    settings: Settings
    fly: FlyEmulator | None
    daily: DailyEmulator | None

    def headers(self, user: str = "user-1") -> dict[str, str]:
        """Authorization for a user."""
        token = jwt.encode(
            {"sub": user, "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256"
        )
        return {"Authorization": f"Bearer {token}"}

    async def start(
        self, body: Any = None, *, user: str = "user-1", **request: Any
    ) -> httpx.Response:
        """POST /start as a user, with `body` for the bot and other request fields."""
        payload = {"createDailyRoom": True, **request}
        if body is not None:
            payload["body"] = body
        return await self.http.post("/start", json=payload, headers=self.headers(user))

    async def session(self, sid: str, user: str = "user-1") -> dict[str, Any]:
        """GET /sessions/{id} as the owner."""
        response = await self.http.get(f"/sessions/{sid}", headers=self.headers(user))
        assert response.status_code == 200, response.text
        return dict(response.json())

    def bot_headers(self, sid: str) -> dict[str, str]:
        """Authorization as the session's bot: the callback token in its machine's env."""
        assert self.fly is not None
        (token,) = {
            m.config["env"]["BOT_CALLBACK_TOKEN"]
            for m in self.fly.machines.values()
            if m.config["env"].get("SESSION_ID") == sid
        }
        return {"Authorization": f"Bearer {token}"}

    async def bot_ended(self, sid: str, **body: Any) -> httpx.Response:
        """POST the session's `ended` callback as its bot, with `body`."""
        return await self.http.post(
            f"/internal/sessions/{sid}/ended", headers=self.bot_headers(sid), json=body
        )

    async def wait_state(
        self, sid: str, *states: str, timeout: float = 15.0, user: str = "user-1"
    ) -> dict[str, Any]:
        """Poll the session until it is in one of `states`."""
        session: dict[str, Any] = {}

        async def reached() -> bool:
            nonlocal session
            session = await self.session(sid, user)
            return session["state"] in states

        await eventually(reached, timeout=timeout, what=f"{sid} in {states}: {session}")
        return session


def dispatcher_env(
    *, fly_url: str | None, daily_url: str | None, dispatcher_url: str, db: str
) -> dict[str, str]:
    """The environment of a dispatcher wired to the emulators."""
    env = {
        "JWT_SECRET": JWT_SECRET,
        "DATABASE_URL": db,
        "DISPATCHER_URL": dispatcher_url,
        "READY_TIMEOUT_S": "10",
        "SESSION_MAX_DURATION_S": "300",
        "BOT_STOP_TIMEOUT_S": "2",
        # The follow's watch every second (Fly's default is 10 s): ends are noticed quickly.
        "FOLLOW_INTERVAL_S": "1",
        "DISPATCHER_NAME": "test-dispatcher",
        # Every test client is 127.0.0.1, and many tests start more than a minute's worth:
        # the rate limits are off here, and tests/test_rate_limits.py turns them on.
        "START_RATE_PER_USER": "0",
        "START_RATE_PER_IP": "0",
        # Local mode keeps a warm bot process by default: tests ask for one (POOL_SIZE) when
        # they are about the pool.
        "POOL_SIZE": "0",
    }
    if fly_url:
        env |= {
            "FLY_API_TOKEN": FLY_TOKEN,
            "FLY_API_BASE_URL": fly_url,
            "FLY_BOT_APP": BOT_APP,
            "BOT_IMAGE": BOT_IMAGE,
            "FLY_REGION": "iad,ord",
        }
    if daily_url:
        env |= {"DAILY_API_KEY": DAILY_KEY, "DAILY_API_URL": daily_url}
    return env


def dispatcher_process(
    urls: Emulators,
    log_dir: Path,
    *,
    db: str,
    env: Mapping[str, str] | None = None,
    log_level: str = "INFO",
) -> DispatcherProcess:
    """A dispatcher process (not started) on a free port, wired to served emulators: the
    environment of `dispatcher_env` with `env` over it."""
    port = free_port()
    values = dispatcher_env(
        fly_url=urls.fly_url,
        daily_url=urls.daily_url,
        dispatcher_url=f"http://127.0.0.1:{port}",
        db=db,
    )
    return DispatcherProcess(values | dict(env or {}), log_dir, port=port, log_level=log_level)


def fly_emulator(**kwargs: Any) -> FlyEmulator:
    """A Fly emulator whose bot app runs the test bot image."""
    options: dict[str, Any] = {
        "token": FLY_TOKEN,
        "apps": [BOT_APP],
        "images": {BOT_IMAGE: TESTBOT_DIR},
        "regions": {"iad": None, "ord": None},
    }
    return FlyEmulator(**(options | kwargs))


def daily_emulator(**kwargs: Any) -> DailyEmulator:
    """A Daily emulator for our API key."""
    return DailyEmulator(**({"api_key": DAILY_KEY} | kwargs))


@contextlib.asynccontextmanager
async def dispatcher_stack(
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    fly: FlyEmulator | None = None,
    daily: DailyEmulator | None = None,
    local: bool = False,
    retry: RetryPolicy = FAST_RETRY,
    upstream_timeout_s: float = 10.0,
    tracing: Tracing | None = None,
) -> AsyncIterator[Stack]:
    """Emulators and a dispatcher on loopback; `local=True` runs bots as local processes."""
    upstream = emulators(fly=None if local else (fly or fly_emulator()), daily=daily)
    async with contextlib.AsyncExitStack() as stack:
        urls = await stack.enter_async_context(upstream)
        yield await stack.enter_async_context(
            run_dispatcher(
                tmp_path,
                urls,
                env=env,
                local=local,
                retry=retry,
                upstream_timeout_s=upstream_timeout_s,
                tracing=tracing,
            )
        )


@dataclass
class Emulators:
    """Emulators being served, and their URLs."""

    fly: FlyEmulator | None
    daily: DailyEmulator
    fly_url: str | None
    daily_url: str


@contextlib.asynccontextmanager
async def emulators(
    *, fly: FlyEmulator | None, daily: DailyEmulator | None = None
) -> AsyncIterator[Emulators]:
    """Serve the emulators (Fly is optional) on loopback; on the way out, check that no request
    to Fly carried a field its OpenAPI document does not declare."""
    daily = daily or daily_emulator()
    async with contextlib.AsyncExitStack() as stack:
        fly_url = await stack.enter_async_context(serve(fly.app)) if fly else None
        daily_url = await stack.enter_async_context(serve(daily.app))
        yield Emulators(fly, daily, fly_url, daily_url)
    # Fly's spec is open, so the emulator accepts a misspelled field as Fly would: catch ours.
    assert fly is None or not fly.undeclared, f"fields Fly's spec does not know: {fly.undeclared}"


@contextlib.asynccontextmanager
async def run_dispatcher(
    tmp_path: Path,
    urls: Emulators,
    *,
    env: dict[str, str] | None = None,
    local: bool = False,
    retry: RetryPolicy = FAST_RETRY,
    upstream_timeout_s: float = 10.0,
    tracing: Tracing | None = None,
) -> AsyncIterator[Stack]:
    """A dispatcher under uvicorn on loopback, wired to served emulators (its DB in tmp_path)."""
    sock = bind_loopback()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    values = dispatcher_env(
        fly_url=urls.fly_url,
        daily_url=urls.daily_url,
        dispatcher_url=url,
        db=f"sqlite:///{tmp_path}/dispatcher.db",
    )
    if local:
        values["LOCAL_BOT_DIR"] = str(TESTBOT_DIR)
    settings = Settings.from_env(values | (env or {}))
    app = create_app(
        settings,
        retry=retry,
        upstream_timeout_s=upstream_timeout_s,
        tracing=tracing,
    )
    async with serve(app, sock=sock), httpx.AsyncClient(base_url=url, timeout=30) as http:
        yield Stack(url=url, http=http, settings=settings, fly=urls.fly, daily=urls.daily)
