"""A machine's record, its events and states, and the small parsers and ids it uses."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import re
import secrets
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testkit.fakes.fly.light import LightProcess

SETTLED_STATES = frozenset(
    {"created", "started", "stopped", "suspended", "failed", "destroyed", "replaced", "migrated"}
)
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def ulid() -> str:
    """A ULID-like id: 48 bits of milliseconds and 80 random bits, Crockford base32."""
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def utc_now(timespec: str = "seconds") -> str:
    """The time now as ISO 8601 with a Z suffix."""
    return datetime.now(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def parse_duration(value: Any) -> float:
    """Seconds in a Go duration: a string such as "1m30s" or "500ms", or a number of nanoseconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value) / 1e9
    if isinstance(value, str) and value == "0":
        return 0.0
    if not isinstance(value, str) or not _DURATION.fullmatch(value):
        raise ValueError(f"invalid duration {value!r}")
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(value))


def parse_signal(value: Any) -> signal.Signals:
    """A signal from its name, with or without the SIG prefix."""
    if not isinstance(value, str):
        raise ValueError(f"invalid signal {value!r}")
    name = value.upper() if value.upper().startswith("SIG") else f"SIG{value.upper()}"
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"invalid signal {value!r}") from None


def parse_image_ref(ref: str) -> dict[str, Any]:
    """The `image_ref` object Fly reports for an image reference."""
    name, _, digest = ref.partition("@")
    registry, slash, rest = name.partition("/")
    if not slash or not ("." in registry or ":" in registry or registry == "localhost"):
        registry, rest = "docker-hub-mirror.fly.io", name if "/" in name else f"library/{name}"
    repository, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag:
        repository, tag = rest, "" if digest else "latest"
    digest = digest or f"sha256:{hashlib.sha256(ref.encode()).hexdigest()}"
    return {
        "registry": registry,
        "repository": repository,
        "tag": tag,
        "digest": digest,
        "labels": {},
    }


@dataclass(eq=False)
class MachineRecord:
    """One machine: the fields the API shows, plus the local process (or, for a light machine,
    the task) that plays its VM."""

    id: str
    app: str
    name: str
    region: str
    config: dict[str, Any]
    image_dir: Path
    instance_id: str
    private_ip: str
    state: str = "created"
    created_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    created_mono: float = field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False)
    restart_count: int = 0
    process: asyncio.subprocess.Process | LightProcess | None = field(default=None, repr=False)
    stop_requested: bool = False
    destroy_requested: bool = False
    oom_killed: bool = False
    reached: dict[str, set[str]] = field(default_factory=dict, repr=False)
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    runner: asyncio.Task[None] | None = field(default=None, repr=False)
    reader: asyncio.Task[None] | None = field(default=None, repr=False)
    kill_timer: asyncio.Task[None] | None = field(default=None, repr=False)
    frozen: bool = False
    transition: asyncio.Task[None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.reached[self.instance_id] = {self.state}

    @property
    def active(self) -> bool:
        """Whether the machine has a boot or process: booting, running, suspended, stopping..."""
        return self.runner is not None and not self.runner.done()

    @property
    def metadata(self) -> dict[str, str]:
        """`config.metadata`, empty when unset."""
        return dict(self.config.get("metadata") or {})

    def set_state(self, state: str) -> None:
        """Enter `state` and wake every waiter."""
        self.state = state
        self.updated_at = utc_now()
        self.reached.setdefault(self.instance_id, set()).add(state)
        self.notify()

    def notify(self) -> None:
        """Wake every waiter (they re-check their condition)."""
        self.changed.set()
        self.changed = asyncio.Event()

    def add_event(
        self, kind: str, status: str, source: str, request: dict[str, Any] | None = None
    ) -> None:
        """Record an event (newest first)."""
        event: dict[str, Any] = {"id": ulid(), "type": kind, "status": status, "source": source}
        event["timestamp"] = time.time_ns() // 1_000_000
        if request is not None:
            event["request"] = request
        self.events.insert(0, event)

    def reached_one_of(self, targets: list[str], version: str | None) -> str | None:
        """The state a wait for any of `targets` (of `version`) answers, once it is over."""
        for target in targets:
            if self.satisfies(target, version):
                return self.state if target == "settled" else target
        return None

    def satisfies(self, target: str, version: str | None) -> bool:
        """Whether a wait for `target` (of `version`) is over; `settled` is any state that is
        not transient ([inf]: the reference's persistent and terminal states)."""
        if target == "settled":
            return self.state in SETTLED_STATES
        if target == "stopped" and self.state == "destroyed":
            return True
        if target == "stopped" and version is not None:
            return "stopped" in self.reached.get(version, set())
        return self.state == target and version in (None, self.instance_id)

    def exit_events(self) -> list[dict[str, Any]]:
        """The `exit_event` of every exit, newest first, in either shape the emulator emits."""
        return [
            (e["request"].get("MonitorEvent") or e["request"])["exit_event"]
            for e in self.events
            if e["type"] == "exit"
        ]

    def to_json(self, summary: bool = False) -> dict[str, Any]:
        """The Machine object; `summary` leaves out config, events and checks."""
        doc: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "image_ref": parse_image_ref(str(self.config["image"])),
            "instance_id": self.instance_id,
            "version": self.instance_id,
            "private_ip": self.private_ip,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "host_status": "ok",
        }
        if not summary:
            doc["config"] = copy.deepcopy(self.config)
            doc["events"] = copy.deepcopy(self.events)
            doc["checks"] = []
        return doc
