"""Authentication of clients (`Authorization: Bearer <JWT>`) and of bots (per-session tokens)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import jwt

from dispatcher.config import Settings
from dispatcher.errors import Unauthorized

JWT_LEEWAY_S = 30
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user id (`sub` of the JWT, or `anonymous` without auth)."""

    user: str


class Authenticator:
    """Verifies client credentials according to DISPATCHER_AUTH."""

    def __init__(self, settings: Settings) -> None:
        self._mode = settings.auth
        self._key = settings.jwt_secret.reveal() if settings.jwt_secret else None
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller of a request with these headers; raises Unauthorized if it cannot be told."""
        if self._mode == "none":
            return Principal(ANONYMOUS)
        token = bearer_token(headers)
        if token is None:
            raise Unauthorized("missing bearer token", code="missing-credentials")
        assert self._key is not None
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
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
            raise Unauthorized("token expired", code="token-expired") from None
        except jwt.PyJWTError:
            raise Unauthorized("invalid token", code="invalid-token") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise Unauthorized("invalid token: bad sub", code="invalid-token")
        return Principal(sub)


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


def hash_token(token: str) -> str:
    """The stored form of a callback token."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str | None, stored_hash: str | None) -> bool:
    """Whether a presented callback token matches the stored hash, in constant time."""
    if not token or not stored_hash:
        return False
    return hmac.compare_digest(hash_token(token), stored_hash)
