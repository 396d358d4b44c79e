"""Idempotency-Key: a start retried under the same key answers what the first one answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dispatcher.errors import ErrorCode, InProgress, Unprocessable
from dispatcher.store import Store

# How long a retried start waits for the first start under the same Idempotency-Key.
IDEMPOTENT_WAIT_S = 30.0
IDEMPOTENT_POLL_S = 0.2


@dataclass(frozen=True)
class Idempotency:
    """An Idempotency-Key and the hash of the request body it came with."""

    key: str
    request_hash: str


class IdempotentStarts:
    """Starts under Idempotency-Keys: the first start with a key runs, a retry waits up to
    `wait_s` for its answer (then 409 `idempotency-key-in-progress`), a key whose start was
    abandoned is taken over."""

    def __init__(
        self,
        store: Store,
        *,
        abandoned_after_s: float,
        wait_s: float = IDEMPOTENT_WAIT_S,
        poll_s: float = IDEMPOTENT_POLL_S,
    ) -> None:
        self._store = store
        self._abandoned_after_s = abandoned_after_s
        self._wait_s = wait_s
        self._poll_s = poll_s

    async def run(
        self,
        user: str,
        idempotency: Idempotency,
        session_id: str,
        start: Callable[[], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:
        """The answer of the start holding the key, or of `start()` once it has claimed it."""
        key = idempotency.key
        deadline = time.monotonic() + self._wait_s
        while (
            held := await self._store.claim_key(user, key, idempotency.request_hash, session_id)
        ) is not None:
            if held.request_hash != idempotency.request_hash:
                raise Unprocessable(
                    "this Idempotency-Key was used with a different request",
                    code=ErrorCode.IDEMPOTENCY_KEY_REUSED,
                )
            if held.answer is not None:
                return held.answer
            if await self._abandoned(held.session_id, held.created_at):
                await self._store.release_key(user, key, held.session_id)
                continue
            if time.monotonic() > deadline:
                raise InProgress(
                    "a start with this Idempotency-Key is still in progress",
                    code=ErrorCode.IDEMPOTENCY_KEY_IN_PROGRESS,
                )
            await asyncio.sleep(self._poll_s)
        try:
            answer = await start()
        except BaseException:
            await self._store.release_key(user, key, session_id)
            raise
        await self._store.settle_key(user, key, session_id, answer)
        return answer

    async def _abandoned(self, session_id: str, claimed_at: float) -> bool:
        """Whether the start holding a key will never answer: its session failed without
        an answer (e.g. its dispatcher died mid-start), or never got made."""
        session = await self._store.get(session_id)
        if session is None:
            return time.time() - claimed_at > self._abandoned_after_s
        return not session.active
