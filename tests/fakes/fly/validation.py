"""Shape checks for the create body (400 when it is wrong)."""

from __future__ import annotations

from typing import Any

from tests.fakes.fly.errors import _bad_request
from tests.fakes.fly.machine import parse_duration, parse_signal


def _str_map(value: Any, where: str) -> None:
    ok = isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )
    if value is not None and not ok:
        raise _bad_request(f"invalid {where}: must be an object of string values")


def _str_list(value: Any, where: str) -> None:
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if value is not None and not ok:
        raise _bad_request(f"invalid {where}: must be a list of strings")


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad_request(f"invalid {where}: must be an object")
    return value


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _integer(value) and value > 0


def _optional_bool(body: dict[str, Any], key: str, where: str) -> None:
    if body.get(key) is not None and not isinstance(body[key], bool):
        raise _bad_request(f"invalid {where}: must be a boolean")


def validate_create(body: Any) -> dict[str, Any]:
    """The create body's config, once its shape is checked (400 when it is wrong)."""
    if not isinstance(body, dict):
        raise _bad_request("invalid request body: must be a JSON object")
    for key in ("name", "region"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise _bad_request(f"invalid {key}: must be a string")
    _optional_bool(body, "skip_launch", "skip_launch")
    config = body.get("config")
    if not isinstance(config, dict):
        raise _bad_request("invalid config: must be an object")
    if not isinstance(config.get("image"), str) or not config["image"]:
        raise _bad_request("invalid config.image: an image is required")
    _str_map(config.get("env"), "config.env")
    _str_map(config.get("metadata"), "config.metadata")
    init = _object(config.get("init"), "config.init")
    for key in ("cmd", "entrypoint", "exec"):
        _str_list(init.get(key), f"config.init.{key}")
    _validate_guest(_object(config.get("guest"), "config.guest"))
    _validate_restart(_object(config.get("restart"), "config.restart"))
    stop = _object(config.get("stop_config"), "config.stop_config")
    try:
        if stop.get("signal") is not None:
            parse_signal(stop["signal"])
        if stop.get("timeout") is not None:
            parse_duration(stop["timeout"])
    except ValueError as exc:
        raise _bad_request(f"invalid config.stop_config: {exc}") from None
    _optional_bool(config, "auto_destroy", "config.auto_destroy")
    if config.get("services") is not None and not isinstance(config["services"], list):
        raise _bad_request("invalid config.services: must be a list")
    return config


def _validate_guest(guest: dict[str, Any]) -> None:
    if guest.get("cpu_kind") not in (None, "shared", "performance"):
        raise _bad_request(f"invalid config.guest.cpu_kind {guest['cpu_kind']!r}")
    if "cpus" in guest and not _positive_int(guest["cpus"]):
        raise _bad_request("invalid config.guest.cpus: must be a positive integer")
    memory = guest.get("memory_mb")
    if memory is not None and not (_positive_int(memory) and memory % 256 == 0):
        raise _bad_request(f"invalid config.guest.memory_mb {memory!r}: must be a multiple of 256")


def _validate_restart(restart: dict[str, Any]) -> None:
    if restart.get("policy") not in (None, "", "no", "always", "on-failure"):
        raise _bad_request(f"invalid config.restart.policy {restart['policy']!r}")
    retries = restart.get("max_retries")
    if retries is not None and not (_integer(retries) and retries >= 0):
        raise _bad_request("invalid config.restart.max_retries: must be a non-negative integer")
