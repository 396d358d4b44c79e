"""The store and the upstream clients an on-call command works with."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dispatcher.clients import upstreams
from dispatcher.config import Settings
from dispatcher.machines.fly_api import FlyAPI
from dispatcher.rooms.daily_api import DailyAPI
from dispatcher.store import Store
from dispatcher.upstream import RetryPolicy

RETRY = RetryPolicy(attempts=3, deadline_s=10.0)


@dataclass
class Clients:
    """The store, and the Fly and Daily APIs when the settings configure them."""

    settings: Settings
    store: Store
    fly: FlyAPI | None
    daily: DailyAPI | None


@contextlib.asynccontextmanager
async def clients(settings: Settings) -> AsyncIterator[Clients]:
    """The store and the upstream clients `settings` configure, closed on exit."""
    store = await Store.open(settings.database_url)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(store.close)
        apis = await stack.enter_async_context(upstreams(settings, RETRY, timeout_s=10))
        yield Clients(settings, store, apis.fly, apis.daily)
