"""Settings: one frozen dataclass built once from the environment and validated at start-up."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from dispatcher.env import EnvReader, Rate, Secret
from dispatcher.errors import ConfigError
from dispatcher.logs import LOG_FORMATS, LogFormat

# Secret and Rate are read from the environment (dispatcher/env.py) and are settings' types.
__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_ICE_SERVERS",
    "DEFAULT_PORT",
    "JWT_ALGORITHMS",
    "LOCAL_POOL_SIZE",
    "POOL_MODES",
    "SUSPEND_MAX_MEMORY_MB",
    "AuthMode",
    "MachineBackendName",
    "PoolMode",
    "Rate",
    "Secret",
    "Settings",
    "Transport",
    "image_is_pinned",
    "is_loopback",
]

MachineBackendName = Literal["fly", "local"]
AuthMode = Literal["jwt", "none"]
Transport = Literal["daily", "webrtc"]
PoolMode = Literal["stopped", "suspended", "running"]
POOL_MODES: tuple[PoolMode, ...] = ("stopped", "suspended", "running")
# Local mode keeps a warm bot process ready unless POOL_SIZE says otherwise: `make run` answers
# its first Connect with a loaded bot. Fly mode has no pool unless asked (pool machines cost).
LOCAL_POOL_SIZE = 1
# Fly suspends machines of at most this much memory (docs/reference/fly-machines.md §10).
SUSPEND_MAX_MEMORY_MB = 2048

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# What a webrtc start with `enableDefaultIceServers: true` gets: Pipecat's runner's STUN server.
DEFAULT_ICE_SERVERS = ("stun:stun.l.google.com:19302",)
# FOLLOW_INTERVAL_S with local bots: a look at child processes costs nothing upstream.
LOCAL_FOLLOW_INTERVAL_S = 1.0
_APP = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
# Signature algorithms a client token may use: HMAC with JWT_SECRET, or RSA/ECDSA keys from
# JWT_JWKS_URL. Never `none`, and never an HMAC keyed with a public key.
JWT_ALGORITHMS = ("HS256", "RS256", "ES256")
# The start rate limits unless START_RATE_PER_USER and START_RATE_PER_IP say otherwise.
START_RATE_PER_USER = Rate(10, 60.0)
START_RATE_PER_IP = Rate(30, 60.0)


@dataclass(frozen=True)
class Settings:
    """Every setting of the dispatcher; see docs/configuration.md."""

    machine_backend: MachineBackendName = "local"
    fly_api_token: Secret | None = None
    fly_api_base_url: str = "https://api.machines.dev"
    fly_bot_app: str | None = None
    bot_image: str | None = None
    fly_regions: tuple[str, ...] = ()
    bot_cpu_kind: str = "shared"
    bot_cpus: int = 1
    bot_memory_mb: int = 1024
    bot_stop_timeout_s: int = 10
    daily_api_key: Secret | None = None
    daily_api_url: str = "https://api.daily.co/v1"
    daily_webhook_secret: Secret | None = None
    database_url: str = "sqlite:///dispatcher.db"
    dispatcher_url: str | None = None
    dispatcher_name: str = "dispatcher"
    session_max_duration_s: int = 3600
    ready_timeout_s: float = 90.0
    max_sessions: int = 50
    max_sessions_per_user: int = 3
    fly_create_rate: float = 1.0
    fly_create_burst: int = 3
    create_queue_wait_s: float = 10.0
    drain_timeout_s: float = 30.0
    reconcile_interval_s: float = 15.0
    # Seconds between the follow's sweeps (timers; the leader's batched watch of machines).
    follow_interval_s: float = 10.0
    start_timeout_s: float = 120.0
    instance_id: str = "local"
    jwt_secret: Secret | None = None
    jwt_jwks_url: str | None = None
    jwt_algorithms: tuple[str, ...] = ()
    jwt_admin_role: str = "admin"
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    auth: AuthMode = "none"
    auth_explicit: bool = False
    local_bot_dir: str | None = None
    ice_servers: tuple[str, ...] = ()
    default_ice_servers: tuple[str, ...] = DEFAULT_ICE_SERVERS
    internal_port: int | None = None
    internal_host: str = "::"
    start_rate_per_user: Rate | None = START_RATE_PER_USER
    start_rate_per_ip: Rate | None = START_RATE_PER_IP
    trust_proxy_headers: bool = False
    cors_origins: tuple[str, ...] = ()
    # The warm pool: machines per region (local: bot processes) made ahead of sessions, kept
    # stopped, suspended or running (local: running only).
    pool_size: int = 0
    pool_mode: PoolMode = "stopped"
    pool_interval_s: float = 2.0
    # A pool machine whose session ended is stopped and returned to the pool (its POOL_TOKEN
    # rotated) rather than destroyed (Fly only).
    pool_recycle: bool = False
    # Daily rooms kept made ahead of sessions (dispatcher/rooms/stock.py); 0: each start makes
    # its room.
    daily_room_stock: int = 0
    log_level: str = "INFO"
    log_format: LogFormat = "json"
    # Spans carry users' ids as they are (else a hash of each).
    trace_user_ids: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build and validate the settings; a bad value raises ConfigError naming its variable."""
        r = EnvReader(env)
        fly_token = r.secret("FLY_API_TOKEN")
        backend = r.choice("MACHINE_BACKEND", ("fly", "local"), "fly" if fly_token else "local")
        jwt_secret = r.secret("JWT_SECRET")
        jwks_url = r.url("JWT_JWKS_URL", None)
        auth_default = "jwt" if backend == "fly" or jwt_secret or jwks_url else "none"
        auth = r.choice("DISPATCHER_AUTH", ("jwt", "none"), auth_default)
        settings = cls(
            machine_backend=backend,  # type: ignore[arg-type]
            fly_api_token=fly_token,
            fly_api_base_url=r.url("FLY_API_BASE_URL", cls.fly_api_base_url),
            fly_bot_app=r.optional("FLY_BOT_APP", _APP, "a Fly app name"),
            bot_image=r.text("BOT_IMAGE"),
            fly_regions=r.regions("FLY_REGION"),
            bot_cpu_kind=r.choice("BOT_CPU_KIND", ("shared", "performance"), cls.bot_cpu_kind),
            bot_cpus=r.integer("BOT_CPUS", cls.bot_cpus, 1, 16),
            bot_memory_mb=r.integer("BOT_MEMORY_MB", cls.bot_memory_mb, 256, 131072),
            bot_stop_timeout_s=r.integer("BOT_STOP_TIMEOUT_S", cls.bot_stop_timeout_s, 1, 300),
            daily_api_key=r.secret("DAILY_API_KEY"),
            daily_api_url=r.url("DAILY_API_URL", cls.daily_api_url),
            daily_webhook_secret=r.base64_secret("DAILY_WEBHOOK_SECRET", min_bytes=16),
            database_url=r.database_url("DATABASE_URL", cls.database_url),
            dispatcher_url=r.url("DISPATCHER_URL", None),
            dispatcher_name=r.text("DISPATCHER_NAME") or r.text("FLY_APP_NAME") or "dispatcher",
            session_max_duration_s=r.integer(
                "SESSION_MAX_DURATION_S", cls.session_max_duration_s, 1, 86400
            ),
            ready_timeout_s=r.number("READY_TIMEOUT_S", cls.ready_timeout_s, 0.1, 3600),
            max_sessions=r.integer("MAX_SESSIONS", cls.max_sessions, 1, 1_000_000),
            max_sessions_per_user=r.integer(
                "MAX_SESSIONS_PER_USER", cls.max_sessions_per_user, 1, 1_000_000
            ),
            fly_create_rate=r.number("FLY_CREATE_RATE", cls.fly_create_rate, 0.01, 1000),
            fly_create_burst=r.integer("FLY_CREATE_BURST", cls.fly_create_burst, 1, 1000),
            create_queue_wait_s=r.number("CREATE_QUEUE_WAIT_S", cls.create_queue_wait_s, 0, 120),
            drain_timeout_s=r.number("DRAIN_TIMEOUT_S", cls.drain_timeout_s, 0, 3600),
            reconcile_interval_s=r.number(
                "RECONCILE_INTERVAL_S", cls.reconcile_interval_s, 0.1, 3600
            ),
            follow_interval_s=r.number(
                "FOLLOW_INTERVAL_S",
                cls.follow_interval_s if backend == "fly" else LOCAL_FOLLOW_INTERVAL_S,
                0.1,
                600,
            ),
            start_timeout_s=r.number("START_TIMEOUT_S", cls.start_timeout_s, 1, 3600),
            instance_id=r.text("FLY_MACHINE_ID") or f"{socket.gethostname()}-{os.getpid()}",
            jwt_secret=jwt_secret,
            jwt_jwks_url=jwks_url,
            jwt_admin_role=r.text("JWT_ADMIN_ROLE") or cls.jwt_admin_role,
            jwt_algorithms=r.algorithms(
                "JWT_ALGORITHMS",
                (("HS256",) if jwt_secret else ()) + (("RS256", "ES256") if jwks_url else ()),
                JWT_ALGORITHMS,
            ),
            jwt_audience=r.text("JWT_AUDIENCE"),
            jwt_issuer=r.text("JWT_ISSUER"),
            auth=auth,  # type: ignore[arg-type]
            auth_explicit="DISPATCHER_AUTH" in env,
            local_bot_dir=r.text("LOCAL_BOT_DIR"),
            ice_servers=r.ice_servers("ICE_SERVERS"),
            default_ice_servers=r.ice_servers(
                "DEFAULT_ICE_SERVERS", cls.default_ice_servers, off="none"
            ),
            internal_port=r.optional_integer("INTERNAL_PORT", 1, 65535),
            internal_host=r.text("INTERNAL_HOST") or cls.internal_host,
            start_rate_per_user=r.rate("START_RATE_PER_USER", cls.start_rate_per_user),
            start_rate_per_ip=r.rate("START_RATE_PER_IP", cls.start_rate_per_ip),
            trust_proxy_headers=r.boolean("TRUST_PROXY_HEADERS", backend == "fly"),
            cors_origins=r.origins("CORS_ORIGINS"),
            pool_size=r.integer(
                "POOL_SIZE", LOCAL_POOL_SIZE if backend == "local" else cls.pool_size, 0, 100
            ),
            pool_mode=r.choice(  # type: ignore[arg-type]
                "POOL_MODE", POOL_MODES, "running" if backend == "local" else cls.pool_mode
            ),
            pool_interval_s=r.number("POOL_INTERVAL_S", cls.pool_interval_s, 0.1, 600),
            pool_recycle=r.boolean("POOL_RECYCLE", cls.pool_recycle),
            daily_room_stock=r.integer("DAILY_ROOM_STOCK", cls.daily_room_stock, 0, 1000),
            log_level=r.choice(
                "LOG_LEVEL", ("debug", "info", "warning", "error"), cls.log_level.lower()
            ).upper(),
            log_format=r.choice("LOG_FORMAT", LOG_FORMATS, cls.log_format),  # type: ignore[arg-type]
            trace_user_ids=r.boolean("TRACE_USER_IDS", False),
        )
        settings._check()
        return settings

    def _check(self) -> None:
        if self.machine_backend == "local" and self.pool_mode != "running":
            raise ConfigError(
                f"POOL_MODE={self.pool_mode} needs the fly machine backend: local bot processes "
                "wait running (POOL_MODE=running)"
            )
        if self.pool_recycle and self.machine_backend != "fly":
            raise ConfigError(
                "POOL_RECYCLE needs the fly machine backend: a local bot process that ended is "
                "gone, there is nothing to return to the pool"
            )
        if self.pool_size and self.machine_backend == "fly" and "daily" not in self.transports:
            raise ConfigError(
                "POOL_SIZE needs daily sessions (DAILY_API_KEY): pooled bots join Daily"
            )
        if self.daily_room_stock and "daily" not in self.transports:
            raise ConfigError("DAILY_ROOM_STOCK needs daily sessions (DAILY_API_KEY)")
        if self.pool_mode == "suspended" and self.bot_memory_mb > SUSPEND_MAX_MEMORY_MB:
            raise ConfigError(
                f"POOL_MODE=suspended needs BOT_MEMORY_MB of at most {SUSPEND_MAX_MEMORY_MB} "
                f"(Fly's suspend limit), got {self.bot_memory_mb}"
            )
        if self.bot_memory_mb % 256:
            raise ConfigError(f"BOT_MEMORY_MB must be a multiple of 256, got {self.bot_memory_mb}")
        if self.auth == "jwt" and self.jwt_secret is None and self.jwt_jwks_url is None:
            raise ConfigError(
                "JWT_SECRET or JWT_JWKS_URL is required when DISPATCHER_AUTH is jwt (the default "
                "in fly mode); set DISPATCHER_AUTH=none explicitly to run without authentication"
            )
        if "HS256" in self.jwt_algorithms and self.jwt_secret is None:
            raise ConfigError("JWT_ALGORITHMS has HS256, which needs JWT_SECRET")
        asymmetric = [a for a in self.jwt_algorithms if a != "HS256"]
        if asymmetric and self.jwt_jwks_url is None:
            raise ConfigError(f"JWT_ALGORITHMS has {asymmetric[0]}, which needs JWT_JWKS_URL")
        if self.jwt_secret is not None and len(self.jwt_secret.reveal()) < 32:
            raise ConfigError("JWT_SECRET must be at least 32 characters")
        if self.machine_backend == "fly":
            if "*" in self.cors_origins:
                raise ConfigError(
                    "CORS_ORIGINS must list exact origins in fly mode: '*' is for local mode only"
                )
            if self.fly_api_token is None:
                raise ConfigError("FLY_API_TOKEN is required when MACHINE_BACKEND is fly")
            if not self.fly_bot_app:
                raise ConfigError("FLY_BOT_APP is required when MACHINE_BACKEND is fly")
            if not self.bot_image:
                raise ConfigError("BOT_IMAGE is required when MACHINE_BACKEND is fly")
            if not image_is_pinned(self.bot_image):
                raise ConfigError(
                    f"BOT_IMAGE must be pinned by a digest (@sha256:...) or a tag other than "
                    f"'latest', got {self.bot_image!r}"
                )
            if self.daily_api_key is None:
                raise ConfigError(
                    "DAILY_API_KEY is required when MACHINE_BACKEND is fly (bots on Fly are "
                    "joined through Daily rooms; the webrtc transport is for local bots)"
                )
            if not self.dispatcher_url:
                raise ConfigError(
                    "DISPATCHER_URL is required when MACHINE_BACKEND is fly (how bots reach the "
                    "dispatcher, e.g. http://<dispatcher-app>.internal:7860)"
                )

    @property
    def transports(self) -> tuple[Transport, ...]:
        """The transports sessions can use: Daily when its key is set, webrtc for local bots."""
        daily: tuple[Transport, ...] = ("daily",) if self.daily_api_key is not None else ()
        webrtc: tuple[Transport, ...] = ("webrtc",) if self.machine_backend == "local" else ()
        return daily + webrtc

    @property
    def default_transport(self) -> Transport:
        """The transport of a `/start` that names none: Daily when configured, else webrtc."""
        return self.transports[0] if self.transports else "daily"

    @property
    def roomless_transport(self) -> Transport:
        """The transport of a `/start` with `createDailyRoom: false` that names none: webrtc
        where it is offered (no Daily room, as Pipecat Cloud and the runner answer it), else
        the default, whose room the bot needs (a bot here always has a transport)."""
        return "webrtc" if "webrtc" in self.transports else self.default_transport

    def listening_on(self, host: str, port: int) -> Settings:
        """These settings for a server on host:port: checks the bind, fills DISPATCHER_URL."""
        if self.auth == "none" and not self.auth_explicit and not is_loopback(host):
            raise ConfigError(
                f"refusing to listen on {host} without authentication: with no credentials the "
                "dispatcher listens on loopback only (set JWT_SECRET, or DISPATCHER_AUTH=none "
                "explicitly)"
            )
        if self.internal_port is not None and self.internal_port == port:
            raise ConfigError(f"INTERNAL_PORT must differ from the public port {port}")
        if self.dispatcher_url:
            return self
        if self.internal_port is not None:
            host, port = self.internal_host, self.internal_port
        local = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104
        if ":" in local:
            local = f"[{local}]"
        return dataclasses.replace(self, dispatcher_url=f"http://{local}:{port}")


def image_is_pinned(image: str) -> bool:
    """Whether an image reference names one build: a digest, or a tag that is not `latest`."""
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and not name.endswith(":latest")


def is_loopback(host: str) -> bool:
    """Whether host is a loopback address or localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
