"""Typed values read from the environment: the reader, which names the variable of any value it
refuses, and the values it makes (secrets, rates)."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from dispatcher.errors import ConfigError

T = TypeVar("T")

_REGION = re.compile(r"^[a-z]{3}$")
_STUN = re.compile(r"^stuns?:[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
# A rate: `<count>` (a minute), or `<count>/<window>` with the window in s, m or h ("10/60s").
_RATE = re.compile(r"^(\d+)(?:/(\d+(?:\.\d+)?)?([smh]))?$")
_WINDOW_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
# An origin as browsers send it: scheme://host[:port], nothing after.
_ORIGIN = re.compile(r"^https?://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?$")
# The dispatcher's own credentials, by variable: never handed down to a bot (a local bot
# inherits the dispatcher's environment less these). The reader refuses to read a secret that
# is not listed here, so that a new one cannot be forgotten. DATABASE_URL may carry a password,
# DISPATCHER_AUTH says how callers are checked.
DISPATCHER_SECRETS = frozenset(
    {
        "FLY_API_TOKEN",
        "DAILY_API_KEY",
        "DAILY_WEBHOOK_SECRET",
        "JWT_SECRET",
        "DATABASE_URL",
        "DISPATCHER_AUTH",
    }
)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Secret:
    """A secret string that never shows in `repr`, `str` or logs; `reveal()` gives the value."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        """The secret value, for the one place that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


@dataclass(frozen=True)
class Rate:
    """At most `count` starts per `window_s` seconds: a token bucket of `count` tokens that
    refills at `count / window_s` a second."""

    count: int
    window_s: float


class EnvReader:
    """Reads typed values from the environment, raising ConfigError that names the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def _secret_text(self, name: str) -> str | None:
        if name not in DISPATCHER_SECRETS:
            raise AssertionError(f"{name} is read as a secret: list it in DISPATCHER_SECRETS")
        return self.text(name)

    def secret(self, name: str) -> Secret | None:
        value = self._secret_text(name)
        return Secret(value) if value else None

    def base64_secret(self, name: str, *, min_bytes: int) -> Secret | None:
        """A secret given in base64 (missing padding tolerated), of at least `min_bytes`."""
        value = self._secret_text(name)
        if value is None:
            return None
        try:
            key = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
        except ValueError:
            raise ConfigError(f"{name} must be base64 (as Daily gives it)") from None
        if len(key) < min_bytes:
            raise ConfigError(
                f"{name} must decode to at least {min_bytes} bytes (openssl rand -base64 32)"
            )
        return Secret(value)

    def _parse(self, name: str, default: T, parse: Callable[[str], T], what: str) -> T:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except ValueError:
            raise ConfigError(f"{name} must be {what}, got {raw!r}") from None

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self._parse(name, default, int, "an integer")
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def optional_integer(self, name: str, low: int, high: int) -> int | None:
        if self.text(name) is None:
            return None
        return self.integer(name, low, low, high)

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self._parse(name, default, float, "a number")
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = (self.text(name) or default).lower()
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def optional(self, name: str, pattern: re.Pattern[str], what: str) -> str | None:
        value = self.text(name)
        if value is not None and not pattern.match(value):
            raise ConfigError(f"{name} must be {what}, got {value!r}")
        return value

    def url(self, name: str, default: T) -> str | T:
        value = self.text(name)
        if value is None:
            return default
        if not re.match(r"^https?://[^/\s]+", value):
            raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    def regions(self, name: str) -> tuple[str, ...]:
        raw = self.text(name)
        if raw is None:
            return ()
        regions = tuple(part.strip() for part in raw.split(",") if part.strip())
        bad = [r for r in regions if not _REGION.match(r)]
        if bad or not regions:
            raise ConfigError(f"{name} must be a comma list of Fly region codes, got {raw!r}")
        return regions

    def ice_servers(
        self, name: str, default: tuple[str, ...] = (), *, off: str | None = None
    ) -> tuple[str, ...]:
        """A comma list of stun: URLs; `off` (when given) alone means none."""
        raw = self.text(name)
        if raw is None:
            return default
        if off is not None and raw.lower() == off:
            return ()
        urls = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
        if not urls or not all(_STUN.match(u) for u in urls):
            also = f" or {off}" if off else ""
            raise ConfigError(f"{name} must be a comma list of stun: URLs{also}, got {raw!r}")
        return urls

    def rate(self, name: str, default: Rate | None) -> Rate | None:
        """`<count>[/<window>]`, a window of 1 s to 24 h; 0 turns the limit off."""
        raw = self.text(name)
        if raw is None:
            return default
        match = _RATE.match(raw.replace(" ", "").lower())
        if not match:
            raise ConfigError(
                f"{name} must be <count> (a minute) or <count>/<window> such as 10/60s, 10/1m "
                f"or 100/1h (0 turns it off), got {raw!r}"
            )
        count = int(match[1])
        window = float(match[2] or 1) * _WINDOW_UNITS[match[3] or "m"]
        if not 0 <= count <= 1_000_000 or not 1 <= window <= 86400:
            raise ConfigError(
                f"{name} must count 0 to 1000000 starts in a window of 1 s to 24 h, got {raw!r}"
            )
        return Rate(count, window) if count else None

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() not in _TRUE + _FALSE:
            raise ConfigError(f"{name} must be true or false, got {raw!r}")
        return raw.lower() in _TRUE

    def origins(self, name: str) -> tuple[str, ...]:
        raw = self.text(name)
        if raw is None:
            return ()
        origins = tuple(dict.fromkeys(o.strip().lower() for o in raw.split(",") if o.strip()))
        if origins == ("*",):
            return origins
        if not origins or not all(_ORIGIN.match(o) for o in origins):
            raise ConfigError(
                f"{name} must be * or a comma list of origins (scheme://host[:port], no path or "
                f"trailing slash), got {raw!r}"
            )
        return origins

    def algorithms(
        self, name: str, default: tuple[str, ...], allowed: tuple[str, ...]
    ) -> tuple[str, ...]:
        raw = self.text(name)
        if raw is None:
            return default
        algorithms = tuple(dict.fromkeys(a.strip() for a in raw.split(",") if a.strip()))
        bad = [a for a in algorithms if a not in allowed]
        if bad or not algorithms:
            choices = ", ".join(allowed)
            raise ConfigError(f"{name} must be a comma list of {choices}, got {raw!r}")
        return algorithms

    def database_url(self, name: str, default: str) -> str:
        value = self._secret_text(name) or default
        scheme = value.split(":", 1)[0]
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ConfigError(f"{name} must be a sqlite:/// or postgresql:// URL, got {scheme!r}")
        return value
