"""Bearer keys: who is calling, and may they use the admin endpoints."""

from __future__ import annotations

import hashlib
import hmac

from flask import current_app, g, request

from eventflow.problems import Problem
from eventflow.settings import ApiKey

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="eventflow"'}


def find_key(keys: tuple[ApiKey, ...], secret: str) -> ApiKey | None:
    """The configured key whose digest matches ``secret``, comparing in constant time."""
    digest = hashlib.sha256(secret.encode()).digest()
    found = None
    for key in keys:  # no early exit: every comparison is made
        if hmac.compare_digest(key.digest, digest):
            found = key
    return found


def bearer_secret(authorization: str) -> str | None:
    """The secret of an ``Authorization: Bearer <key>`` header value, or None."""
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    return secret if scheme.lower() == "bearer" and secret else None


def authenticate(admin: bool = False) -> ApiKey:
    """The key of this request, or a 401/403 problem; kept in ``g.api_key``."""
    keys: tuple[ApiKey, ...] = current_app.extensions["eventflow"].settings.api_keys
    if not keys:
        raise Problem(
            401,
            "No API keys are configured on this server: set EVENTFLOW_API_KEYS (and "
            "EVENTFLOW_ADMIN_KEYS) to comma-separated keys or name:sha256:<hex> entries.",
            slug="no-keys-configured", headers=_CHALLENGE,
        )
    secret = bearer_secret(request.headers.get("Authorization", ""))
    if secret is None:
        raise Problem(401, "Send your key as 'Authorization: Bearer <key>'.",
                      slug="unauthenticated", headers=_CHALLENGE)
    key = find_key(keys, secret)
    if key is None:
        raise Problem(401, "This key is not known.", slug="unauthenticated", headers=_CHALLENGE)
    if admin and not key.admin:
        raise Problem(403, "This endpoint needs an admin key (EVENTFLOW_ADMIN_KEYS).",
                      slug="forbidden")
    g.api_key = key
    return key
