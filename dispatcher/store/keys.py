"""Idempotency keys: which start holds a key, and the answer it gave."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from dispatcher.store.database import Database
from dispatcher.store.schema import idempotency_keys, upsert


@dataclass(frozen=True)
class IdempotencyRecord:
    """A `/start` made under an Idempotency-Key: its session, and its answer once it has one."""

    user_id: str
    key: str
    request_hash: str
    session_id: str
    created_at: float
    answer: dict[str, Any] | None


class IdempotencyKeys(Database):
    """The keys of `/start` requests, per user."""

    async def claim_key(
        self, user_id: str, key: str, request_hash: str, session_id: str
    ) -> IdempotencyRecord | None:
        """Claim an Idempotency-Key for a new start: None if this call claimed it, else the
        record of the start that holds it."""
        now = time.time()
        async with self.write() as conn:
            insert = upsert(self.dialect, idempotency_keys).values(
                user_id=user_id,
                key=key,
                request_hash=request_hash,
                session_id=session_id,
                created_at=now,
            )
            result = await conn.execute(insert.on_conflict_do_nothing())
            if result.rowcount == 1:
                return None
            row = (
                await conn.execute(
                    idempotency_keys.select().where(
                        idempotency_keys.c.user_id == user_id, idempotency_keys.c.key == key
                    )
                )
            ).first()
        if row is None:  # released between the insert and the select: try again
            return await self.claim_key(user_id, key, request_hash, session_id)
        return IdempotencyRecord(
            user_id=row.user_id,
            key=row.key,
            request_hash=row.request_hash,
            session_id=row.session_id,
            created_at=row.created_at,
            answer=json.loads(row.answer) if row.answer else None,
        )

    async def settle_key(
        self, user_id: str, key: str, session_id: str, answer: dict[str, Any]
    ) -> None:
        """Store the answer of the start that holds a key."""
        async with self.write() as conn:
            await conn.execute(
                idempotency_keys.update()
                .where(
                    idempotency_keys.c.user_id == user_id,
                    idempotency_keys.c.key == key,
                    idempotency_keys.c.session_id == session_id,
                )
                .values(answer=json.dumps(answer, separators=(",", ":")))
            )

    async def release_key(self, user_id: str, key: str, session_id: str) -> None:
        """Free a key whose start failed or was abandoned, so that a retry starts afresh."""
        async with self.write() as conn:
            await conn.execute(
                idempotency_keys.delete().where(
                    idempotency_keys.c.user_id == user_id,
                    idempotency_keys.c.key == key,
                    idempotency_keys.c.session_id == session_id,
                )
            )

    async def purge_keys(self, *, created_before: float) -> int:
        """Forget idempotency keys older than a time; how many were removed."""
        async with self.write() as conn:
            result = await conn.execute(
                idempotency_keys.delete().where(idempotency_keys.c.created_at < created_before)
            )
        return int(result.rowcount or 0)
