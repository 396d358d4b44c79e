"""Client tokens signed by the app's identity provider (JWT_JWKS_URL: RS256, ES256), and the
attacks on them: `alg: none`, HMAC keyed with the public key, bad claims, unknown keys."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dispatcher.auth import JWKS, Authenticator
from dispatcher.config import Settings
from dispatcher.errors import ConfigError, Unauthorized, Unavailable
from testkit.harness import JWT_SECRET, dispatcher_stack
from testkit.net import serve
from testkit.waits import eventually

AUDIENCE, ISSUER = "dispatcher", "https://idp.example"
MAX_AGE_S, MIN_REFRESH_S = 600.0, 10.0


@dataclass
class IdP:
    """An identity provider: signing keys, and the JWKS document it serves."""

    rsa_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    ec_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    published: list[dict[str, Any]] = field(default_factory=list)
    fetches: int = 0
    down: bool = False
    url: str = ""

    def __post_init__(self) -> None:
        self.publish("rsa-1", self.rsa_key)
        self.publish("ec-1", self.ec_key)

    def publish(self, kid: str, key: Any) -> None:
        """Add a key's public half to the JWKS document."""
        public = key.public_key()
        algorithm = RSAAlgorithm if isinstance(public, rsa.RSAPublicKey) else ECAlgorithm
        jwk = json.loads(algorithm.to_jwk(public))
        alg = "RS256" if isinstance(public, rsa.RSAPublicKey) else "ES256"
        self.published.append(jwk | {"kid": kid, "use": "sig", "alg": alg})

    def token(
        self, *, alg: str = "RS256", kid: str | None = "rsa-1", key: Any = None, **claims: Any
    ) -> str:
        """A token signed by this provider (override the key, kid or claims to attack)."""
        now = int(time.time())
        payload = {"sub": "user-1", "exp": now + 300, "aud": AUDIENCE, "iss": ISSUER} | claims
        payload = {k: v for k, v in payload.items() if v is not None}
        signing = key if key is not None else (self.rsa_key if alg == "RS256" else self.ec_key)
        headers = {"kid": kid} if kid is not None else {}
        return jwt.encode(payload, signing, algorithm=alg, headers=headers)

    def app(self) -> Starlette:
        async def jwks(request: Request) -> Response:
            self.fetches += 1
            if self.down:
                return JSONResponse({"error": "down"}, status_code=503)
            return JSONResponse({"keys": self.published})

        return Starlette(routes=[Route("/.well-known/jwks.json", jwks)])


@pytest.fixture
async def idp() -> AsyncIterator[IdP]:
    provider = IdP()
    async with serve(provider.app()) as url:
        provider.url = f"{url}/.well-known/jwks.json"
        yield provider


@pytest.fixture
async def authn(idp: IdP) -> AsyncIterator[Authenticator]:
    settings = Settings.from_env(
        {"JWT_JWKS_URL": idp.url, "JWT_AUDIENCE": AUDIENCE, "JWT_ISSUER": ISSUER}
    )
    authenticator = Authenticator(settings)
    yield authenticator
    await authenticator.aclose()


@dataclass
class Clock:
    """A monotonic clock the test moves by hand."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def timed(idp: IdP) -> AsyncIterator[tuple[Authenticator, Clock]]:
    """An authenticator whose key set runs on a hand-moved clock: kept MAX_AGE_S, fetched again
    for an unknown key id at most every MIN_REFRESH_S."""
    clock = Clock()
    settings = Settings.from_env(
        {"JWT_JWKS_URL": idp.url, "JWT_AUDIENCE": AUDIENCE, "JWT_ISSUER": ISSUER}
    )
    async with httpx.AsyncClient(trust_env=False) as http:
        jwks = JWKS(idp.url, http, clock=clock, ttl_s=MAX_AGE_S, min_refresh_s=MIN_REFRESH_S)
        yield Authenticator(settings, jwks=jwks), clock


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def refused(authn: Authenticator, token: str) -> str:
    with pytest.raises(Unauthorized) as caught:
        await authn.authenticate(bearer(token))
    return caught.value.code


async def test_rs256_and_es256_tokens_of_the_provider(idp: IdP, authn: Authenticator) -> None:
    """Tokens signed with the provider's RSA or EC key authenticate their `sub`; the key set is
    fetched once and cached."""
    assert (await authn.authenticate(bearer(idp.token()))).user == "user-1"
    ec_token = idp.token(alg="ES256", kid="ec-1", sub="user-2")
    assert (await authn.authenticate(bearer(ec_token))).user == "user-2"
    assert idp.fetches == 1


async def test_a_rotated_key_is_fetched_once(idp: IdP, timed: tuple[Authenticator, Clock]) -> None:
    """A token with a key id the cached set lacks makes one fetch (a rotation); garbage key ids
    after that are refused without fetching again within the minimum refresh interval."""
    authn, clock = timed
    await authn.authenticate(bearer(idp.token()))
    assert await refused(authn, idp.token(kid="rsa-2")) == "invalid-token"
    assert idp.fetches == 1  # the set was fetched less than MIN_REFRESH_S ago
    clock.now += MIN_REFRESH_S
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp.publish("rsa-2", new_key)
    rotated = idp.token(kid="rsa-2", key=new_key)
    assert (await authn.authenticate(bearer(rotated))).user == "user-1"
    assert idp.fetches == 2
    clock.now += MIN_REFRESH_S / 2
    for n in range(5):
        assert await refused(authn, idp.token(kid=f"made-up-{n}")) == "invalid-token"
    assert idp.fetches == 2


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    "attack",
    [
        "alg-none",
        "hs256-with-public-key",
        "expired",
        "not-yet-valid",
        "wrong-aud",
        "wrong-iss",
        "tampered",
        "no-sub",
        "unknown-kid",
        "key-of-another-algorithm",
        "foreign-key-same-kid",
    ],
)
async def test_attacks_are_refused(idp: IdP, authn: Authenticator, attack: str) -> None:
    """Every forged or unusable token is 401, whatever its trick."""
    now = int(time.time())
    token = {
        "alg-none": lambda: jwt.encode(
            {"sub": "user-1", "exp": now + 300, "aud": AUDIENCE, "iss": ISSUER},
            key=None,
            algorithm="none",
        ),
        # Algorithm confusion: HMAC keyed with the provider's (public) key.
        "hs256-with-public-key": lambda: _hmac_token(public_pem(idp.rsa_key)),
        "expired": lambda: idp.token(exp=now - 120),
        "not-yet-valid": lambda: idp.token(nbf=now + 120),
        "wrong-aud": lambda: idp.token(aud="another-service"),
        "wrong-iss": lambda: idp.token(iss="https://evil.example"),
        "tampered": lambda: _tampered(idp.token()),
        "no-sub": lambda: idp.token(sub=None),
        "unknown-kid": lambda: idp.token(kid="nobody"),
        "key-of-another-algorithm": lambda: idp.token(alg="ES256", kid="rsa-1"),
        "foreign-key-same-kid": lambda: idp.token(
            key=rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ),
    }[attack]()
    code = await refused(authn, token)
    assert code == ("token-expired" if attack == "expired" else "invalid-token")


def _hmac_token(secret: bytes) -> str:
    payload = {"sub": "user-1", "exp": int(time.time()) + 300, "aud": AUDIENCE, "iss": ISSUER}
    header = json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode()
    body = json.dumps(payload).encode()
    signing_input = jwt.utils.base64url_encode(header) + b"." + jwt.utils.base64url_encode(body)
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["sub"] = "admin"
    forged = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    return f"{header}.{forged}.{signature}"


async def test_hs256_beside_jwks_still_refuses_the_public_key_as_secret(idp: IdP) -> None:
    """With both JWT_SECRET and a JWKS, an HS256 token is checked with the secret only: one
    keyed with the provider's public key fails."""
    settings = Settings.from_env({"JWT_JWKS_URL": idp.url, "JWT_SECRET": JWT_SECRET})
    assert settings.jwt_algorithms == ("HS256", "RS256", "ES256")
    authenticator = Authenticator(settings)
    try:
        good = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, JWT_SECRET, "HS256")
        assert (await authenticator.authenticate(bearer(good))).user == "u"
        payload = {"sub": "user-1", "exp": int(time.time()) + 300}
        header = {"alg": "HS256", "typ": "JWT"}
        signing_input = ".".join(
            jwt.utils.base64url_encode(json.dumps(part).encode()).decode()
            for part in (header, payload)
        )
        signature = hmac.new(public_pem(idp.rsa_key), signing_input.encode(), hashlib.sha256)
        forged = signing_input + "." + jwt.utils.base64url_encode(signature.digest()).decode()
        assert await refused(authenticator, forged) == "invalid-token"
    finally:
        await authenticator.aclose()


async def test_an_unreachable_provider(idp: IdP, timed: tuple[Authenticator, Clock]) -> None:
    """With no keys cached and the provider down: 503 jwks-unavailable (not a 401 that would
    log users out); once keys are cached, an outage keeps using them."""
    authn, clock = timed
    idp.down = True
    with pytest.raises(Unavailable) as caught:
        await authn.authenticate(bearer(idp.token()))
    assert caught.value.code == "jwks-unavailable"
    clock.now += MIN_REFRESH_S
    idp.down = False
    assert (await authn.authenticate(bearer(idp.token()))).user == "user-1"
    assert idp.fetches == 2
    idp.down = True
    clock.now += MAX_AGE_S + 1
    assert (await authn.authenticate(bearer(idp.token()))).user == "user-1"
    assert idp.fetches == 3  # the stale set was fetched again, in vain, and kept


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"JWT_JWKS_URL": "https://idp.example/jwks", "JWT_ALGORITHMS": "none"}, "JWT_ALGORITHMS"),
        ({"JWT_JWKS_URL": "https://idp.example/jwks", "JWT_ALGORITHMS": "HS256"}, "JWT_SECRET"),
        ({"JWT_SECRET": JWT_SECRET, "JWT_ALGORITHMS": "RS256"}, "JWT_JWKS_URL"),
        ({"JWT_JWKS_URL": "ftp://idp.example/jwks"}, "JWT_JWKS_URL"),
    ],
)
def test_algorithm_settings_are_checked(env: dict[str, str], named: str) -> None:
    """An algorithm allowlist that cannot work, or `none`, stops start-up naming the variable."""
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


def test_a_jwks_alone_turns_authentication_on() -> None:
    """JWT_JWKS_URL alone makes `jwt` the auth mode, with RS256 and ES256 allowed."""
    settings = Settings.from_env({"JWT_JWKS_URL": "https://idp.example/jwks"})
    assert settings.auth == "jwt" and settings.jwt_algorithms == ("RS256", "ES256")


@pytest.mark.parametrize(
    "attack",
    ["alg-none", "hs256-with-public-key", "wrong-aud", "wrong-iss", "unknown-kid", "tampered"],
)
async def test_forged_tokens_make_nothing(idp: IdP, tmp_path: Path, attack: str) -> None:
    """Through the whole dispatcher, with the provider's keys: each forged token is 401 on
    /start, and no session row, machine or room is made. The genuine token starts one."""
    env = {"JWT_JWKS_URL": idp.url, "JWT_AUDIENCE": AUDIENCE, "JWT_ISSUER": ISSUER}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        assert stack.fly is not None and stack.daily is not None
        now = int(time.time())
        token = {
            "alg-none": lambda: jwt.encode(
                {"sub": "user-1", "exp": now + 300, "aud": AUDIENCE, "iss": ISSUER},
                key=None,
                algorithm="none",
            ),
            "hs256-with-public-key": lambda: _hmac_token(public_pem(idp.rsa_key)),
            "wrong-aud": lambda: idp.token(aud="another-service"),
            "wrong-iss": lambda: idp.token(iss="https://evil.example"),
            "unknown-kid": lambda: idp.token(kid="nobody"),
            "tampered": lambda: _tampered(idp.token()),
        }[attack]()
        refused = await stack.http.post("/start", json={}, headers=bearer(token))
        assert refused.status_code == 401 and refused.json()["code"] == "invalid-token"
        assert not stack.fly.machines and not stack.daily.rooms
        assert [r for r in stack.daily.requests if r.path != "/"] == []

        genuine = await stack.http.post("/start", json={}, headers=bearer(idp.token()))
        assert genuine.status_code == 200, genuine.text
        sid = genuine.json()["sessionId"]
        await stack.http.delete(f"/sessions/{sid}", headers=bearer(idp.token()))
        session: dict[str, Any] = {}

        async def ended() -> bool:
            nonlocal session
            answer = await stack.http.get(f"/sessions/{sid}", headers=bearer(idp.token()))
            session = answer.json()
            return session["state"] == "ended"

        await eventually(ended, what=f"{sid} ended")
