"""CORS: an explicit allowlist of origins (CORS_ORIGINS) on the public routes only; none by
default; `*` only with local bots."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from dispatcher.config import Settings
from dispatcher.errors import ConfigError
from testkit.harness import dispatcher_env, dispatcher_stack
from testkit.procs import DispatcherProcess
from tests.test_config import FLY

APP = "https://app.example.com"
DEV = "http://localhost:3000"
ALLOWED = {"CORS_ORIGINS": f"{APP}, {DEV}"}


def cors_headers(answer: httpx.Response) -> dict[str, str]:
    """The answer's Access-Control-* headers."""
    return {k: v for k, v in answer.headers.items() if k.startswith("access-control-")}


async def preflight(http: httpx.AsyncClient, path: str, origin: str, method: str) -> httpx.Response:
    return await http.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )


def test_cors_origins_are_exact_origins() -> None:
    """A comma list of scheme://host[:port], lower-cased; `*` alone; none by default."""
    assert Settings.from_env({}).cors_origins == ()
    s = Settings.from_env({"CORS_ORIGINS": "https://App.Example.com, http://[::1]:8080"})
    assert s.cors_origins == ("https://app.example.com", "http://[::1]:8080")
    for bad in ("https://app.example.com/", "app.example.com", "https://a.example/x", "null"):
        with pytest.raises(ConfigError, match="CORS_ORIGINS"):
            Settings.from_env({"CORS_ORIGINS": bad})


async def test_no_cors_headers_by_default(tmp_path: Path) -> None:
    """Without CORS_ORIGINS no answer carries a CORS header, and a preflight is simply a
    method the route does not have (405 JSON)."""
    async with dispatcher_stack(tmp_path) as stack:
        answer = await stack.http.post("/start", json={}, headers={"Origin": APP})
        assert answer.status_code == 401
        assert cors_headers(answer) == {}
        missing = await stack.http.get(
            "/sessions/s-0000000000000000", headers=stack.headers() | {"Origin": APP}
        )
        assert missing.status_code == 404 and cors_headers(missing) == {}
        pre = await preflight(stack.http, "/start", APP, "POST")
        assert pre.status_code == 405 and pre.json()["code"] == "method-not-allowed"
        assert cors_headers(pre) == {}


async def test_an_allowed_origin_gets_cors_on_requests_and_preflights(tmp_path: Path) -> None:
    """An allowed origin: preflights answered 204 with the route's own methods and the three
    client headers, no credentials; real answers (a start, a session, an error, a delete)
    carry Access-Control-Allow-Origin for that origin and expose Retry-After."""
    async with dispatcher_stack(tmp_path, env=ALLOWED) as stack:
        pre = await preflight(stack.http, "/start", APP, "POST")
        assert pre.status_code == 204, pre.text
        assert cors_headers(pre) == {
            "access-control-allow-origin": APP,
            "access-control-allow-methods": "POST",
            "access-control-allow-headers": "Authorization, Content-Type, Idempotency-Key",
            "access-control-max-age": "600",
        }
        assert "origin" in pre.headers["vary"].lower()

        started = await stack.http.post(
            "/start", json={"createDailyRoom": True}, headers=stack.headers() | {"Origin": APP}
        )
        assert started.status_code == 200, started.text
        assert started.headers["access-control-allow-origin"] == APP
        assert started.headers["access-control-expose-headers"] == "Retry-After"
        assert "access-control-allow-credentials" not in started.headers
        assert "origin" in started.headers["vary"].lower()
        sid = started.json()["sessionId"]

        session = await preflight(stack.http, f"/sessions/{sid}", DEV, "DELETE")
        assert session.status_code == 204
        assert session.headers["access-control-allow-origin"] == DEV
        assert session.headers["access-control-allow-methods"] == "DELETE, GET"
        offer = await preflight(stack.http, f"/sessions/{sid}/api/offer", APP, "POST")
        assert offer.status_code == 204
        assert offer.headers["access-control-allow-methods"] == "DELETE, GET, PATCH, POST, PUT"

        shown = await stack.http.get(f"/sessions/{sid}", headers=stack.headers() | {"Origin": DEV})
        assert shown.status_code == 200
        assert shown.headers["access-control-allow-origin"] == DEV
        # Errors too, so that the client can read their JSON.
        refused = await stack.http.post("/start", json={}, headers={"Origin": APP})
        assert refused.status_code == 401 and refused.json()["code"] == "missing-credentials"
        assert refused.headers["access-control-allow-origin"] == APP

        deleted = await stack.http.delete(
            f"/sessions/{sid}", headers=stack.headers() | {"Origin": APP}
        )
        assert deleted.status_code == 202
        assert deleted.headers["access-control-allow-origin"] == APP
        await stack.wait_state(sid, "ended")


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "http://app.example.com", "https://app.example.com.evil.io"]
)
async def test_another_origin_gets_no_cors_headers(tmp_path: Path, origin: str) -> None:
    """An origin not listed (another host, another scheme, a suffix trick): its requests are
    answered without any CORS header, and its preflight is 403 origin-not-allowed."""
    async with dispatcher_stack(tmp_path, env=ALLOWED) as stack:
        answer = await stack.http.post("/start", json={}, headers={"Origin": origin})
        assert answer.status_code == 401 and cors_headers(answer) == {}
        pre = await preflight(stack.http, "/start", origin, "POST")
        assert pre.status_code == 403
        assert pre.json()["code"] == "origin-not-allowed"
        assert cors_headers(pre) == {}


async def test_callback_and_health_routes_never_get_cors(tmp_path: Path) -> None:
    """Even for an allowed origin, the bot callbacks and the health routes answer without
    CORS headers, and their preflights are not answered as CORS."""
    async with dispatcher_stack(tmp_path, env=ALLOWED) as stack:
        ready = "/internal/sessions/s-0000000000000000/ready"
        callback = await stack.http.post(ready, headers={"Origin": APP})
        assert callback.status_code == 401 and cors_headers(callback) == {}
        pre = await preflight(stack.http, ready, APP, "POST")
        assert pre.status_code == 405 and cors_headers(pre) == {}
        for path in ("/healthz", "/readyz"):
            answer = await stack.http.get(path, headers={"Origin": APP})
            assert answer.status_code in (200, 503) and cors_headers(answer) == {}


def test_wildcard_is_refused_in_fly_mode() -> None:
    """`*` in fly mode stops start-up, naming CORS_ORIGINS; in local mode it is allowed."""
    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        Settings.from_env(FLY | {"CORS_ORIGINS": "*"})
    assert Settings.from_env({"CORS_ORIGINS": "*"}).cors_origins == ("*",)


async def test_a_fly_dispatcher_with_a_wildcard_does_not_start(tmp_path: Path) -> None:
    """The real process: `*` with the fly backend exits with code 2 and the variable's name."""
    env = dispatcher_env(
        fly_url="http://127.0.0.1:9",
        daily_url="http://127.0.0.1:9",
        dispatcher_url="http://127.0.0.1:9",
        db=f"sqlite:///{tmp_path}/d.db",
    ) | {"CORS_ORIGINS": "*"}
    async with DispatcherProcess(env, tmp_path) as proc:
        with pytest.raises(RuntimeError, match="exited with 2") as failure:
            await proc.start()
        assert "CORS_ORIGINS" in str(failure.value)


async def test_wildcard_in_local_mode_allows_any_origin(tmp_path: Path) -> None:
    """With local bots `*` answers every origin with `Access-Control-Allow-Origin: *`."""
    async with dispatcher_stack(tmp_path, env={"CORS_ORIGINS": "*"}, local=True) as stack:
        pre = await preflight(stack.http, "/start", "http://anything.example:5173", "POST")
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == "*"
        missing = await stack.http.get(
            "/sessions/s-0000000000000000",
            headers=stack.headers() | {"Origin": "http://anything.example:5173"},
        )
        assert missing.status_code == 404
        assert missing.headers["access-control-allow-origin"] == "*"
