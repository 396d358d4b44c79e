"""The long fault-injection run: many sessions through a real dispatcher process while the Fly
and Daily emulators fail in every way the suite knows, bots crash, and the dispatcher is
SIGKILLed and restarted several times mid-burst; then the invariants, once the reconciler has
settled everything.

    .venv/bin/python bench/faults.py [--sessions 300] [--concurrency 16] [--seed 1] [--kills 3]

The scenario is `testkit/chaos.py` (its docstring says what is injected and how); `make test`
runs a short version of it (tests/test_faults.py). This prints the figures as a Markdown table:
starts sent and accepted, refusals by status, what the clients sent again, the bots' scripted
misbehaviour, faults injected by kind (answers spoiled, SIGKILLs, OOM kills), the emulators'
own rate limiting, how the sessions ended, and the invariants: sessions lost (accepted, yet
neither ended nor running), unaccepted sessions left live, machines leaked, rooms leaked,
sessions given two machines. It exits 1 if any invariant is violated (with the timelines of the
sessions concerned) or if the run did not settle in time.

A run takes a few minutes: creates are paced under 4 a second (the emulator's limit), and
Daily deletes rooms at about 2 a second, so `--sessions N` needs at least N / 1.8 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from testkit.chaos import run_chaos

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=300, help="starts to send (300)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at once (16)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the plan and scripts (1)")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs mid-burst (3)")
    parser.add_argument("--users", type=int, default=8, help="distinct users (8)")
    parser.add_argument(
        "--extra-faults",
        type=float,
        default=0.3,
        help="faults drawn at random per session, beyond one of every kind (0.3)",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=None,
        help="seconds to wait for everything to settle (default: 60 + sessions / 1.5)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, db)")
    return parser.parse_args()


async def main() -> int:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    began = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {message}", file=sys.stderr, flush=True)

    say(
        f"{args.sessions} sessions, {args.concurrency} at a time, {args.kills} SIGKILLs, "
        f"seed {args.seed}; work directory {work}"
    )
    report = await run_chaos(
        work,
        sessions=args.sessions,
        concurrency=args.concurrency,
        seed=args.seed,
        kills=args.kills,
        users=args.users,
        extra_faults=args.extra_faults,
        settle_timeout_s=args.settle_timeout or 60 + args.sessions / 1.5,
        say=say,
    )
    print(report.table())
    failed = report.violations > 0 or not report.settled
    if not report.settled:
        print("\nNOT SETTLED: sessions, machines or rooms were still live at the deadline")
    for detail in report.details:
        print("\n" + detail)
    for error in report.client_errors:
        print("client error: " + error)
    if failed or args.keep:
        print(f"\nwork directory (dispatcher log, database): {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
