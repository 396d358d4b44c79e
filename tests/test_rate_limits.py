"""Rate limits on POST /start: per user and per client address, counted in the store (shared by
every instance on one PostgreSQL database), refused with 429 `rate-limited` and Retry-After
before anything is created."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dispatcher.config import Rate, Settings
from dispatcher.errors import ConfigError, RetryLater, http_status
from dispatcher.ratelimit import StartLimiter, client_address
from dispatcher.store import Store
from testkit.harness import JWT_SECRET, Stack, dispatcher_stack
from testkit.waits import eventually
from tests.test_instances import two_instances

# Each test turns on the limit it is about; the session caps stay out of the way.
BASE = {"START_RATE_PER_USER": "0", "START_RATE_PER_IP": "0", "MAX_SESSIONS_PER_USER": "100"}


# -- settings ---------------------------------------------------------------------------------


def test_rates_parse_with_defaults_and_zero_turns_a_limit_off() -> None:
    """Defaults 10 a minute per user and 30 per address; `<count>` is a minute, `/<n><unit>`
    a window in s, m or h; 0 turns the limit off."""
    s = Settings.from_env({})
    assert s.start_rate_per_user == Rate(10, 60.0)
    assert s.start_rate_per_ip == Rate(30, 60.0)
    cases = {"5": Rate(5, 60), "2/6s": Rate(2, 6), "100/1h": Rate(100, 3600), "3/m": Rate(3, 60)}
    for raw, rate in cases.items():
        assert Settings.from_env({"START_RATE_PER_USER": raw}).start_rate_per_user == rate
    off = Settings.from_env({"START_RATE_PER_USER": "0", "START_RATE_PER_IP": "0/1s"})
    assert off.start_rate_per_user is None and off.start_rate_per_ip is None
    with pytest.raises(ConfigError, match="START_RATE_PER_IP"):
        Settings.from_env({"START_RATE_PER_IP": "10/2d"})


def test_proxy_headers_are_trusted_by_default_in_fly_mode_only() -> None:
    """TRUST_PROXY_HEADERS defaults to on with the fly backend (Fly's proxy sets
    Fly-Client-IP), off with local bots; either way it can be set."""
    fly = {
        "FLY_API_TOKEN": "fm2_x",
        "FLY_BOT_APP": "my-bots",
        "BOT_IMAGE": "registry.fly.io/my-bots:v1",
        "DISPATCHER_URL": "http://d.internal:7860",
        "JWT_SECRET": JWT_SECRET,
        "DAILY_API_KEY": "k",
    }
    assert Settings.from_env(fly).trust_proxy_headers is True
    assert Settings.from_env(fly | {"TRUST_PROXY_HEADERS": "false"}).trust_proxy_headers is False
    assert Settings.from_env({}).trust_proxy_headers is False
    assert Settings.from_env({"TRUST_PROXY_HEADERS": "on"}).trust_proxy_headers is True


# -- the client address -----------------------------------------------------------------------


def test_client_address_is_the_peer_unless_proxy_headers_are_trusted() -> None:
    """Untrusted, the headers are ignored (a client cannot pick its own address); trusted,
    Fly-Client-IP wins, then the first X-Forwarded-For entry, then the peer."""
    spoof = {"fly-client-ip": "203.0.113.9", "x-forwarded-for": "198.51.100.1, 10.0.0.2"}
    assert client_address("10.1.2.3", spoof, trust_proxy=False) == "10.1.2.3"
    assert client_address("10.1.2.3", spoof, trust_proxy=True) == "203.0.113.9"
    forwarded = {"x-forwarded-for": "198.51.100.1, 10.0.0.2"}
    assert client_address("10.1.2.3", forwarded, trust_proxy=True) == "198.51.100.1"
    assert client_address("10.1.2.3", {}, trust_proxy=True) == "10.1.2.3"
    garbage = {"fly-client-ip": "not-an-ip", "x-forwarded-for": "unknown"}
    assert client_address("10.1.2.3", garbage, trust_proxy=True) == "10.1.2.3"
    assert client_address(None, {}, trust_proxy=False) is None


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    """Two addresses of one /64 are one client; an IPv4-mapped address is its IPv4."""
    one = client_address("2001:db8:1:2::1", {}, trust_proxy=False)
    other = client_address("2001:db8:1:2:ffff::7", {}, trust_proxy=False)
    assert one == other == "2001:db8:1:2::/64"
    assert client_address("2001:db8:1:3::1", {}, trust_proxy=False) != one
    assert client_address("::ffff:192.0.2.7", {}, trust_proxy=False) == "192.0.2.7"
    fly = {"fly-client-ip": "2001:db8:9::5"}
    assert client_address("fdaa::1", fly, trust_proxy=True) == "2001:db8:9::/64"


# -- the buckets in the store -----------------------------------------------------------------


async def test_a_bucket_holds_count_tokens_refilled_over_the_window(store: Store) -> None:
    """3 per 60 s: three starts at once, the fourth refused with the 20 s until the next
    token (a refused take takes nothing); 20 s later one more, then refused again."""
    now = 1_000_000.0
    bucket = [("k", 20.0, 60.0)]
    assert [await store.take_tokens(bucket, now) for _ in range(3)] == [{}, {}, {}]
    assert await store.take_tokens(bucket, now) == {"k": pytest.approx(20.0)}
    assert await store.take_tokens(bucket, now + 5) == {"k": pytest.approx(15.0)}
    assert await store.take_tokens(bucket, now + 20) == {}
    assert await store.take_tokens(bucket, now + 20) == {"k": pytest.approx(20.0)}


async def test_a_start_takes_from_both_buckets_or_neither(store: Store) -> None:
    """With the address bucket empty, the user's token is not taken either."""
    now = 1_000_000.0
    user, address = ("user:a", 30.0, 60.0), ("ip:x", 60.0, 60.0)
    assert await store.take_tokens([user, address], now) == {}
    assert await store.take_tokens([user, address], now) == {"ip:x": pytest.approx(60.0)}
    # The user's second token is still there (the refused start took none).
    assert await store.take_tokens([user], now) == {}
    assert await store.take_tokens([user], now) == {"user:a": pytest.approx(30.0)}


async def test_buckets_full_again_are_purged(store: Store) -> None:
    """Purging forgets only the buckets that are full again (as good as never used)."""
    now = 1_000_000.0
    await store.take_tokens([("short", 1.0, 10.0)], now)
    await store.take_tokens([("long", 100.0, 100.0)], now)
    assert await store.purge_tokens(now=now + 50) == 1
    assert await store.take_tokens([("long", 100.0, 100.0)], now + 50) == {
        "long": pytest.approx(50.0)
    }
    assert await store.purge_tokens(now=now + 100) == 1


async def test_concurrent_takes_never_exceed_the_bucket(pg_store: Store) -> None:
    """PostgreSQL: 30 takes at once from a bucket of 5, each on its own connection:
    exactly 5 succeed."""
    now = 1_000_000.0
    results = await asyncio.gather(
        *(pg_store.take_tokens([("hot", 12.0, 60.0)], now) for _ in range(30))
    )
    assert sum(1 for r in results if not r) == 5


async def test_the_limiter_raises_429_rate_limited_with_retry_after(tmp_path: Path) -> None:
    """Past a limit: RetryLater, HTTP 429, code rate-limited, Retry-After in whole seconds
    (rounded up) naming which limit; without auth only the address counts."""
    store = await Store.open(f"sqlite:///{tmp_path}/limits.db")
    try:
        settings = Settings.from_env(
            {"JWT_SECRET": JWT_SECRET, "START_RATE_PER_USER": "1/90s", "START_RATE_PER_IP": "0"}
        )
        limiter = StartLimiter(store, settings, clock=lambda: 1_000_000.0)
        await limiter.check("alice", "192.0.2.1")
        with pytest.raises(RetryLater) as refused:
            await limiter.check("alice", "192.0.2.2")
        assert http_status(refused.value) == 429 and refused.value.code == "rate-limited"
        assert refused.value.headers() == {"Retry-After": "90"}
        assert "user" in refused.value.detail
        await limiter.check("bob", "192.0.2.1")

        anonymous = StartLimiter(
            store, Settings.from_env({"START_RATE_PER_IP": "1/1h"}), clock=lambda: 1_000_000.0
        )
        await anonymous.check("anonymous", "192.0.2.3")
        await anonymous.check("anonymous", "192.0.2.4")
        with pytest.raises(RetryLater, match="client address"):
            await anonymous.check("anonymous", "192.0.2.3")
    finally:
        await store.close()


# -- a dispatcher with its emulators ----------------------------------------------------------


@contextlib.asynccontextmanager
async def limited(tmp_path: Path, **env: str) -> AsyncIterator[Stack]:
    """A dispatcher on the Fly and Daily emulators with these limits; on the way out every
    session still active is deleted and waited for until it has ended."""
    async with dispatcher_stack(tmp_path, env=BASE | env) as stack:
        store = await Store.open(f"sqlite:///{tmp_path}/dispatcher.db")
        try:
            yield stack
            for session in await store.active_sessions():
                answer = await stack.http.delete(
                    f"/sessions/{session.id}", headers=stack.headers(session.user_id)
                )
                assert answer.status_code == 202, answer.text
            for session in await store.list_sessions(limit=1000):
                await stack.wait_state(session.id, "ended", "failed", user=session.user_id)
        finally:
            await store.close()


def made(stack: Stack) -> tuple[int, int]:
    """How many machines Fly and rooms Daily were ever asked to create."""
    assert stack.fly is not None and stack.daily is not None
    rooms = [r for r in stack.daily.requests if r.method == "POST" and r.path == "/rooms"]
    return len(stack.fly.machines), len(rooms)


def assert_rate_limited(answer: httpx.Response, *, at_most_s: int) -> None:
    assert answer.status_code == 429, answer.text
    assert answer.json()["code"] == "rate-limited", answer.text
    assert 1 <= int(answer.headers["retry-after"]) <= at_most_s


async def test_past_the_per_user_limit_start_is_429_and_nothing_is_created(
    tmp_path: Path,
) -> None:
    """START_RATE_PER_USER=2/1h: a user's third start is 429 rate-limited with Retry-After
    (up to 30 min, one token's refill), before any session row, machine or room exists;
    another user starts at once."""
    async with limited(tmp_path, START_RATE_PER_USER="2/1h") as stack:
        for _ in range(2):
            answer = await stack.start(user="alice")
            assert answer.status_code == 200, answer.text
        before = made(stack)
        assert before == (2, 2)
        store = await Store.open(f"sqlite:///{tmp_path}/dispatcher.db")
        try:
            for _ in range(3):
                assert_rate_limited(await stack.start(user="alice"), at_most_s=1800)
            assert made(stack) == before
            assert len(await store.list_sessions(user="alice")) == 2
        finally:
            await store.close()

        other = await stack.start(user="bob")
        assert other.status_code == 200, other.text
        assert made(stack) == (3, 3)


async def test_the_per_address_limit_counts_every_user_of_one_address(tmp_path: Path) -> None:
    """START_RATE_PER_IP=2/1h, no per-user limit: two users from one address start, a third
    user from it is refused (429 rate-limited) and nothing is made for it."""
    async with limited(tmp_path, START_RATE_PER_IP="2/1h") as stack:
        for user in ("u1", "u2"):
            answer = await stack.start(user=user)
            assert answer.status_code == 200, answer.text
        assert_rate_limited(await stack.start(user="u3"), at_most_s=1800)
        assert made(stack) == (2, 2)


async def test_trusted_proxy_headers_name_the_client(tmp_path: Path) -> None:
    """TRUST_PROXY_HEADERS=true (the default in fly mode): each Fly-Client-IP (else the first
    X-Forwarded-For entry) is a client of its own with its own limit."""
    async with limited(tmp_path, START_RATE_PER_IP="1/1h", TRUST_PROXY_HEADERS="true") as stack:

        async def start(user: str, **extra: str) -> httpx.Response:
            return await stack.http.post(
                "/start", json={"createDailyRoom": True}, headers=stack.headers(user) | extra
            )

        assert (await start("u1", **{"Fly-Client-IP": "203.0.113.1"})).status_code == 200
        assert_rate_limited(await start("u2", **{"Fly-Client-IP": "203.0.113.1"}), at_most_s=3600)
        assert (await start("u3", **{"Fly-Client-IP": "203.0.113.2"})).status_code == 200
        forwarded = {"X-Forwarded-For": "198.51.100.7, 10.0.0.1"}
        assert (await start("u4", **forwarded)).status_code == 200
        assert_rate_limited(
            await start("u5", **{"X-Forwarded-For": "198.51.100.7"}), at_most_s=3600
        )
        assert made(stack) == (3, 3)


async def test_untrusted_proxy_headers_do_not_escape_the_limit(tmp_path: Path) -> None:
    """TRUST_PROXY_HEADERS=false: a client sending a new Fly-Client-IP or X-Forwarded-For on
    each start is still counted by its own (peer) address."""
    async with limited(tmp_path, START_RATE_PER_IP="1/1h", TRUST_PROXY_HEADERS="false") as stack:
        first = await stack.http.post(
            "/start",
            json={"createDailyRoom": True},
            headers=stack.headers("u1") | {"Fly-Client-IP": "203.0.113.1"},
        )
        assert first.status_code == 200, first.text
        for n, header in enumerate(("Fly-Client-IP", "X-Forwarded-For")):
            spoofed = await stack.http.post(
                "/start",
                json={"createDailyRoom": True},
                headers=stack.headers(f"u{n + 2}") | {header: f"203.0.113.{n + 50}"},
            )
            assert_rate_limited(spoofed, at_most_s=3600)
        assert made(stack) == (1, 1)


@pytest.mark.slow
async def test_starts_are_allowed_again_once_a_token_is_back(tmp_path: Path) -> None:
    """START_RATE_PER_USER=2/6s (a token every 3 s): three starts at once, two accepted and
    one refused with Retry-After of at most 3 s; retried until accepted, it gets through."""
    async with limited(tmp_path, START_RATE_PER_USER="2/6s") as stack:
        answers = await asyncio.gather(*(stack.start(user="alice") for _ in range(3)))
        assert sorted(a.status_code for a in answers) == [200, 200, 429], [a.text for a in answers]
        refused = next(a for a in answers if a.status_code == 429)
        assert_rate_limited(refused, at_most_s=3)
        assert made(stack) == (2, 2)

        accepted: list[httpx.Response] = []

        async def allowed_again() -> bool:
            answer = await stack.start(user="alice")
            if answer.status_code == 200:
                accepted.append(answer)
                return True
            assert_rate_limited(answer, at_most_s=3)
            return False

        await eventually(allowed_again, timeout=20, what="a start accepted again", interval=0.2)
        assert made(stack) == (3, 3)


# -- several instances ------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_per_user_limit_holds_across_two_instances(
    tmp_path: Path, pg_database_url: str
) -> None:
    """Two dispatcher processes on one PostgreSQL database, START_RATE_PER_USER=3/1h: a
    user's starts split between them are counted together (the fourth is refused on either);
    eight concurrent starts of another user, four on each, leave exactly three sessions and
    three machines."""
    env = BASE | {"START_RATE_PER_USER": "3/1h"}
    async with two_instances(tmp_path, pg_database_url, **env) as pair:
        a, b = pair.a, pair.b
        await a.started("alice")
        await b.started("alice")
        await a.started("alice")
        for instance in (a, b):
            assert_rate_limited(await instance.start("alice"), at_most_s=1200)
        assert len(await pair.store.list_sessions(user="alice")) == 3
        await b.started("bob")

        answers = await asyncio.gather(*((a, b)[i % 2].start("carol") for i in range(8)))
        assert sorted(x.status_code for x in answers) == [200] * 3 + [429] * 5, [
            x.text for x in answers
        ]
        for answer in answers:
            if answer.status_code == 429:
                assert answer.json()["code"] == "rate-limited"
        assert len(await pair.store.list_sessions(user="carol")) == 3
        carol = [m for m in pair.fly.machines.values() if m.metadata["user"] == "carol"]
        assert len(carol) == 3
