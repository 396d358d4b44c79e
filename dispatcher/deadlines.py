"""Deadlines: keys by when they are due, for one loop that sweeps them (the follow's timers)."""

from __future__ import annotations

import heapq


class Deadlines:
    """Keys by when they are due: a heap, entries made stale by a later `schedule` skipped."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._seq = 0

    def schedule(self, key: str, due: float) -> None:
        """Make `key` due at `due` (replacing any earlier deadline of it)."""
        self._due[key] = due
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, key))

    def cancel(self, key: str) -> None:
        """Forget `key`'s deadline."""
        self._due.pop(key, None)

    def overdue(self, now: float) -> list[str]:
        """The keys due at `now` or before, each once, earliest first (and forgotten)."""
        keys = []
        while self._heap and self._heap[0][0] <= now:
            due, _, key = heapq.heappop(self._heap)
            if self._due.get(key) == due:
                del self._due[key]
                keys.append(key)
        return keys

    def __len__(self) -> int:
        return len(self._due)
