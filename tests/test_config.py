"""Settings: defaults, validation that names the variable, secrets kept out of repr."""

from __future__ import annotations

import pytest

from dispatcher.config import Settings, image_is_pinned
from dispatcher.errors import ConfigError
from testkit.harness import JWT_SECRET

FLY = {
    "FLY_API_TOKEN": "fm2_secret-token",
    "FLY_BOT_APP": "my-bots",
    "BOT_IMAGE": "registry.fly.io/my-bots:deployment-01J",
    "DISPATCHER_URL": "http://my-dispatcher.internal:7860",
    "JWT_SECRET": JWT_SECRET,
    "DAILY_API_KEY": "daily-key",
}


def test_no_credentials_means_local_without_auth() -> None:
    """With an empty environment the dispatcher runs the local backend, no auth, SQLite."""
    s = Settings.from_env({})
    assert s.machine_backend == "local"
    assert s.auth == "none"
    assert s.transports == ("webrtc",) and s.default_transport == "webrtc"
    assert s.database_url.startswith("sqlite:///")


def test_fly_token_selects_fly_and_jwt() -> None:
    """FLY_API_TOKEN switches to the fly backend, where auth defaults to jwt."""
    s = Settings.from_env(FLY)
    assert s.machine_backend == "fly"
    assert s.auth == "jwt"
    assert s.fly_bot_app == "my-bots"
    assert s.transports == ("daily",) and s.default_transport == "daily"


def test_the_follow_watches_every_10_s_on_fly_and_every_second_locally() -> None:
    """FOLLOW_INTERVAL_S defaults to 10 s with Fly (its list calls are rate-limited) and to 1 s
    with local bots (a look at child processes costs nothing); either can be set."""
    assert Settings.from_env(FLY).follow_interval_s == 10.0
    assert Settings.from_env({}).follow_interval_s == 1.0
    assert Settings.from_env(FLY | {"FOLLOW_INTERVAL_S": "2.5"}).follow_interval_s == 2.5


def test_local_mode_with_a_daily_key_offers_both_transports() -> None:
    """Local bots can join Daily rooms when a key is set; webrtc stays available."""
    s = Settings.from_env({"DAILY_API_KEY": "daily-key"})
    assert s.transports == ("daily", "webrtc") and s.default_transport == "daily"


def test_ice_servers_are_stun_urls() -> None:
    """ICE_SERVERS is a comma list of stun: URLs; anything else names the variable."""
    s = Settings.from_env({"ICE_SERVERS": "stun:stun.example.org:3478, stun:other.example"})
    assert s.ice_servers == ("stun:stun.example.org:3478", "stun:other.example")
    for bad in ("turn:user@relay", "http://stun.example.org", ","):
        with pytest.raises(ConfigError, match="ICE_SERVERS"):
            Settings.from_env({"ICE_SERVERS": bad})


def test_default_ice_servers_are_stun_urls_or_none() -> None:
    """DEFAULT_ICE_SERVERS defaults to Google's public STUN server (Pipecat's runner's), takes a
    comma list of stun: URLs or `none`; anything else names the variable."""
    assert Settings.from_env({}).default_ice_servers == ("stun:stun.l.google.com:19302",)
    s = Settings.from_env({"DEFAULT_ICE_SERVERS": "stun:a.example:3478, stuns:b.example"})
    assert s.default_ice_servers == ("stun:a.example:3478", "stuns:b.example")
    assert Settings.from_env({"DEFAULT_ICE_SERVERS": "none"}).default_ice_servers == ()
    for bad in ("turn:user@relay", "https://stun.example.org", ",", "none, stun:a.example"):
        with pytest.raises(ConfigError, match="DEFAULT_ICE_SERVERS"):
            Settings.from_env({"DEFAULT_ICE_SERVERS": bad})


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("FLY_BOT_APP", "FLY_BOT_APP"),
        ("BOT_IMAGE", "BOT_IMAGE"),
        ("DISPATCHER_URL", "DISPATCHER_URL"),
        ("JWT_SECRET", "JWT_SECRET"),
        ("DAILY_API_KEY", "DAILY_API_KEY"),
    ],
)
def test_fly_mode_requires(missing: str, named: str) -> None:
    """In fly mode each required variable, when missing, stops start-up with its name."""
    env = {k: v for k, v in FLY.items() if k != missing}
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


def test_explicit_auth_none_is_allowed_in_fly_mode() -> None:
    """DISPATCHER_AUTH=none set explicitly lets fly mode start without JWT_SECRET."""
    env = {k: v for k, v in FLY.items() if k != "JWT_SECRET"} | {"DISPATCHER_AUTH": "none"}
    s = Settings.from_env(env)
    assert s.auth == "none" and s.auth_explicit


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BOT_CPUS", "two"),
        ("BOT_MEMORY_MB", "1000"),
        ("BOT_MEMORY_MB", "-256"),
        ("MAX_SESSIONS", "0"),
        ("MAX_SESSIONS_PER_USER", "0"),
        ("FLY_CREATE_RATE", "0"),
        ("FLY_CREATE_BURST", "1.5"),
        ("CREATE_QUEUE_WAIT_S", "-1"),
        ("DRAIN_TIMEOUT_S", "forever"),
        ("RECONCILE_INTERVAL_S", "0"),
        ("FOLLOW_INTERVAL_S", "0"),
        ("FOLLOW_INTERVAL_S", "601"),
        ("START_TIMEOUT_S", "0.5"),
        ("READY_TIMEOUT_S", "soon"),
        ("SESSION_MAX_DURATION_S", "1.5"),
        ("BOT_CPU_KIND", "huge"),
        ("FLY_REGION", "iad,Chicago"),
        ("FLY_API_BASE_URL", "ftp://x"),
        ("DAILY_API_URL", "api.daily.co"),
        ("DATABASE_URL", "mysql://x"),
        ("DISPATCHER_AUTH", "maybe"),
        ("FLY_BOT_APP", "Bad_App"),
        ("JWT_SECRET", "short"),
        ("START_RATE_PER_USER", "ten"),
        ("START_RATE_PER_USER", "10/60"),
        ("START_RATE_PER_USER", "-1"),
        ("START_RATE_PER_IP", "5/0s"),
        ("START_RATE_PER_IP", "30/2d"),
        ("TRUST_PROXY_HEADERS", "maybe"),
        ("CORS_ORIGINS", "https://app.example.com/"),
        ("CORS_ORIGINS", "app.example.com"),
        ("CORS_ORIGINS", "*, https://app.example.com"),
        ("POOL_SIZE", "-1"),
        ("POOL_SIZE", "101"),
        ("POOL_MODE", "suspended"),  # local mode: bot processes wait running
        ("POOL_MODE", "paused"),
        ("POOL_INTERVAL_S", "0"),
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "loud"),
        ("TRACE_USER_IDS", "maybe"),
    ],
)
def test_malformed_value_names_variable(name: str, value: str) -> None:
    """A malformed value stops start-up with a message naming the variable."""
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_unpinned_image_is_refused() -> None:
    """BOT_IMAGE must name one build: a digest or a tag other than latest."""
    with pytest.raises(ConfigError, match="BOT_IMAGE must be pinned"):
        Settings.from_env(FLY | {"BOT_IMAGE": "registry.fly.io/my-bots:latest"})
    assert image_is_pinned("registry.fly.io/my-bots@sha256:" + "a" * 64)
    assert not image_is_pinned("registry.fly.io/my-bots")
    assert not image_is_pinned("localhost:5000/bots")


def test_regions_are_a_list_in_order() -> None:
    """FLY_REGION is a comma list kept in order."""
    assert Settings.from_env({"FLY_REGION": "ord, iad,cdg"}).fly_regions == ("ord", "iad", "cdg")


def test_secrets_never_in_repr() -> None:
    """repr and str of the settings show no secret value."""
    s = Settings.from_env(FLY | {"DAILY_API_KEY": "daily-secret-key"})
    text = repr(s) + str(s)
    for secret in ("fm2_secret-token", "daily-secret-key", JWT_SECRET):
        assert secret not in text
    assert s.daily_api_key is not None and s.daily_api_key.reveal() == "daily-secret-key"


def test_no_auth_listens_on_loopback_only() -> None:
    """Without credentials only loopback addresses are allowed; DISPATCHER_URL is filled in."""
    s = Settings.from_env({})
    with pytest.raises(ConfigError, match="loopback"):
        s.listening_on("0.0.0.0", 7860)
    assert s.listening_on("127.0.0.1", 8123).dispatcher_url == "http://127.0.0.1:8123"
    assert s.listening_on("::1", 8123).dispatcher_url == "http://[::1]:8123"
    explicit = Settings.from_env({"DISPATCHER_AUTH": "none"})
    assert explicit.listening_on("0.0.0.0", 7860).dispatcher_url == "http://127.0.0.1:7860"


def test_dispatcher_url_is_kept_when_set() -> None:
    """An explicit DISPATCHER_URL wins over the listening address."""
    s = Settings.from_env(FLY).listening_on("0.0.0.0", 7860)
    assert s.dispatcher_url == "http://my-dispatcher.internal:7860"


def test_internal_port_is_where_bots_call_back() -> None:
    """With INTERNAL_PORT set, the default DISPATCHER_URL points at the internal listener."""
    s = Settings.from_env({"INTERNAL_PORT": "7861"}).listening_on("127.0.0.1", 7860)
    assert s.internal_port == 7861 and s.internal_host == "::"
    assert s.dispatcher_url == "http://127.0.0.1:7861"
    named = Settings.from_env({"INTERNAL_PORT": "7861", "INTERNAL_HOST": "fdaa::3"})
    assert named.listening_on("127.0.0.1", 7860).dispatcher_url == "http://[fdaa::3]:7861"
    with pytest.raises(ConfigError, match="INTERNAL_PORT"):
        Settings.from_env({"INTERNAL_PORT": "7860"}).listening_on("127.0.0.1", 7860)
    with pytest.raises(ConfigError, match="INTERNAL_PORT"):
        Settings.from_env({"INTERNAL_PORT": "seven"})


def test_a_suspended_pool_needs_bots_fly_can_suspend() -> None:
    """Fly suspends machines of at most 2 GB: a bigger bot with POOL_MODE=suspended is refused
    at start-up; 2048 MB, or the stopped mode, is fine."""
    pool = FLY | {"POOL_SIZE": "2", "POOL_MODE": "suspended"}
    with pytest.raises(ConfigError, match="BOT_MEMORY_MB"):
        Settings.from_env(pool | {"BOT_MEMORY_MB": "4096"})
    assert Settings.from_env(pool | {"BOT_MEMORY_MB": "2048"}).pool_mode == "suspended"
    stopped = Settings.from_env(pool | {"POOL_MODE": "stopped", "BOT_MEMORY_MB": "4096"})
    assert (stopped.pool_size, stopped.pool_mode) == (2, "stopped")


def test_the_pool_defaults_per_backend() -> None:
    """Local mode keeps one warm bot process (running, the only local mode) unless POOL_SIZE
    says otherwise; Fly mode has no pool unless asked, stopped by default, and may run it."""
    local = Settings.from_env({})
    assert (local.pool_size, local.pool_mode) == (1, "running")
    assert Settings.from_env({"POOL_SIZE": "0"}).pool_size == 0
    assert Settings.from_env({"POOL_SIZE": "3", "POOL_MODE": "running"}).pool_size == 3
    fly = Settings.from_env(FLY)
    assert (fly.pool_size, fly.pool_mode) == (0, "stopped")
    running = Settings.from_env(FLY | {"POOL_SIZE": "2", "POOL_MODE": "running"})
    assert (running.pool_size, running.pool_mode) == (2, "running")
    with pytest.raises(ConfigError, match="DAILY_API_KEY"):
        Settings.from_env({**FLY, "POOL_SIZE": "1", "DAILY_API_KEY": ""})
