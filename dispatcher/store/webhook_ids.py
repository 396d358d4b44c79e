"""The ids of the Daily webhook events handled, so that a replay has no second effect."""

from __future__ import annotations

import time

from dispatcher.store.database import Database
from dispatcher.store.schema import upsert, webhook_events


class WebhookIds(Database):
    """Webhook event ids, claimed once each."""

    async def claim_webhook(self, event_id: str, *, at: float | None = None) -> bool:
        """Record a webhook event id as handled: False if it already was (a replay)."""
        async with self.write() as conn:
            insert = upsert(self.dialect, webhook_events).values(
                id=event_id, received_at=time.time() if at is None else at
            )
            result = await conn.execute(insert.on_conflict_do_nothing())
        return result.rowcount == 1

    async def release_webhook(self, event_id: str) -> None:
        """Forget an event id whose handling failed, so that its re-delivery is handled."""
        async with self.write() as conn:
            await conn.execute(webhook_events.delete().where(webhook_events.c.id == event_id))

    async def purge_webhooks(self, *, received_before: float) -> int:
        """Forget webhook event ids older than a time; how many were removed."""
        async with self.write() as conn:
            result = await conn.execute(
                webhook_events.delete().where(webhook_events.c.received_at < received_before)
            )
        return int(result.rowcount or 0)
