"""Authentication of ``/v1/*``: API keys and/or HS256 JWTs (DESIGN §8).

Off when ``settings.api_keys`` and ``settings.jwt_secrets`` are both empty
(the ``oddsfeed run`` demo); the compose file turns keys on through
``ODDSFEED_API_KEYS``.

A credential is read from ``X-API-Key``, ``Authorization: Bearer <value>``,
or the query (``?api_key=`` / ``?access_token=``, for browsers' EventSource
which cannot set headers). It is accepted when it equals one of the API keys
(``hmac.compare_digest``) or is a JWT that verifies:

- header ``alg`` must be ``HS256`` (pinned: ``none`` and every other
  algorithm are refused), signature HMAC-SHA256 over ``header.payload``
  with any of ``settings.jwt_secrets`` (rotation);
- ``exp`` required and in the future, ``nbf``/``iat`` not in the future
  (30 s leeway); ``aud`` / ``iss`` must match when configured.

PyJWT is used when installed; otherwise the same checks are made here
(a few lines of stdlib: base64url, hmac, json).

Refusals: HTTP ``401 {"error":"unauthorized","message":…}`` (the message
says what is wrong: missing, unknown key, expired, bad signature …, never
echoing the credential); WebSocket: the handshake is refused (403) before
upgrade. Credentials are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any

from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from feed.settings import Settings

__all__ = ["AuthError", "AuthMiddleware", "verify_jwt"]

LEEWAY_S = 30


class AuthError(Exception):
    """Why a credential was refused (safe to show: never contains it)."""


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_jwt(token: str, secrets: tuple[str, ...], *, audience: str | None = None, issuer: str | None = None,
               now_s: float | None = None) -> dict[str, Any]:
    """The claims of an HS256 JWT signed with one of ``secrets``. Raises AuthError."""
    now = time.time() if now_s is None else now_s
    try:
        import jwt as pyjwt  # type: ignore[import-not-found]
    except ImportError:
        pyjwt = None
    if pyjwt is not None:
        for secret in secrets:
            try:
                return dict(pyjwt.decode(token, secret, algorithms=["HS256"], audience=audience, issuer=issuer,
                                         leeway=LEEWAY_S, options={"require": ["exp"],
                                                                   "verify_aud": audience is not None}))
            except pyjwt.InvalidSignatureError:
                continue
            except pyjwt.PyJWTError as exc:
                raise AuthError(f"invalid token: {type(exc).__name__}") from None
        raise AuthError("invalid token: bad signature")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("invalid token: not a JWT")
    try:
        header = json.loads(_b64(parts[0]))
        claims = json.loads(_b64(parts[1]))
        signature = _b64(parts[2])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise AuthError("invalid token: not a JWT") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise AuthError("invalid token: not a JWT")
    if header.get("alg") != "HS256":
        raise AuthError("invalid token: only HS256 is accepted")
    signing_input = f"{parts[0]}.{parts[1]}".encode()
    if not any(hmac.compare_digest(hmac.new(s.encode(), signing_input, hashlib.sha256).digest(), signature)
               for s in secrets):
        raise AuthError("invalid token: bad signature")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise AuthError("invalid token: exp missing")
    if now > exp + LEEWAY_S:
        raise AuthError("invalid token: expired")
    for claim in ("nbf", "iat"):
        v = claims.get(claim)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > now + LEEWAY_S:
            raise AuthError(f"invalid token: {claim} in the future")
    if audience is not None:
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if audience not in auds:
            raise AuthError("invalid token: wrong audience")
    if issuer is not None and claims.get("iss") != issuer:
        raise AuthError("invalid token: wrong issuer")
    return claims


class AuthMiddleware:
    """Require an API key or a JWT on ``/v1/*`` (HTTP → 401 JSON, WebSocket → 403 at the handshake)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.keys = [k.encode() for k in settings.api_keys]
        self.secrets = tuple(settings.jwt_secrets)
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer

    def _credential(self, scope: Scope) -> str | None:
        for name, value in scope.get("headers", ()):
            if name == b"x-api-key":
                return value.decode("latin-1").strip()
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return value[7:].decode("latin-1").strip()
        q = QueryParams(scope.get("query_string", b"").decode("latin-1"))
        return q.get("api_key") or q.get("access_token") or None

    def check(self, scope: Scope) -> None:
        """Raises AuthError when the request may not pass."""
        cred = self._credential(scope)
        if not cred:
            raise AuthError("send an API key (X-API-Key, Authorization: Bearer, ?api_key=) or a JWT "
                            "(Authorization: Bearer, ?access_token=)")
        raw = cred.encode("latin-1", "replace")
        if any(hmac.compare_digest(raw, k) for k in self.keys):
            return
        if self.secrets and cred.count(".") == 2:
            verify_jwt(cred, self.secrets, audience=self.audience, issuer=self.issuer)
            return
        raise AuthError("unknown API key" if self.keys else "invalid token: not a JWT")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"].startswith("/v1/"):
            try:
                self.check(scope)
            except AuthError as exc:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008, "reason": str(exc)[:120]})
                    return
                body = json.dumps({"error": "unauthorized", "message": str(exc)}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"www-authenticate", b'Bearer realm="oddsfeed"')]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
