"""A stateful emulator of the Fly Machines API that runs each machine as a local process.

Follows docs/reference/fly-machines.md. Choices where the reference is silent:

- Every request is checked against Fly's published OpenAPI document
  (`tests/reference/fly-machines-openapi.json`, by `openapi.py`): what it refuses (a wrong type,
  a value outside an enum) is a 400 `{"error": ...}`. Its schemas are all open, so unknown fields
  pass, as on Fly; the emulator lists them in `undeclared`.
- `list` with `limit` (1 to 1000) answers pages of machines in id order, each but the last
  with a `fly-next-cursor` header (the page's last id, [inf]) that the next page's `cursor`
  passes back; without `limit`, every machine at once. `summary=true` leaves out config
  (metadata included), events and checks.
- `wait`: `state` is any of the spec's (`failed` and `settled` too), comma-separated or
  repeated, and the first one reached answers; `timeout` is whole seconds, default 60, larger
  values clamped to 60. An unknown `version`/`instance_id` answers 400. `stopped` is satisfied
  once that version's process has exited, or by a destroyed machine; `settled` by any state that
  is not transient [inf]; the others only by the current state. The answer is `{"ok": true,
  "state", "version", "event_id"}` (the machine's version and its newest event).
- `instance_id` (= `version`) is minted at create and kept by the first boot and by policy
  restarts; every API `start` that boots the machine mints a new one.
- A process killed by signal N reports `exit_code` = `guest_exit_code` = 128+N and
  `signal` = `guest_signal` = N (-1 when none); an OOM kill is SIGKILL (137), `oom_killed: true`.
- An exit event's details are in `request.exit_event`, or with `exit_event_shape="MonitorEvent"`
  in `request.MonitorEvent.exit_event` (fly-go's GetExitCode reads that first: both occur).
- The exit event's `status` is the state entered next: `stopped`, or `restarting` when the
  restart policy boots the process again (`restarting: true` in the exit event).
- Durations in `stop_config.timeout` / stop's `timeout` are Go duration strings like "1m30s"
  (the spec types them as strings, though fly-go's `Duration` also decodes nanoseconds).
- Suspend (`POST .../suspend`, `{"ok":true}`) freezes the process group with SIGSTOP and goes
  `suspending`, then `suspended` after `suspend_delay_s`; a start of a suspended machine goes
  `starting`, then `started` after `resume_delay_s`, and SIGCONTs the same process (same pid
  and instance_id). Events: `suspend`/`suspending`/user, `suspend`/`suspended`/flyd, and for the
  resume `start`/`starting`/user, `resume`/`started`/flyd (the type names are [unv]).
- Suspend refusals ([unv] statuses): 400 `invalid_argument` over 2048 MB of memory (reference
  §10, "≤ 2 GB"; one guide says 4 GB) or with `init.swap_size_mb`; 412 `failed_precondition` unless
  `started`. A start while `suspending` is a 412. Stop or forced destroy of a suspended machine
  signals the frozen process and then SIGCONTs it, so the stop signal is handled ([unv] whether
  Fly's guest sees it); destroy without force is a 412 as for a running machine ([unv]).
- Stop on a machine that is not running answers `{"ok":true}`; start/stop on a destroyed machine,
  412; destroy of a destroyed machine, 404. An empty stop body counts as `{}`.
- A wait that can no longer be satisfied (started, on a stopped machine) runs to its 408.
- The image's CMD is `default_cmd` (`python -m bot_runtime`); `init.exec` replaces it,
  `init.entrypoint` runs with `init.cmd` only. Each process gets `PYTHONUNBUFFERED=1`, as the
  image's ENV would. An image directory's `bot_runtime/` needs an `__init__.py`: a namespace
  package loses to the repo's `bot_runtime` package, which the editable install puts on every
  interpreter's path. Without one, the repo's real runtime runs (the image holds a bot file).
- `light_machines=True` (`--light-machines`) plays each machine's process with an asyncio task
  that calls back as the test bot does (testkit/fakes/fly/light.py): states, waits, events and
  exit codes as a process's, ten thousand live bots without ten thousand processes;
  `exit_machine` (`POST /_emulator/machines/{id}/exit`) scripts such a bot's exit, with or
  without its `ended` callback.
- A fault with `status=0` closes uvicorn's transport: an ASGI app that returns without
  answering gets a 500 from uvicorn, not a dropped connection.
"""

from testkit.fakes.fly.api import (
    APP_SCOPED_LIMITS,
    DEFAULT_APP,
    DEFAULT_LIMITS,
    DEFAULT_TOKEN,
    FlyEmulator,
    Handler,
)
from testkit.fakes.fly.errors import ApiError, ApiRequest
from testkit.fakes.fly.handlers import (
    MAX_WAIT_S,
    REGION_NAMES,
    SUSPEND_MAX_MEMORY_MB,
    WAITABLE_STATES,
    MachineHandlers,
)
from testkit.fakes.fly.machine import (
    MachineRecord,
    parse_duration,
    parse_image_ref,
    parse_signal,
    ulid,
    utc_now,
)
from testkit.fakes.fly.runtime import DEFAULT_MAX_RETRIES, EXIT_EVENT_SHAPES, MachineRuntime
from testkit.fakes.fly.validation import validate_create

__all__ = [
    "APP_SCOPED_LIMITS",
    "DEFAULT_APP",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TOKEN",
    "EXIT_EVENT_SHAPES",
    "MAX_WAIT_S",
    "REGION_NAMES",
    "SUSPEND_MAX_MEMORY_MB",
    "WAITABLE_STATES",
    "ApiError",
    "ApiRequest",
    "FlyEmulator",
    "Handler",
    "MachineHandlers",
    "MachineRecord",
    "MachineRuntime",
    "parse_duration",
    "parse_image_ref",
    "parse_signal",
    "ulid",
    "utc_now",
    "validate_create",
]
