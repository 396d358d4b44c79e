"""Run the Fly Machines API emulator on its own: `python -m testkit.fakes.fly --port N`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

from testkit.fakes.common import standalone
from testkit.fakes.fly.api import DEFAULT_APP, DEFAULT_TOKEN, FlyEmulator
from testkit.fakes.fly.runtime import EXIT_EVENT_SHAPES
from testkit.net import serve


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} wants KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _parse_cli(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m testkit.fakes.fly", add_help=False)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--app", action="append", default=[], help="an app that exists")
    parser.add_argument("--image", action="append", default=[], metavar="REF=DIR")
    parser.add_argument("--default-image-root", type=Path, metavar="DIR")
    parser.add_argument("--secret", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--region", action="append", default=[], metavar="CODE[=CAPACITY]")
    parser.add_argument("--boot-delay", type=float, default=0.3, metavar="SECONDS")
    parser.add_argument("--start-delay", type=float, default=0.2, metavar="SECONDS")
    parser.add_argument("--resume-delay", type=float, default=0.2, metavar="SECONDS")
    parser.add_argument("--suspend-delay", type=float, default=0.2, metavar="SECONDS")
    parser.add_argument("--destroy-delay", type=float, default=0.1, metavar="SECONDS")
    parser.add_argument("--exit-event-shape", choices=EXIT_EVENT_SHAPES, default="exit_event")
    parser.add_argument(
        "--light-machines",
        action="store_true",
        help="play each machine's bot with a task, not a process (testkit/fakes/fly/light.py)",
    )
    fly, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(parser.format_help())
    sys.argv = [sys.argv[0], *rest]
    return fly, standalone("Fly Machines API emulator", default_port=4280)


def main(argv: list[str] | None = None) -> None:
    """Run the emulator on its own until interrupted."""
    fly, common = _parse_cli(sys.argv[1:] if argv is None else argv)
    regions: dict[str, int | None] = {}
    for item in fly.region or ["iad", "ord"]:
        code, _, capacity = item.partition("=")
        regions[code] = int(capacity) if capacity else None
    emulator = FlyEmulator(
        token=fly.token,
        apps=fly.app or [DEFAULT_APP],
        images={ref: Path(d) for ref, d in _pairs(fly.image, "--image").items()},
        default_image_root=fly.default_image_root,
        regions=regions,
        secrets=_pairs(fly.secret, "--secret"),
        boot_delay_s=fly.boot_delay,
        start_delay_s=fly.start_delay,
        resume_delay_s=fly.resume_delay,
        suspend_delay_s=fly.suspend_delay,
        destroy_delay_s=fly.destroy_delay,
        exit_event_shape=fly.exit_event_shape,
        light_machines=fly.light_machines,
        rate_limits=not common.no_rate_limits,
        latency=common.latency,
    )

    async def run() -> None:
        async with serve(emulator.app, common.port, common.host) as url:
            print(f"fly emulator on {url}", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
