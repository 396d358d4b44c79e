"""Follow cost: Fly requests a minute for N idle ready sessions.

    .venv/bin/python bench/follow_cost.py [--sessions 50] [--window 60] [--env K=V ...]
                                          [--out follow_cost.json]

The Fly and Daily emulators and the dispatcher run in this process (testkit's harness, SQLite),
the emulators' rate limits lifted and the create pacing raised so that the N starts are quick.
Each session's bot is the test bot (a real process) that calls ready and then waits for its
stop. Once every session is ready and a settling pause has passed, the bench counts the requests
the Fly emulator receives over `--window` seconds, by operation, and reports them per minute.
`--env` passes settings to the dispatcher (e.g. `FOLLOW_INTERVAL_S=10`; unset, the harness's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from testkit.harness import dispatcher_stack, fly_emulator
from testkit.waits import eventually

SETTLE_S = 5.0


def operation(method: str, path: str) -> str:
    """A Fly request's operation, from its method and path."""
    tail = path.rstrip("/").split("/")
    if tail[-1] == "machines":
        return "create" if method == "POST" else "list"
    if method == "DELETE":
        return "destroy"
    if tail[-2] == "machines":
        return "get"
    return tail[-1]


async def measure(sessions: int, window_s: float, env: dict[str, str]) -> dict[str, Any]:
    fly = fly_emulator(rate_limits=False)
    settings = {
        "FLY_CREATE_RATE": "1000",
        "FLY_CREATE_BURST": "1000",
        "MAX_SESSIONS": str(sessions + 10),
        "MAX_SESSIONS_PER_USER": str(sessions + 10),
        "SESSION_MAX_DURATION_S": "3600",
        "READY_TIMEOUT_S": "60",
        **env,
    }
    with tempfile.TemporaryDirectory() as tmp:
        async with dispatcher_stack(Path(tmp), env=settings, fly=fly) as stack:
            answers = await asyncio.gather(*(stack.start() for _ in range(sessions)))
            sids = [a.json()["sessionId"] for a in answers]
            for sid in sids:
                await stack.wait_state(sid, "ready", timeout=120)
            await asyncio.sleep(SETTLE_S)
            began, t0 = len(fly.requests), time.monotonic()
            await asyncio.sleep(window_s)
            seen = fly.requests[began:]
            elapsed = time.monotonic() - t0
            counts = Counter(operation(r.method, r.path) for r in seen)
            for sid in sids:
                await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
            await eventually(
                lambda: all(m.state == "destroyed" for m in fly.machines.values()),
                timeout=120,
                what="every machine destroyed",
            )
    per_minute = {op: round(n * 60 / elapsed, 1) for op, n in sorted(counts.items())}
    return {
        "sessions": sessions,
        "window_s": round(elapsed, 1),
        "env": env,
        "requests": len(seen),
        "requests_per_minute": round(len(seen) * 60 / elapsed, 1),
        "by_operation_per_minute": per_minute,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--env", action="append", default=[], help="K=V for the dispatcher")
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    env = dict(item.split("=", 1) for item in options.env)
    report = asyncio.run(measure(options.sessions, options.window, env))
    text = json.dumps(report, indent=2)
    print(text)
    if options.out:
        options.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
