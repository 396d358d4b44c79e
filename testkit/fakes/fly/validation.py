"""The create body's rules that Fly's prose documents beyond its OpenAPI schema (400 when broken).

Types and enums are the OpenAPI document's (`testkit/fakes/fly/openapi.py`, checked before this);
these are the rules of reference §3: a config with an image, a guest's CPU kind, CPUs and memory
(a multiple of 256 MB), a restart's retries, and Go durations in `stop_config.timeout`.
"""

from __future__ import annotations

from typing import Any

from testkit.fakes.fly.errors import _bad_request
from testkit.fakes.fly.machine import parse_duration


def validate_create(body: Any) -> dict[str, Any]:
    """The create body's config, once the rules beyond the schema hold (400 when one breaks)."""
    if not isinstance(body, dict):
        raise _bad_request("invalid request body: must be a JSON object")
    config = body.get("config")
    if not isinstance(config, dict):
        raise _bad_request("invalid config: must be an object")
    if not isinstance(config.get("image"), str) or not config["image"]:
        raise _bad_request("invalid config.image: an image is required")
    guest = config.get("guest") or {}
    if guest.get("cpu_kind") not in (None, "shared", "performance"):
        raise _bad_request(f"invalid config.guest.cpu_kind {guest['cpu_kind']!r}")
    if guest.get("cpus") is not None and guest["cpus"] <= 0:
        raise _bad_request("invalid config.guest.cpus: must be a positive integer")
    memory = guest.get("memory_mb")
    if memory is not None and not (memory > 0 and memory % 256 == 0):
        raise _bad_request(f"invalid config.guest.memory_mb {memory!r}: must be a multiple of 256")
    retries = (config.get("restart") or {}).get("max_retries")
    if retries is not None and retries < 0:
        raise _bad_request("invalid config.restart.max_retries: must be a non-negative integer")
    timeout = (config.get("stop_config") or {}).get("timeout")
    try:
        if timeout is not None:
            parse_duration(timeout)
    except ValueError as exc:
        raise _bad_request(f"invalid config.stop_config: {exc}") from None
    return config
