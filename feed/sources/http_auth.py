"""Credentials for HTTP pollers: API keys, Basic, tokens, HMAC request signing.

- :class:`Secret` wraps every credential: ``repr``/``str`` show ``***``;
  only :meth:`Secret.reveal` gives the value (at the moment it is sent).
- :class:`ApiKeyAuth` — a key in a header (``X-API-Key``) or in the query
  string (The Odds API ``apiKey``). A query key is added by
  :class:`SigningTransport` *below* httpx's request logging, so the URL that
  httpx logs (and every error message) never holds it.
- :class:`BasicAuth` — HTTP Basic (Pinnacle).
- :class:`TokenAuth` — client credentials → ``{access_token, expires_in}``
  from a token endpoint; refreshed ``refresh_margin_s`` before expiry and
  once on a 401. Concurrent requests share one refresh (a lock, and a
  check that the token they saw is still the current one).
- HMAC-SHA256 signing (:class:`HmacSigner`, :func:`sign`,
  :func:`verify_signature`): the signature covers a millisecond timestamp,
  a nonce, the method, the request target (path and query, as sent) and the
  raw body::

      X-Signature-Key: <key id>
      X-Signature-Timestamp: <ms since the epoch>
      X-Signature-Nonce: <random hex>
      X-Signature: hex(HMAC-SHA256(secret, ts "\\n" nonce "\\n" METHOD "\\n" target "\\n" body))

  The server side (:func:`verify_signature`) checks the window, refuses a
  nonce it has seen, and compares with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import msgspec

from feed.sources.http_limits import SourceAuthError, TransportFailure, UpstreamError, error_code_of

__all__ = [
    "ApiKeyAuth",
    "BasicAuth",
    "HmacSigner",
    "NonceCache",
    "Secret",
    "SigningTransport",
    "TokenAuth",
    "sign",
    "verify_signature",
]

SIG_HEADER = "X-Signature"
SIG_KEY_HEADER = "X-Signature-Key"
SIG_TS_HEADER = "X-Signature-Timestamp"
SIG_NONCE_HEADER = "X-Signature-Nonce"


class Secret:
    """A credential that never shows itself in logs, errors or ``repr``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> Any:  # no pickling the value by accident
        raise TypeError("a Secret cannot be pickled")


class ApiKeyAuth:
    """An API key sent in ``header`` or as the query parameter ``query_param``."""

    def __init__(self, key: str | Secret, *, header: str | None = "X-API-Key", query_param: str | None = None) -> None:
        self.key = key if isinstance(key, Secret) else Secret(key)
        self.header = None if query_param else header
        self.query_param = query_param

    def __repr__(self) -> str:
        where = f"query {self.query_param}" if self.query_param else f"header {self.header}"
        return f"ApiKeyAuth({where}, key=***)"


class BasicAuth:
    """HTTP Basic credentials."""

    def __init__(self, user: str, password: str | Secret) -> None:
        self.user = user
        self.password = password if isinstance(password, Secret) else Secret(password)

    def header_value(self) -> str:
        raw = f"{self.user}:{self.password.reveal()}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __repr__(self) -> str:
        return f"BasicAuth(user={self.user!r}, password=***)"


class _TokenReply(msgspec.Struct, kw_only=True):
    access_token: str
    expires_in: float = 3600.0
    token_type: str = "Bearer"


class TokenAuth:
    """Client-credentials token auth with refresh before expiry and on 401.

    token_url: path (on the poller's base URL) or absolute URL of the token
    endpoint; it receives ``POST`` JSON ``{"grant_type":
    "client_credentials", "client_id", "client_secret"}`` and answers
    ``{"access_token", "expires_in"}`` (seconds). ``refresh_margin_s``:
    refresh this long before the expiry. ``clock``: monotonic seconds.
    ``refreshes`` counts token requests made.
    """

    def __init__(self, token_url: str, client_id: str, client_secret: str | Secret, *,
                 refresh_margin_s: float = 30.0, deadline_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self.client_secret = client_secret if isinstance(client_secret, Secret) else Secret(client_secret)
        self.refresh_margin_s = refresh_margin_s
        self.deadline_s = deadline_s
        self._clock = clock
        self._token: Secret | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.refreshes = 0

    def __repr__(self) -> str:
        return f"TokenAuth(url={self.token_url!r}, client_id={self.client_id!r}, client_secret=***)"

    def _fresh(self) -> bool:
        return self._token is not None and self._clock() < self._expires_at - self.refresh_margin_s

    async def token(self, client: httpx.AsyncClient) -> Secret:
        """The current token, refreshed first when missing or about to expire."""
        if self._fresh():
            assert self._token is not None
            return self._token
        return await self.refresh(client, stale=self._token)

    async def refresh(self, client: httpx.AsyncClient, *, stale: Secret | None) -> Secret:
        """Get a new token unless another caller already replaced ``stale``
        (the token that failed or was expiring) with a fresh one."""
        async with self._lock:
            if self._token is not None and self._token is not stale and self._fresh():
                return self._token
            self._token = None
            reply = await self._fetch(client)
            self._token = Secret(reply.access_token)
            self._expires_at = self._clock() + max(reply.expires_in, 0.0)
            return self._token

    async def _fetch(self, client: httpx.AsyncClient) -> _TokenReply:
        self.refreshes += 1
        body = {"grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self.client_secret.reveal()}
        path = self.token_url.split("?", 1)[0]
        try:
            async with asyncio.timeout(self.deadline_s):
                resp = await client.post(self.token_url, json=body)
        except TimeoutError:
            raise TransportFailure(f"token request to {path} timed out", "deadline", path=path) from None
        except httpx.HTTPError as exc:
            raise TransportFailure(f"token request to {path} failed: {type(exc).__name__}", "connect", path=path) from None
        if resp.status_code in (400, 401, 403):
            code, _ = error_code_of(resp.content)
            raise SourceAuthError(f"token endpoint {path} refused the client credentials ({resp.status_code})",
                            code or f"http_{resp.status_code}", path=path, status=resp.status_code,
                            body=resp.content)
        if resp.status_code != 200:
            raise UpstreamError(f"token endpoint {path} answered {resp.status_code}", f"http_{resp.status_code}",
                                path=path, status=resp.status_code, body=resp.content)
        try:
            return msgspec.json.decode(resp.content, type=_TokenReply)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise UpstreamError(f"token endpoint {path} sent an unreadable reply", "bad_token_reply",
                                path=path, status=200) from None


# --- HMAC ------------------------------------------------------------------------


def sign(secret: bytes, ts_ms: int, nonce: str, method: str, target: bytes, body: bytes) -> str:
    """Hex HMAC-SHA256 over ``ts \\n nonce \\n METHOD \\n target \\n body``."""
    msg = b"%d\n%s\n%s\n%s\n%s" % (ts_ms, nonce.encode(), method.upper().encode(), target, body)
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


class HmacSigner:
    """Signs each request (see the module docstring). ``clock_ms``: wall ms."""

    def __init__(self, key_id: str, secret: str | Secret, *,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.key_id = key_id
        self.secret = secret if isinstance(secret, Secret) else Secret(secret)
        self._clock_ms = clock_ms

    def __repr__(self) -> str:
        return f"HmacSigner(key_id={self.key_id!r}, secret=***)"

    def headers(self, method: str, target: bytes, body: bytes) -> dict[str, str]:
        ts = self._clock_ms()
        nonce = secrets.token_hex(12)
        return {
            SIG_KEY_HEADER: self.key_id,
            SIG_TS_HEADER: str(ts),
            SIG_NONCE_HEADER: nonce,
            SIG_HEADER: sign(self.secret.reveal().encode(), ts, nonce, method, target, body),
        }


class NonceCache:
    """Nonces seen within the signature window (bounded, oldest dropped)."""

    def __init__(self, max_items: int = 100_000) -> None:
        self.max_items = max_items
        self._seen: OrderedDict[str, int] = OrderedDict()

    def add(self, nonce: str, ts_ms: int, window_ms: int) -> bool:
        """Record ``nonce``; False if it was seen already (a replay)."""
        if nonce in self._seen:
            return False
        self._seen[nonce] = ts_ms
        while len(self._seen) > self.max_items:
            self._seen.popitem(last=False)
        horizon = ts_ms - 2 * window_ms
        while self._seen:
            first = next(iter(self._seen.values()))
            if first >= horizon:
                break
            self._seen.popitem(last=False)
        return True


def verify_signature(secrets_by_key: Mapping[str, bytes], headers: Mapping[str, str], method: str, target: bytes,
                     body: bytes, *, now_ms: int, window_ms: int = 30_000, nonces: NonceCache | None = None) -> str | None:
    """Check a signed request; None when valid, else the reason
    (``missing_signature``, ``unknown_key``, ``bad_timestamp``,
    ``expired``, ``replayed``, ``bad_signature``)."""
    sig = headers.get(SIG_HEADER.lower()) or headers.get(SIG_HEADER)
    key_id = headers.get(SIG_KEY_HEADER.lower()) or headers.get(SIG_KEY_HEADER)
    ts_text = headers.get(SIG_TS_HEADER.lower()) or headers.get(SIG_TS_HEADER)
    nonce = headers.get(SIG_NONCE_HEADER.lower()) or headers.get(SIG_NONCE_HEADER)
    if not (sig and key_id and ts_text and nonce):
        return "missing_signature"
    secret = secrets_by_key.get(key_id)
    if secret is None:
        return "unknown_key"
    if not ts_text.isdigit() or len(ts_text) > 16 or len(nonce) > 128:
        return "bad_timestamp"
    ts = int(ts_text)
    if abs(now_ms - ts) > window_ms:
        return "expired"
    expected = sign(secret, ts, nonce, method, target, body)
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        return "bad_signature"
    if nonces is not None and not nonces.add(nonce, ts, window_ms):
        return "replayed"
    return None


class SigningTransport(httpx.AsyncBaseTransport):
    """Wraps a transport: adds a query-string key and signs the final request.

    It sits below httpx's logging, so the logged URL and every
    ``httpx.Request`` the caller sees lack the key and the signature.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, *, query_key: ApiKeyAuth | None = None,
                 signer: HmacSigner | None = None) -> None:
        self.inner = inner
        self.query_key = query_key if query_key is not None and query_key.query_param else None
        self.signer = signer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.query_key is None and self.signer is None:
            return await self.inner.handle_async_request(request)
        url = request.url
        qk = self.query_key
        if qk is not None and qk.query_param:  # always, when set (see __init__)
            url = url.copy_add_param(qk.query_param, qk.key.reveal())
        body = await request.aread()
        headers = request.headers.copy()
        if self.signer is not None:
            headers.update(self.signer.headers(request.method, url.raw_path, body))
        signed = httpx.Request(request.method, url, headers=headers, content=body, extensions=request.extensions)
        return await self.inner.handle_async_request(signed)

    async def aclose(self) -> None:
        await self.inner.aclose()

