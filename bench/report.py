"""How every bench measures and reports: percentiles, CPU seconds from /proc, figures formatted
for its table, and the report printed (and written as JSON with `--out`)."""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def summary(
    values: list[float], quantiles: Iterable[int] = (50, 90, 99), *, count: bool = False
) -> dict[str, float]:
    """The `quantiles` (nearest rank) and the max of some figures, after their number if
    `count`; empty when there are none."""
    if not values:
        return {}
    figures: dict[str, float] = {"n": len(values)} if count else {}
    figures |= {f"p{q}": percentile(values, q) for q in quantiles}
    return figures | {"max": max(values)}


def process_cpu_s(pid: int, thread: int | None = None) -> float | None:
    """A running process's CPU seconds (user + system, every thread, ended ones included), or
    one of its threads' (/proc/<pid>/task/<thread>/stat); None once it is gone."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = float(sum(values[:8]))
    idle = values[3] + values[4]
    return total - idle, total


@dataclass
class CpuMark:
    """CPU counters at one moment."""

    at: float
    dispatcher: float | None
    own: float
    children: float
    busy: float
    total: float

    @classmethod
    def take(cls, pid: int) -> CpuMark:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy, total = machine_busy()
        return cls(
            at=time.perf_counter(),
            dispatcher=process_cpu_s(pid),
            own=own.ru_utime + own.ru_stime,
            children=children.ru_utime + children.ru_stime,
            busy=busy,
            total=total,
        )

    def since(self, before: CpuMark) -> dict[str, float | None]:
        """CPU seconds spent by each side between `before` and this mark, and the wall time.

        `bots` counts the children this process reaped: the machines' processes (the
        dispatcher is a child too, but is reaped only once it is stopped, after the last mark).
        """
        dispatcher = (
            self.dispatcher - before.dispatcher
            if self.dispatcher is not None and before.dispatcher is not None
            else None
        )
        ticks = self.total - before.total
        return {
            "wall_s": self.at - before.at,
            "dispatcher_s": dispatcher,
            "bench_s": self.own - before.own,
            "bots_s": self.children - before.children,
            "machine_busy": (self.busy - before.busy) / ticks if ticks else None,
        }


def ms(seconds: float | None, unit: str = " ms") -> str:
    """Seconds as whole milliseconds; "-" for a figure not measured."""
    return "-" if seconds is None else f"{seconds * 1000:.0f}{unit}"


def secs(seconds: float | None, digits: int = 2) -> str:
    """Seconds with `digits` decimals; "-" for a figure not measured."""
    return "-" if seconds is None else f"{seconds:.{digits}f} s"


def pct(fraction: float | None) -> str:
    """A fraction as a whole percentage; "-" for a figure not measured."""
    return "-" if fraction is None else f"{fraction * 100:.0f}%"


def emit(
    table: str,
    figures: Mapping[str, Any] | None = None,
    out: Path | None = None,
    *,
    started: float | None = None,
) -> None:
    """Print the bench's table (and how long the run took, from `started`, a perf_counter);
    write its figures as JSON to `out` when asked."""
    print(table)
    if started is not None:
        print(f"\n(the whole run took {time.perf_counter() - started:.0f} s)")
    if out is not None:
        out.write_text(json.dumps(figures, indent=2) + "\n")
