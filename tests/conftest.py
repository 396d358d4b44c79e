"""Fixtures shared by the test suite: databases, settings, secrets, an OTLP trace collector."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from dispatcher.config import Secret
from dispatcher.rooms.daily import DailyRooms
from dispatcher.rooms.daily_api import DailyAPI
from dispatcher.store import Store, engine_url
from dispatcher.upstream import RetryPolicy
from testkit.databases import PG_URL, pg_problem
from testkit.fakes.daily import DailyEmulator
from testkit.fakes.recorder import CallbackRecorder
from testkit.net import serve
from testkit.otlp_collector import OtlpCollector

if TYPE_CHECKING:
    from testkit.bot_process import BotProcess


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Store]:
    """A fresh store on SQLite (a temp file) or PostgreSQL (a schema of its own)."""
    if request.param == "sqlite":
        db = await Store.open(f"sqlite:///{tmp_path}/test.db")
        yield db
        await db.close()
        return
    async for db in _pg_store():
        yield db


async def _require_pg() -> None:
    """Skip when PostgreSQL is unreachable; fail instead under CI."""
    problem = await pg_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG_URL} is required in CI: {problem}")
        pytest.skip(f"PostgreSQL at {PG_URL} unreachable: {problem}")


async def _pg_store() -> AsyncIterator[Store]:
    await _require_pg()
    schema = "t_" + secrets.token_hex(6)
    db = await Store.open(PG_URL, schema=schema)
    try:
        yield db
    finally:
        await db.close()
        engine = create_async_engine(engine_url(PG_URL))
        async with engine.begin() as conn:
            await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await engine.dispose()


@pytest.fixture
async def pg_store() -> AsyncIterator[Store]:
    """A fresh PostgreSQL store only."""
    async for db in _pg_store():
        yield db


@pytest.fixture
async def pg_database_url() -> AsyncIterator[str]:
    """The DATABASE_URL of a freshly created PostgreSQL database (`t_<hex>`), dropped after."""
    await _require_pg()
    name = "t_" + secrets.token_hex(6)
    # CREATE/DROP DATABASE cannot run inside a transaction
    engine = create_async_engine(engine_url(PG_URL), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(PG_URL)._replace(path=f"/{name}"))
        finally:
            async with engine.connect() as conn:
                await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await engine.dispose()


@pytest.fixture
async def recorder() -> AsyncIterator[CallbackRecorder]:
    """A callback recorder served on loopback."""
    rec = CallbackRecorder()
    async with serve(rec.app()) as url:
        rec.url = url
        yield rec


@pytest.fixture
def otlp_collector() -> Iterator[OtlpCollector]:
    """An OTLP/HTTP trace collector on loopback: point OTEL_EXPORTER_OTLP_ENDPOINT at
    `.endpoint`, then read `.spans()` or `await .wait_for(predicate)`."""
    with OtlpCollector() as collector:
        yield collector


@pytest.fixture
async def bots() -> AsyncIterator[list[BotProcess]]:
    """Real bot runtime processes (testkit/bot_process.py's `start_bot`) started by a test; killed
    if a test leaves one running."""
    started: list[BotProcess] = []
    yield started
    for bot in started:
        await bot.http.aclose()
        if bot.proc.returncode is None:
            bot.proc.kill()
            await bot.proc.wait()


# Our Daily room backend against Daily's emulator (its rate limits on), with quick retries.
DAILY_TEST_KEY = "k" * 64
DAILY_RETRIES = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


@pytest.fixture
async def daily_served() -> AsyncIterator[tuple[DailyEmulator, DailyRooms, DailyAPI]]:
    """Daily's emulator served on loopback, our room backend for it, and its API client."""
    emu = DailyEmulator(api_key=DAILY_TEST_KEY)
    async with serve(emu.app) as url, DailyAPI.client(url, DAILY_TEST_KEY) as http:
        api = DailyAPI(http, DAILY_RETRIES)
        rooms = DailyRooms(api, Secret(DAILY_TEST_KEY), DAILY_RETRIES)
        await rooms.open()
        yield emu, rooms, api


@pytest.fixture
def daily_rooms(
    daily_served: tuple[DailyEmulator, DailyRooms, DailyAPI],
) -> tuple[DailyEmulator, DailyRooms]:
    """The emulator and the room backend of `daily_served`."""
    return daily_served[0], daily_served[1]
