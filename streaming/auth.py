"""Authentication of ``/v1/*``: API keys and/or HS256 JWTs (DESIGN §8).

Off when ``settings.api_keys`` and ``settings.jwt_secrets`` are both empty
(the ``oddsfeed run`` demo); the compose file turns keys on through
``ODDSFEED_API_KEYS``.

A credential is read from ``X-API-Key``, ``Authorization: Bearer <value>``,
or the query (``?api_key=`` / ``?access_token=``, for browsers' EventSource
which cannot set headers); at most :data:`MAX_CREDENTIAL_CHARS` characters.
It is accepted when it equals one of the API keys (their SHA-256 digests are compared)
or is a JWT that PyJWT (``jwt.decode``, the only JWT code: there is no
hand-written fallback) verifies with these rules:

- header ``alg`` must be ``HS256`` (``algorithms=["HS256"]`` pinned:
  ``none`` and every other algorithm are refused); the signature must verify
  with one of ``settings.jwt_secrets`` (several = key rotation: each secret
  is tried in turn, only a bad signature moves on to the next);
- **required claims**: ``exp`` always (a token that never expires is
  refused); ``aud`` when ``settings.jwt_audience`` is set (it must equal it,
  or be a list holding it); ``iss`` when ``settings.jwt_issuer`` is set (it
  must equal it). Without a configured audience a token's ``aud`` is not
  checked;
- ``exp`` in the future, ``nbf`` / ``iat`` (optional) not in the future,
  all with :data:`LEEWAY_S` (30 s) of leeway for clock skew;
- ``exp`` / ``nbf`` / ``iat`` must be JSON numbers (a string, a bool,
  ``NaN`` / ``Infinity`` or an overflowing ``1e400`` is refused, never read
  as "expires never"); ``aud`` a string or a list of strings; ``iss`` a
  string. A header or claims set that is not a JSON object, or that nests
  deeper than Python's parser allows, is refused like any malformed token.

Refusals: HTTP ``401 {"error":"unauthorized","message":…}`` (the message
says what is wrong: missing, unknown key, expired, bad signature …, never
echoing the credential); a WebSocket handshake gets the same HTTP answer (401
with its JSON body; where the server lacks the ASGI ``websocket.http.response``
extension, a close with 1008 before the upgrade, i.e. an empty 403). No token,
however malformed, causes a 500. Credentials are never logged.

Tenants (:mod:`streaming.tenants`): a credential that passes is given a
:class:`~streaming.tenants.Grant` — what its tenant may do (scopes ``read``,
``stream``, ``price_check``), see, and its limits — put in the ASGI scope
for the endpoints (:func:`streaming.tenants.grant_of`). API keys may also be
listed in the tenants file; a request outside its scopes gets ``403
{"error":"forbidden",…}`` (a WebSocket: a refused handshake with that body).

Secrets shorter than 32 bytes (RFC 7518 §3.2's minimum for HS256) are
accepted with one warning at startup (PyJWT's per-call warning is muted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from typing import Any

import jwt
import msgspec
from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from feed.errors import AuthError
from feed.settings import Settings
from streaming.tenants import SCOPE_KEY, ForbiddenError, Grant, Tenants

__all__ = ["AuthError", "AuthMiddleware", "LEEWAY_S", "MAX_CREDENTIAL_CHARS", "verify_jwt"]

logger = logging.getLogger(__name__)

#: seconds of clock skew allowed on ``exp`` / ``nbf`` / ``iat``
LEEWAY_S = 30
#: longest credential (API key or JWT) looked at, characters; a longer one is refused unread
MAX_CREDENTIAL_CHARS = 8192
#: RFC 7518 §3.2: an HS256 key should be at least this long, bytes
MIN_SECRET_BYTES = 32


class _Claims(msgspec.Struct):
    """Types of the registered claims we rely on, checked after PyJWT verified the token
    (PyJWT reads ``exp`` with ``int()``, which takes ``"1790000000"`` and ``true``)."""

    exp: int | float
    nbf: int | float | None = None
    iat: int | float | None = None
    aud: str | list[str] | None = None
    iss: str | None = None


_MESSAGES: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "invalid token: expired"),
    (jwt.InvalidSignatureError, "invalid token: bad signature"),
    (jwt.InvalidAlgorithmError, "invalid token: only HS256 is accepted"),
    (jwt.InvalidAudienceError, "invalid token: wrong audience"),
    (jwt.InvalidIssuerError, "invalid token: wrong issuer"),
)


#: what a claim of the wrong type must be, added to the refusal
_CLAIM_HINTS = (("exp", "; exp must be a number of seconds"), ("nbf", "; nbf must be a number of seconds"),
                ("iat", "; iat must be a number of seconds"), ("aud", "; aud must be a string or a list of strings"),
                ("iss", "; iss must be a string"))


def _reason(exc: Exception) -> str:
    """A refusal message for a PyJWT error (never contains the token)."""
    for cls, text in _MESSAGES:
        if isinstance(exc, cls):
            return text
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"invalid token: {exc.claim} missing"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return f"invalid token: not valid yet ({exc})"
    if isinstance(exc, jwt.DecodeError):
        return f"invalid token: not a valid JWT ({str(exc)[:120]})"
    return f"invalid token: {str(exc)[:120] or type(exc).__name__}"  # (PyJWT's texts: "Subject must be a string")


def verify_jwt(token: str, secrets: tuple[str, ...], *, audience: str | None = None,
               issuer: str | None = None) -> dict[str, Any]:
    """The claims of an HS256 JWT signed with one of ``secrets`` (see the module docstring),
    checked against the current time. Raises AuthError (never anything else) for every
    token that does not verify."""
    if not secrets:
        raise AuthError("invalid token: JWTs are not accepted here")
    if len(token) > MAX_CREDENTIAL_CHARS:
        raise AuthError(f"invalid token: longer than {MAX_CREDENTIAL_CHARS} characters")
    require = ["exp"] + (["aud"] if audience is not None else []) + (["iss"] if issuer is not None else [])
    claims: dict[str, Any] | None = None
    last: Exception | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        for secret in secrets:
            try:
                claims = jwt.decode(token, secret, algorithms=["HS256"], audience=audience, issuer=issuer,
                                    leeway=LEEWAY_S, options={"require": require, "verify_aud": audience is not None})
                break
            except jwt.InvalidSignatureError as exc:  # rotation: try the next secret
                last = exc
                continue
            except jwt.PyJWTError as exc:
                raise AuthError(_reason(exc)) from None
            except (ValueError, TypeError, OverflowError, RecursionError):  # PyJWT should catch these; be sure
                raise AuthError("invalid token: not a valid JWT") from None
    if claims is None:
        raise AuthError(_reason(last or jwt.InvalidSignatureError()))
    try:
        msgspec.convert(claims, _Claims, strict=True)
    except msgspec.ValidationError as exc:
        text = str(exc)
        hint = next((h for claim, h in _CLAIM_HINTS if f"`$.{claim}`" in text), "")
        raise AuthError(f"invalid token: {text}{hint}") from None
    return claims


class AuthMiddleware:
    """Require an API key or a JWT on ``/v1/*`` (HTTP → 401 JSON, WebSocket → close 1008 before the upgrade)."""

    def __init__(self, app: ASGIApp, settings: Settings, tenants: Tenants | None = None) -> None:
        self.app = app
        #: SHA-256 of each ODDSFEED_API_KEYS key (a dict lookup of the digest: no per-key loop,
        #: and no timing signal about the key's bytes)
        self.keys = {hashlib.sha256(k.encode()).digest() for k in settings.api_keys}
        self.tenants = tenants if tenants is not None else Tenants(None)
        self.secrets = tuple(settings.jwt_secrets)
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        for i, s in enumerate(self.secrets, 1):
            if len(s.encode()) < MIN_SECRET_BYTES:
                logger.warning("JWT secret #%d is %d bytes long; HS256 wants at least %d (RFC 7518 §3.2)",
                               i, len(s.encode()), MIN_SECRET_BYTES)

    def _credential(self, scope: Scope) -> str | None:
        for name, value in scope.get("headers", ()):
            if name == b"x-api-key":
                return value.decode("latin-1").strip()
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return value[7:].decode("latin-1").strip()
        q = QueryParams(scope.get("query_string", b"").decode("latin-1"))
        return q.get("api_key") or q.get("access_token") or None

    def check(self, scope: Scope) -> Grant:
        """The request's grant; raises AuthError when its credential is refused (ForbiddenError,
        an AuthError, is raised by the caller when the grant lacks the path's scope)."""
        cred = self._credential(scope)
        if not cred:
            raise AuthError("send an API key (X-API-Key, Authorization: Bearer, ?api_key=) or a JWT "
                            "(Authorization: Bearer, ?access_token=)")
        if len(cred) > MAX_CREDENTIAL_CHARS:
            raise AuthError(f"credential longer than {MAX_CREDENTIAL_CHARS} characters")
        digest = hashlib.sha256(cred.encode("latin-1", "replace")).digest()
        grant = self.tenants.for_key(digest)
        if grant is not None:
            return grant
        if digest in self.keys:
            return self.tenants.for_unnamed_key(digest)
        if self.secrets and cred.count(".") == 2:
            claims = verify_jwt(cred, self.secrets, audience=self.audience, issuer=self.issuer)
            return self.tenants.for_jwt(claims)
        raise AuthError("unknown API key" if self.keys or self.tenants.has_keys else "invalid token: not a JWT")

    @staticmethod
    def permission(path: str) -> str:
        """The scope a ``/v1`` path needs (see :data:`streaming.tenants.PERMISSIONS`)."""
        if path in ("/v1/stream", "/v1/ws"):
            return "stream"
        if path.startswith("/v1/price-check"):
            return "price_check"
        return "read"

    @staticmethod
    def deny(exc: AuthError, method: str, path: str, client: str | None
             ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Log a refused request (the reason, never the credential) and return the HTTP answer:
        401 with ``WWW-Authenticate`` (no or a bad credential) or 403 (a ForbiddenError: the
        grant lacks the path's scope), ``{"error","message"}``."""
        status = 403 if isinstance(exc, ForbiddenError) else 401
        logger.info("%d %s %s from %s: %s", status, method, path, client or "?", exc)
        body = json.dumps({"error": "unauthorized" if status == 401 else "forbidden", "message": str(exc)}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="oddsfeed"'))
        return status, headers, body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"].startswith("/v1/"):
            try:
                grant = self.check(scope)
                grant.require(self.permission(scope["path"]))
            except AuthError as exc:
                client = scope.get("client")
                status, headers, body = self.deny(exc, scope.get("method", "WS"), scope["path"],
                                                  client[0] if client else None)
                if scope["type"] == "websocket":  # the same answer as HTTP: 401/403 + a JSON body
                    await deny_websocket(scope, send, status, "forbidden" if status == 403 else "unauthorized",
                                         str(exc), [h for h in headers if h[0] == b"www-authenticate"])
                    return
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            scope[SCOPE_KEY] = grant
        await self.app(scope, receive, send)


async def deny_websocket(scope: Scope, send: Send, status: int, code: str, message: str,
                         headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Refuse a WebSocket handshake with an HTTP ``status`` and ``{"error": code, "message":
    message}`` when the server offers the ASGI ``websocket.http.response`` extension (ours and
    uvicorn's do), else with close 1008 (the server answers 403)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = json.dumps({"error": code, "message": message}).encode()
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *(headers or [])]})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
