"""Rate limits on `POST /start`: per user and per client address, counted in the store.

Each limit is a token bucket per key (`START_RATE_PER_USER` per JWT `sub`,
`START_RATE_PER_IP` per client address) kept in the store's `rate_buckets` table, so every
instance sharing the database shares the counts. A start takes a token from both of its
buckets or from neither; past either limit it is refused with 429 `rate-limited` and the
seconds until a token is back, before anything is created. A refused start takes no token.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections.abc import Callable, Mapping

from dispatcher.config import Rate, Settings
from dispatcher.errors import ErrorCode, RetryLater
from dispatcher.store import Store

# Set by Fly's proxy to the address it accepted the connection from.
FLY_CLIENT_IP = "fly-client-ip"
FORWARDED_FOR = "x-forwarded-for"
# An IPv6 client is counted by its /64: one host usually holds a whole /64.
IPV6_PREFIX = 64


def client_address(
    peer: str | None, headers: Mapping[str, str], *, trust_proxy: bool
) -> str | None:
    """The client address the IP limit counts: with `trust_proxy`, `Fly-Client-IP`, else the
    first `X-Forwarded-For` entry; else (or when those are absent or malformed) the peer's
    address. IPv6 addresses are reduced to their /64; None when no address is known."""
    candidates = [peer or ""]
    if trust_proxy:
        forwarded = headers.get(FORWARDED_FOR, "").split(",")[0]
        candidates = [headers.get(FLY_CLIENT_IP, ""), forwarded, *candidates]
    for candidate in candidates:
        try:
            address = ipaddress.ip_address(candidate.strip().strip("[]"))
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.ip_network(f"{address}/{IPV6_PREFIX}", strict=False))
        return str(address)
    return None


class StartLimiter:
    """Checks a start against the per-user and per-address limits, taking a token from each."""

    def __init__(
        self, store: Store, settings: Settings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        # Without authentication every caller is the same user: only the address counts.
        self._per_user = settings.start_rate_per_user if settings.auth == "jwt" else None
        self._per_ip = settings.start_rate_per_ip
        self._clock = clock

    async def check(self, user: str, address: str | None) -> None:
        """Take a start's tokens, or raise RetryLater (429 `rate-limited`, Retry-After)."""
        limits: dict[str, tuple[str, Rate]] = {}
        if self._per_user is not None:
            limits[_key("user", user)] = ("user", self._per_user)
        if self._per_ip is not None and address is not None:
            limits[_key("ip", address)] = ("client address", self._per_ip)
        if not limits:
            return
        waits = await self._store.take_tokens(
            ((key, rate.window_s / rate.count, rate.window_s) for key, (_, rate) in limits.items()),
            self._clock(),
        )
        if waits:
            refused = [limits[key] for key in waits]
            what = " and ".join(
                f"this {name} ({rate.count} per {rate.window_s:g} s)" for name, rate in refused
            )
            retry_after = max(1, math.ceil(max(waits.values())))
            raise RetryLater(
                f"too many starts for {what}: retry in {retry_after} s",
                retry_after=retry_after,
                code=ErrorCode.RATE_LIMITED,
            )


def _key(kind: str, value: str) -> str:
    """A bucket's key: the kind and a hash of the user or address (no identifiers stored)."""
    return f"{kind}:{hashlib.sha256(value.encode()).hexdigest()[:40]}"
