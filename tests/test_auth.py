"""Client authentication with HS256 JWTs, and bot callback tokens."""

from __future__ import annotations

import time

import jwt
import pytest

from dispatcher.auth import Authenticator, hash_token, new_callback_token, token_matches
from dispatcher.config import Settings
from dispatcher.errors import Unauthorized
from testkit.harness import JWT_SECRET


def make_token(secret: str = JWT_SECRET, **claims: object) -> str:
    """An HS256 token with sensible default claims."""
    payload = {"sub": "user-1", "exp": int(time.time()) + 300} | claims
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, secret, algorithm="HS256")


def auth(**env: str) -> Authenticator:
    return Authenticator(Settings.from_env({"JWT_SECRET": JWT_SECRET, **env}))


def headers(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_valid_token_gives_sub() -> None:
    """A valid token authenticates its `sub` as the user."""
    assert (await auth().authenticate(headers(make_token()))).user == "user-1"


@pytest.mark.parametrize(
    ("hdrs", "code"),
    [
        ({}, "missing-credentials"),
        ({"authorization": "Basic dXNlcjpwdw=="}, "missing-credentials"),
        ({"authorization": "Bearer "}, "missing-credentials"),
        ({"authorization": "Bearer not-a-jwt"}, "invalid-token"),
    ],
)
async def test_missing_or_malformed_credentials(hdrs: dict[str, str], code: str) -> None:
    """No bearer token, or one that is not a JWT, is refused with a stable code."""
    with pytest.raises(Unauthorized) as info:
        await auth().authenticate(hdrs)
    assert info.value.code == code


# Made when the test runs: a token's times are relative to then, however long the suite ran.
BAD_TOKENS = {
    "wrong-key": lambda: make_token(secret="another-secret-" + "y" * 32),
    "expired": lambda: make_token(exp=int(time.time()) - 3600),
    "no-exp": lambda: make_token(exp=None),
    "no-sub": lambda: make_token(sub=None),
    "empty-sub": lambda: make_token(sub=""),
    "not-yet-valid": lambda: make_token(nbf=int(time.time()) + 3600),
    "alg-none": lambda: jwt.encode(
        {"sub": "u", "exp": int(time.time()) + 60}, key=None, algorithm="none"
    ),
}


@pytest.mark.parametrize("kind", BAD_TOKENS)
async def test_bad_tokens_are_refused(kind: str) -> None:
    """Tokens with a bad signature, expired, lacking exp or sub, or unsigned are refused."""
    with pytest.raises(Unauthorized):
        await auth().authenticate(headers(BAD_TOKENS[kind]()))


async def test_audience_and_issuer_checked_when_configured() -> None:
    """With JWT_AUDIENCE and JWT_ISSUER set, tokens must carry both."""
    a = auth(JWT_AUDIENCE="dispatch", JWT_ISSUER="https://idp.example")
    good = make_token(aud="dispatch", iss="https://idp.example")
    assert (await a.authenticate(headers(good))).user == "user-1"
    for bad in (
        make_token(aud="other", iss="https://idp.example"),
        make_token(aud="dispatch", iss="https://evil.example"),
        make_token(),
    ):
        with pytest.raises(Unauthorized):
            await a.authenticate(headers(bad))


async def test_auth_none_accepts_anyone_as_anonymous() -> None:
    """With DISPATCHER_AUTH=none every caller is `anonymous`."""
    a = Authenticator(Settings.from_env({}))
    assert (await a.authenticate({})).user == "anonymous"


def test_callback_token_is_stored_hashed_and_compared() -> None:
    """A callback token matches only its own hash; the hash is not the token."""
    token, stored = new_callback_token()
    other, _ = new_callback_token()
    assert stored != token and stored == hash_token(token)
    assert token_matches(token, stored)
    assert not token_matches(other, stored)
    assert not token_matches(None, stored)
    assert not token_matches(token, None)
