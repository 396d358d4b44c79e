"""The recorded latency profile of Fly's Machines API and Daily's REST API, for the emulators.

Every figure carries its source: a section of docs/reference (FLY = fly-machines.md,
DAILY = daily.md), a public page, or "assumed:" with the reason when no source gives a number.
The API answer latencies are mostly assumptions: the reference documents rate limits and boot
times, not how long an API call takes to answer.

    from bench import latency_profile
    latency_profile.apply(fly, daily)                     # realistic latencies and limits
    latency_profile.apply(fly, daily, scale_limits=1000)  # limits raised 1000x
    env |= latency_profile.dispatcher_pacing(scale_limits=1000)
    fly.secrets |= latency_profile.testbot_env()          # pooled test bots sleep BOT_BOOT

`apply` configures a FlyEmulator and a DailyEmulator (testkit/fakes); `dispatcher_pacing` gives the
dispatcher's create pacing that matches the Fly create limit. BOT_BOOT and BOT_JOIN are the
bot's own work (not an API's), for the benches' test bots to simulate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testkit.fakes.daily import DailyEmulator
    from testkit.fakes.fly import FlyEmulator


@dataclass(frozen=True)
class Figure:
    """A number (seconds) and where it comes from."""

    value: float
    source: str


@dataclass(frozen=True)
class Limit:
    """A token bucket: `rate` requests a second, `burst` saved up, and where it comes from."""

    rate: float
    burst: int
    source: str


FLY_BLOG = "https://fly.io/blog/fly-machines/"
_RTT = (
    f"{FLY_BLOG}: the API round trip in-region is '20-50ms'; the upper bound, since the "
    "dispatcher and the bots' hosts are not always in one region"
)
_FLYD = (
    "assumed: a round trip (50 ms, see get) plus flyd acting on the host; the reference gives "
    "no number"
)
_DAILY = (
    "assumed: the reference gives no latency for Daily's API; one HTTPS round trip from a Fly "
    "region to Daily's API plus a write on their side"
)
_DAILY_READ = "assumed: as for create_room, without the write"
_DAILY_BATCH = (
    "assumed: no source gives a batch call's latency; twice create_room's, for the writes of "
    "up to a hundred rooms"
)

# Seconds before each API call answers (the emulators' per-operation latency).
FLY_LATENCY: dict[str, Figure] = {
    "create": Figure(
        1.5,
        "assumed: FLY §9 gives 'maybe low double digit seconds' for a create that pulls the "
        "image, which happens once per host and image, and no figure for the steady state, a "
        "create from a cached image; 1.5 s is a guess within the README's 'later boots take "
        "1-2 s'. The emulator starts the boot (below) while the create answer is held back",
    ),
    "get": Figure(0.05, _RTT),
    "list": Figure(0.05, _RTT),
    "wait": Figure(0.05, _RTT + "; added once the awaited state is reached"),
    "events": Figure(0.05, _RTT),
    "metadata": Figure(0.05, _RTT),
    "regions": Figure(0.05, _RTT),
    "stop": Figure(0.1, _FLYD),
    "start": Figure(0.1, _FLYD + "; the answer, while the machine boots or resumes (below)"),
    "destroy": Figure(0.1, _FLYD),
    "suspend": Figure(0.1, _FLYD + "; the answer, while the snapshot is written (below)"),
    "update": Figure(
        1.0,
        "assumed: FLY §9 quotes an update at ~20 s for a running machine, which it restarts; a "
        "stopped machine's update with `skip_launch` (POOL_RECYCLE) boots nothing, and no "
        "figure is published for it: 1 s, off every start's path",
    ),
}
DAILY_LATENCY: dict[str, Figure] = {
    "create_room": Figure(0.25, _DAILY),
    "update_room": Figure(0.25, _DAILY),
    "delete_room": Figure(0.25, _DAILY),
    "create_token": Figure(0.25, _DAILY),
    "create_rooms": Figure(0.5, _DAILY_BATCH),
    "delete_rooms": Figure(0.5, _DAILY_BATCH),
    "domain": Figure(0.15, _DAILY_READ),
    "get_room": Figure(0.15, _DAILY_READ),
    "list_rooms": Figure(0.15, _DAILY_READ),
    "presence": Figure(0.15, _DAILY_READ),
    "get_token": Figure(0.15, _DAILY_READ),
}
# A machine's boot, from the create call to its process running (half before `starting`,
# half after, in the emulator).
FLY_BOOT = Figure(
    0.3,
    "FLY §9: boot 'about 300ms' "
    "(https://fly.io/docs/machines/guides-examples/functions-with-machines/)",
)
FLY_DESTROY = Figure(
    0.1, "assumed: from the process's exit to `destroyed` (auto_destroy); no number in FLY"
)
# A start of a `created` (skip_launch) or `stopped` machine, to its (fresh) process running.
FLY_START = Figure(
    0.3,
    "FLY §9: boot after create or start of a stopped machine 'well under a second', boot "
    "'about 300ms' (https://fly.io/docs/machines/overview/, .../functions-with-machines/)",
)
# A start of a `suspended` machine, to its (same) process continuing.
FLY_RESUME = Figure(
    0.3,
    "FLY §9: resume 'a few hundred ms' (https://fly.io/docs/reference/suspend-resume/); "
    "300 ms is the low end of that range, as for a boot",
)
# A suspend, to `suspended` (the pool suspends machines before sessions: off every start's path).
FLY_SUSPEND = Figure(
    0.5,
    "assumed: FLY gives no number for writing the snapshot; off the measured paths (a pool "
    "machine is suspended long before it is claimed)",
)

# The bot's own work, simulated by the benches' test bots (testkit/fakes/images/testbot).
BOT_BOOT = Figure(
    0.632,
    "measured: README 'Cold start' (bench/bot_cold_start.py --runs 10, one run, 2 cores): the "
    "real daily bot from process start to joining its room (imports, Silero VAD loaded, "
    "pipeline built), median 632 ms",
)
BOT_JOIN = Figure(
    0.3,
    "assumed: no source gives the time daily-python takes to join a room (the cold-start bench "
    "stops where the join begins): a websocket to Daily's signalling and the SFU's ICE/DTLS "
    "handshake, a few round trips of 20-50 ms (see get) plus Daily's side",
)

_PER_ACTION = "FLY §6: '1 request, per second, per action ... burst up to 3 req/s'"
FLY_LIMITS: dict[str, Limit] = {
    "create": Limit(1.0, 3, _PER_ACTION + "; per app (create has no machine id yet: [inf])"),
    "list": Limit(1.0, 3, _PER_ACTION + "; per app"),
    "get": Limit(5.0, 10, "FLY §6: Get Machine 5 req/s, burst 10; per machine"),
    "wait": Limit(1.0, 3, _PER_ACTION + "; per machine"),
    "stop": Limit(1.0, 3, _PER_ACTION + "; per machine"),
    "start": Limit(1.0, 3, _PER_ACTION + "; per machine"),
    "destroy": Limit(1.0, 3, _PER_ACTION + "; per machine"),
    "suspend": Limit(1.0, 3, _PER_ACTION + "; per machine"),
    "events": Limit(1.0, 3, _PER_ACTION + "; per machine"),
    "metadata": Limit(1.0, 3, _PER_ACTION + "; per machine"),
    "update": Limit(1.0, 3, _PER_ACTION + "; per machine ([inf]: it names a machine)"),
}
DAILY_LIMITS: dict[str, Limit] = {
    "api": Limit(20.0, 20, "DAILY §2: most endpoints 20 req/s, or 100 per 5 s"),
    "delete_room": Limit(2.0, 2, "DAILY §2: DELETE /rooms/:name ~2 req/s, or 50 per 30 s"),
}


def scaled(figure: Figure, factor: float) -> float:
    """A figure's value times `factor` (a faster profile for smoke tests)."""
    return figure.value * factor


def critical_path_s(latency_scale: float = 1.0) -> float:
    """The least time one start can take: room and machine are created concurrently, so the
    slower of Daily's create_room and Fly's create (everything else is local)."""
    return max(DAILY_LATENCY["create_room"].value, FLY_LATENCY["create"].value) * latency_scale


def _limits(table: dict[str, Limit], scale: float) -> dict[str, tuple[float, int]]:
    return {
        action: (limit.rate * scale, max(1, math.ceil(limit.burst * scale)))
        for action, limit in table.items()
    }


def apply(
    fly: FlyEmulator,
    daily: DailyEmulator,
    *,
    scale_limits: float = 1.0,
    latency_scale: float = 1.0,
) -> None:
    """Configure both emulators: latencies (times `latency_scale`), Fly's boot, start, resume,
    suspend and destroy delays, and every rate limit (rates and bursts times `scale_limits`: 1
    is the documented limits, 1000 is an org whose limits were raised or that spreads over many
    bot apps). The emulator boots a new machine FLY_BOOT after its create has answered."""
    fly.latency.default = 0.0
    fly.latency.per_op = {op: scaled(f, latency_scale) for op, f in FLY_LATENCY.items()}
    daily.latency.default = 0.0
    daily.latency.per_op = {op: scaled(f, latency_scale) for op, f in DAILY_LATENCY.items()}
    fly.boot_delay_s = scaled(FLY_BOOT, latency_scale)
    fly.start_delay_s = scaled(FLY_START, latency_scale)
    fly.resume_delay_s = scaled(FLY_RESUME, latency_scale)
    fly.suspend_delay_s = scaled(FLY_SUSPEND, latency_scale)
    fly.destroy_delay_s = scaled(FLY_DESTROY, latency_scale)
    fly.limiter.limits = _limits(FLY_LIMITS, scale_limits)
    fly.limiter.enabled = True
    daily.limiter.limits = _limits(DAILY_LIMITS, scale_limits)
    daily.limiter.enabled = True


def boot_delay_s() -> float:
    """From a create's arrival to the machine's process running, under `apply` (FLY §4: the
    create answers `created` as the boot begins)."""
    return FLY_LATENCY["create"].value + FLY_BOOT.value


def testbot_env(latency_scale: float = 1.0) -> dict[str, str]:
    """App secrets (every machine's env) that make a pooled test bot spend BOT_BOOT loading
    before it asks for its assignment, as the real bot does."""
    return {"TESTBOT_BOOT_S": f"{scaled(BOT_BOOT, latency_scale):g}"}


def dispatcher_pacing(*, scale_limits: float = 1.0) -> dict[str, str]:
    """The dispatcher's create pacing (env) that matches Fly's create limit under `apply`."""
    rate, burst = _limits({"create": FLY_LIMITS["create"]}, scale_limits)["create"]
    return {"FLY_CREATE_RATE": f"{min(rate, 1000):g}", "FLY_CREATE_BURST": str(min(burst, 1000))}


def describe(*, scale_limits: float = 1.0, latency_scale: float = 1.0) -> list[str]:
    """One line per figure, with its source, for a bench's printout."""
    figures = [(f"fly {op}", f) for op, f in FLY_LATENCY.items()]
    figures += [("fly boot", FLY_BOOT), ("fly destroyed after exit", FLY_DESTROY)]
    figures += [("fly start (stopped)", FLY_START), ("fly resume", FLY_RESUME)]
    figures += [("fly suspend", FLY_SUSPEND)]
    figures += [("bot boot", BOT_BOOT), ("bot join", BOT_JOIN)]
    figures += [(f"daily {op}", f) for op, f in DAILY_LATENCY.items()]
    lines = [
        f"{name:<26} {scaled(f, latency_scale) * 1000:>5.0f} ms  {f.source}" for name, f in figures
    ]
    for api, table in (("fly", FLY_LIMITS), ("daily", DAILY_LIMITS)):
        for action, (rate, burst) in _limits(table, scale_limits).items():
            lines.append(
                f"{api + ' limit ' + action:<26} {rate:g}/s burst {burst}  {table[action].source}"
            )
    return lines
