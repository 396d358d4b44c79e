"""Authentication of clients (`Authorization: Bearer <JWT>`) and of bots (per-session tokens)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from dispatcher.config import Settings
from dispatcher.errors import ErrorCode, Unauthorized, Unavailable

log = logging.getLogger(__name__)

JWT_LEEWAY_S = 30
ANONYMOUS = "anonymous"
# The identity provider's key set is fetched again after this long, and at most this often when
# a token names a key id the cached set lacks (a rotation; or garbage, which must not turn every
# request into a fetch).
JWKS_TTL_S = 600.0
JWKS_MIN_REFRESH_S = 10.0
JWKS_TIMEOUT_S = 5.0
MAX_JWKS_BYTES = 256 * 1024


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user id (`sub` of the JWT, or `anonymous` without auth), and
    whether its token carries the admin role (never without auth)."""

    user: str
    admin: bool = False


class JWKS:
    """The identity provider's signing keys (JWT_JWKS_URL), cached by key id."""

    def __init__(
        self,
        url: str,
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        ttl_s: float = JWKS_TTL_S,
        min_refresh_s: float = JWKS_MIN_REFRESH_S,
    ) -> None:
        self._url = url
        self._http = http
        self._clock = clock
        self._ttl_s = ttl_s
        self._min_refresh_s = min_refresh_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -math.inf
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key that signed a token (by its header's `kid` and `alg`)."""
        if self._clock() - self._fetched_at > self._ttl_s:
            await self._refresh(self._fetched_at)
        key = self._find(kid)
        if key is None and self._clock() - self._fetched_at >= self._min_refresh_s:
            await self._refresh(self._fetched_at)
            key = self._find(kid)
        if key is None:
            raise Unauthorized("invalid token: unknown signing key", code=ErrorCode.INVALID_TOKEN)
        if key.algorithm_name != alg:
            raise Unauthorized(
                "invalid token: key and algorithm disagree", code=ErrorCode.INVALID_TOKEN
            )
        return key

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            # Without a key id, only a set of one key says which key it is.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _refresh(self, seen: float) -> None:
        async with self._lock:
            if self._fetched_at != seen:  # another request refreshed it meanwhile
                return
            self.fetches += 1
            try:
                response = await self._http.get(self._url, timeout=JWKS_TIMEOUT_S)
                response.raise_for_status()
                if len(response.content) > MAX_JWKS_BYTES:
                    raise ValueError("key set too large")
                keys = _signing_keys(response.json())
            except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
                # Keep what we have (and try again after min_refresh_s); with nothing
                # cached, the caller cannot be told: the identity provider is unreachable.
                log.warning("fetching the JWKS failed: %s", type(exc).__name__)
                self._fetched_at = self._clock() - self._ttl_s + self._min_refresh_s
                if not self._keys:
                    raise Unavailable(
                        "cannot verify tokens: the identity provider's keys are unreachable",
                        code=ErrorCode.JWKS_UNAVAILABLE,
                        retry_after=self._min_refresh_s,
                    ) from None
                return
            self._keys = keys
            self._fetched_at = self._clock()


def _signing_keys(data: object) -> dict[str, jwt.PyJWK]:
    """The signature keys of a JWKS document, by key id (RS256 and ES256 ones only)."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in data["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") not in ("RSA", "EC"):
            continue  # never an HMAC ("oct") key from a URL
        algorithm = entry.get("alg") or ("RS256" if entry.get("kty") == "RSA" else "ES256")
        if algorithm not in ("RS256", "ES256"):
            continue
        try:
            key = jwt.PyJWK(entry, algorithm=algorithm)
        except jwt.PyJWTError:
            continue
        keys[str(entry.get("kid", ""))] = key
    return keys


class Authenticator:
    """Verifies client credentials according to DISPATCHER_AUTH."""

    def __init__(
        self,
        settings: Settings,
        *,
        http: httpx.AsyncClient | None = None,
        jwks: JWKS | None = None,
    ) -> None:
        """`jwks` replaces the key set built from JWT_JWKS_URL (its clock and bounds given)."""
        self._mode = settings.auth
        self._key = settings.jwt_secret.reveal() if settings.jwt_secret else None
        self._algorithms = settings.jwt_algorithms
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._admin_role = settings.jwt_admin_role
        self._http = http
        self._own_http = jwks is None and http is None and settings.jwt_jwks_url is not None
        if self._own_http:
            self._http = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        self.jwks = jwks or (
            JWKS(settings.jwt_jwks_url, self._http)
            if settings.jwt_jwks_url and self._http is not None
            else None
        )

    async def aclose(self) -> None:
        """Release the JWKS client."""
        if self._own_http and self._http is not None:
            await self._http.aclose()

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller of a request with these headers; raises Unauthorized if it cannot be told."""
        if self._mode == "none":
            return Principal(ANONYMOUS)
        token = bearer_token(headers)
        if token is None:
            raise Unauthorized("missing bearer token", code=ErrorCode.MISSING_CREDENTIALS)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("invalid token", code=ErrorCode.INVALID_TOKEN) from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self._algorithms:
            raise Unauthorized(
                f"invalid token: algorithm {alg!r} not allowed", code=ErrorCode.INVALID_TOKEN
            )
        if alg == "HS256":
            assert self._key is not None
            key: Any = self._key
        else:
            assert self.jwks is not None
            key = (await self.jwks.key(kid if isinstance(kid, str) else None, alg)).key
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=JWT_LEEWAY_S,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self._audience is not None,
                    "verify_iss": self._issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired", code=ErrorCode.TOKEN_EXPIRED) from None
        except jwt.PyJWTError:
            raise Unauthorized("invalid token", code=ErrorCode.INVALID_TOKEN) from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise Unauthorized("invalid token: bad sub", code=ErrorCode.INVALID_TOKEN)
        return Principal(sub, admin=_has_role(claims, self._admin_role))


def _has_role(claims: Mapping[str, Any], role: str) -> bool:
    """Whether a token's `role` claim is `role`, or its `roles` claim (a list) holds it."""
    roles = claims.get("roles")
    return claims.get("role") == role or (isinstance(roles, list) and role in roles)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def new_callback_token() -> tuple[str, str]:
    """A fresh bot callback token and the hash that is stored instead of it."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def derived_callback_token(pool_token: str, session_id: str) -> tuple[str, str]:
    """The callback token of a pool machine's session and its hash: derived from the machine's
    own secret, so every answer to the machine's assignment request carries the same token
    (an answer lost to a frozen or abandoned request can be given again), and nobody without
    that secret can work it out."""
    mac = hmac.new(pool_token.encode(), f"callback:{session_id}".encode(), hashlib.sha256)
    token = base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")
    return token, hash_token(token)


def hash_token(token: str) -> str:
    """The stored form of a callback token."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str | None, stored_hash: str | None) -> bool:
    """Whether a presented callback token matches the stored hash, in constant time."""
    if not token or not stored_hash:
        return False
    return hmac.compare_digest(hash_token(token), stored_hash)
