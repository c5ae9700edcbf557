"""Bearer-token checks. Routers keep SHA-256 digests of API keys and of the admin token, never the secrets,
and compare them in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.dataplane.asgi import Scope, header
from gateway.errors import ApiError

BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def engine_key(seed: str, pool_id: str) -> str:
    """The key a pool's engines require (LMDeploy's ``--api-keys``) and routers send to them: HMAC-SHA256 of the
    pool id under the gateway's engine key seed. A restarted controller derives the same keys; one pool's key
    opens no other pool."""
    return hmac.new(seed.encode(), f"tpgate-engine:{pool_id}".encode(), hashlib.sha256).hexdigest()


def bearer_token(scope: Scope) -> str | None:
    value = header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class Caller:
    """Who sent a proxied request: the admin (the tuner measuring a trial) or a client with an API key's class."""

    admin: bool
    key_class: str | None


def authorize(scope: Scope, key_classes: Mapping[str, str | None], admin_digest: str | None) -> Caller:
    """The caller of a proxied request. The admin token is accepted wherever an API key is (the tuner sends it
    to reach trial routes); otherwise the API key rules of :func:`api_key_class` apply."""
    token = bearer_token(scope)
    if token is not None and admin_digest is not None and hmac.compare_digest(secret_digest(token), admin_digest):
        return Caller(admin=True, key_class=None)
    return Caller(admin=False, key_class=api_key_class(scope, key_classes))


def api_key_class(scope: Scope, key_classes: Mapping[str, str | None]) -> str | None:
    """The API key's default class; 401 when keys are configured and the request has no valid one."""
    if not key_classes:
        return None
    token = bearer_token(scope)
    if token is None:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                       headers=BEARER_CHALLENGE)
    digest = secret_digest(token)
    for known, default_class in key_classes.items():
        if hmac.compare_digest(digest, known):
            return default_class
    raise ApiError(401, "invalid API key", code="invalid_api_key", headers=BEARER_CHALLENGE)


def require_admin(scope: Scope, admin_digest: str | None) -> None:
    """401 without a bearer token, 403 with a wrong one (or when no admin token is configured)."""
    if admin_digest is None:
        raise ApiError(403, "the admin API is disabled: no admin token is configured")
    token = bearer_token(scope)
    if token is None:
        raise ApiError(401, "admin API: send 'Authorization: Bearer <admin token>' (the token is in the file "
                       "auth.admin_token_file names)", code="missing_admin_token", headers=BEARER_CHALLENGE)
    if not hmac.compare_digest(secret_digest(token), admin_digest):
        raise ApiError(403, "admin API: the bearer token is not the admin token", code="invalid_admin_token")
