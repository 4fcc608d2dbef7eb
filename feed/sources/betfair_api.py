"""Betfair's HTTP APIs beside the stream: identity SSO and the market catalogue.

The Exchange Stream API (:mod:`feed.sources.esa`) needs a session token and
carries no names (no event, market or runner names: historic files have
them, the live stream does not). This module gets both, over httpx:

- :class:`BetfairLogin` holds the session token: **interactive login**
  (``POST {sso_url}/api/login``, form ``username``/``password``, header
  ``X-Application``, ``Accept: application/json`` → ``{"token", "status":
  "SUCCESS"|"FAIL", "error"}``) or **certificate login** (``POST
  {cert_sso_url}/api/certlogin`` over TLS with a client certificate →
  ``{"sessionToken", "loginStatus"}``); **keep-alive** (``POST
  {sso_url}/api/keepAlive``, header ``X-Authentication``) every
  ``keep_alive_s`` seconds (Betfair sessions last 12–24 h on the
  international exchange but 20 min in some jurisdictions: the default, 15
  min, keeps both alive); a **new login** when a call answers
  ``NO_SESSION`` / ``INVALID_SESSION_INFORMATION`` (one login for all the
  callers that saw the same stale token).
- :class:`BettingApi` calls the Betting API over JSON-RPC (``POST
  {betting_url}/json-rpc/v1``, a batch of one ``SportsAPING/v1.0/…`` call)
  with ``X-Application``/``X-Authentication``; an answer with a session
  error logs in again and repeats the call once.
- :class:`CatalogueFetcher` fetches ``listMarketCatalogue`` for the markets
  the stream shows — when a market is first seen and again when its
  ``marketDefinition.version`` changes — in batches whose **request weight**
  (Betfair's market data request limits: the sum of the projection weights ×
  the number of markets) never exceeds 200, one request at a time, and
  hands each entry on as ``{"op": "marketCatalogue", …entry}`` bytes (what
  flumine's recorder writes and :class:`feed.normalise.betfair.BetfairNormaliser`
  reads). A failed request is retried with backoff; it never holds up the
  stream's prices. A market the stream shows open that the answer leaves
  out (the Betting API lists a new market a moment after the stream shows
  it; a brief glitch) is asked for again after 2 s, 10 s and 60 s; one the
  stream shows ``CLOSED`` is never asked for (Betfair lists only ACTIVE and
  SUSPENDED markets).

Secrets: every password, app key and session token is registered with
:mod:`feed.redaction`, so no log line carries one.

Errors (drawn in the tree of :mod:`feed.errors`)::

    SourceError
     ├── RetryableSourceError
     │    └── BetfairApiError    an SSO or Betting API call failed; ``code`` = Betfair's
     │                           (``TOO_MANY_REQUESTS``, ``http_503``, ``transport`` …)
     └── FatalSourceError
          └── SourceAuthError    a login refused for good (``INVALID_USERNAME_OR_PASSWORD``,
                                 ``ACCOUNT_NOW_LOCKED`` …): never retried, it could lock the account
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import orjson

from feed.aio import wait_event
from feed.errors import RetryableSourceError
from feed.redaction import register_secret
from feed.sources.backoff import Backoff
from feed.sources.esa_protocol import SESSION_ERROR_CODES
from feed.sources.http_limits import SourceAuthError

__all__ = [
    "BETTING_URL",
    "CATALOGUE_PROJECTION",
    "CERT_SSO_URL",
    "MAX_REQUEST_WEIGHT",
    "PROJECTION_WEIGHTS",
    "SSO_URL",
    "BetfairApiError",
    "BetfairLogin",
    "BettingApi",
    "CatalogueFetcher",
    "Credentials",
    "catalogue_weight",
    "definitions_in",
    "markets_per_request",
]

logger = logging.getLogger(__name__)

#: identity SSO (interactive login, keep-alive, logout)
SSO_URL = "https://identitysso.betfair.com"
#: identity SSO for the certificate (non-interactive) login
CERT_SSO_URL = "https://identitysso-cert.betfair.com"
#: the Betting API (``…/json-rpc/v1`` is appended)
BETTING_URL = "https://api.betfair.com/exchange/betting"

#: what :class:`CatalogueFetcher` asks ``listMarketCatalogue`` for
CATALOGUE_PROJECTION: tuple[str, ...] = (
    "EVENT", "EVENT_TYPE", "COMPETITION", "MARKET_START_TIME", "RUNNER_DESCRIPTION", "MARKET_DESCRIPTION")
#: Betfair's market data request weight of each ``listMarketCatalogue`` projection, per market
PROJECTION_WEIGHTS: dict[str, int] = {
    "MARKET_DESCRIPTION": 1, "RUNNER_DESCRIPTION": 0, "EVENT": 0, "EVENT_TYPE": 0, "COMPETITION": 0,
    "RUNNER_METADATA": 1, "MARKET_START_TIME": 0,
}
#: the most one request may weigh (sum of weights × markets); more is ``TOO_MUCH_DATA``
MAX_REQUEST_WEIGHT = 200
#: ``listMarketCatalogue`` ``maxResults`` upper bound
MAX_RESULTS = 1000

#: login errors worth another try later (the rest need a human: retrying could lock the account)
_RETRYABLE_LOGIN_ERRORS = frozenset({"TEMPORARY_BAN_TOO_MANY_REQUESTS", "INTERNAL_ERROR", "UNEXPECTED_ERROR",
                                     "SERVICE_BUSY"})


def catalogue_weight(projection: Iterable[str]) -> int:
    """The request weight of one market under ``projection`` (unknown projections weigh 1)."""
    return sum(PROJECTION_WEIGHTS.get(p, 1) for p in set(projection))


def markets_per_request(projection: Iterable[str], max_weight: int = MAX_REQUEST_WEIGHT) -> int:
    """How many markets one ``listMarketCatalogue`` request may name: ``max_weight`` // the
    weight per market (at least 1), or :data:`MAX_RESULTS` when the projection weighs nothing."""
    weight = catalogue_weight(projection)
    return MAX_RESULTS if weight == 0 else max(1, min(MAX_RESULTS, max_weight // weight))


class BetfairApiError(RetryableSourceError):
    """An SSO or Betting API call failed in a way a retry may fix.

    Attributes:
        code: Betfair's error code (``NO_SESSION``, ``TOO_MUCH_DATA``,
            ``TOO_MANY_REQUESTS``, ``TEMPORARY_BAN_TOO_MANY_REQUESTS`` …), or
            ``http_<status>`` for an HTTP error without one, ``transport``
            for a failed connection or timeout, ``bad_answer`` for a body
            that is not the documented JSON.
        operation: what failed: ``login``, ``certlogin``, ``keepAlive``,
            ``logout`` or the Betting API method (``listMarketCatalogue``).
    """

    def __init__(self, code: str, *, operation: str, detail: str = "") -> None:
        super().__init__(f"betfair {operation} failed", code)
        self.operation = operation
        self.detail = detail

    @property
    def session_expired(self) -> bool:
        """The session token was missing, invalid or expired: log in again."""
        return self.code in SESSION_ERROR_CODES

    def __str__(self) -> str:
        text = f"betfair {self.operation} failed: {self.code}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class Credentials:
    """What :class:`BetfairLogin` logs in with (never shown by ``repr``).

    app_key: the application key (``X-Application``). username / password:
    the account's, for both logins. cert_file / key_file: PEM paths of the
    client certificate and its key: certificate login when set, interactive
    login otherwise. session: a session token obtained elsewhere, used
    until it expires (with no username it cannot be renewed: its expiry is
    then fatal).
    """

    app_key: str = field(repr=False)
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    cert_file: str | None = None
    key_file: str | None = None
    session: str | None = field(default=None, repr=False)

    @property
    def can_login(self) -> bool:
        return bool(self.username and self.password)

    @property
    def cert_login(self) -> bool:
        return bool(self.cert_file)


class _LoginAnswer(msgspec.Struct, kw_only=True):
    # interactive login / keepAlive / logout
    token: str | None = None
    status: str | None = None
    error: str | None = None
    # certlogin
    sessionToken: str | None = None
    loginStatus: str | None = None


_decode_login = msgspec.json.Decoder(_LoginAnswer).decode


def _wall_s() -> float:
    return time.monotonic()


def _tls(verify: _ssl.SSLContext | str | bool, *, fresh: bool = False) -> _ssl.SSLContext:
    """An SSL context from httpx-style ``verify``: a context (its CA
    certificates copied into a new one when ``fresh``, so a client
    certificate never lands in the caller's), a CA bundle path, True
    (system CAs) or False (no verification)."""
    if isinstance(verify, _ssl.SSLContext):
        if not fresh:
            return verify
        ctx = _ssl.create_default_context()
        for ca in verify.get_ca_certs(binary_form=True):
            ctx.load_verify_locations(cadata=ca)
        ctx.check_hostname, ctx.verify_mode = verify.check_hostname, verify.verify_mode
        return ctx
    ctx = _ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if verify is False:
        ctx.check_hostname = False
        ctx.verify_mode = _ssl.CERT_NONE
    return ctx


class BetfairLogin:
    """The Betfair session token: login, keep-alive, new login on expiry.

    Args:
        credentials: see :class:`Credentials`.
        sso_url: identity SSO base URL (interactive login, keep-alive,
            logout), default :data:`SSO_URL`.
        cert_sso_url: base URL of the certificate login, default :data:`CERT_SSO_URL`.
        keep_alive_s: seconds between keep-alives (counted from the last
            login or keep-alive); 0 turns them off.
        timeout_s: per-request limit, seconds.
        verify: TLS verification of the SSO hosts (httpx ``verify``: True,
            a CA bundle path or an ``ssl.SSLContext``).
        name: the source name, for logs.

    :meth:`token` logs in on first use; :meth:`relogin` after a session
    error; :meth:`run_keep_alive` keeps the session alive until cancelled.
    Counters for tests and logs: ``logins``, ``keep_alives``.

    Raises (from :meth:`token`, :meth:`relogin`):
        SourceAuthError: Betfair refused the login for good (bad password,
            locked account, a fixed ``session`` that expired with no
            username to log in again); remembered: later calls raise it
            again without asking Betfair (a retry could lock the account).
        BetfairApiError: a failure worth retrying (network, 5xx,
            ``TEMPORARY_BAN_TOO_MANY_REQUESTS``).
    """

    def __init__(self, credentials: Credentials, *, sso_url: str = SSO_URL, cert_sso_url: str = CERT_SSO_URL,
                 keep_alive_s: float = 900.0, timeout_s: float = 10.0,
                 verify: _ssl.SSLContext | str | bool = True, name: str = "betfair") -> None:
        self.credentials = credentials
        self.sso_url = sso_url.rstrip("/")
        self.cert_sso_url = cert_sso_url.rstrip("/")
        self.keep_alive_s = keep_alive_s
        self.name = name
        register_secret(credentials.app_key)
        register_secret(credentials.password)
        register_secret(credentials.session)
        self._client = httpx.AsyncClient(timeout=timeout_s, verify=_tls(verify))
        self._cert_client: httpx.AsyncClient | None = None
        if credentials.cert_login:
            ctx = _tls(verify, fresh=True)
            try:
                ctx.load_cert_chain(credentials.cert_file or "", credentials.key_file)
            except (OSError, _ssl.SSLError) as exc:
                from feed.errors import ConfigError

                raise ConfigError(f"source {name}: cannot load the client certificate: {exc}") from None
            self._cert_client = httpx.AsyncClient(timeout=timeout_s, verify=ctx)
        self._token: str | None = credentials.session
        self._lock = asyncio.Lock()
        self._fatal: SourceAuthError | None = None
        self._refreshed_at = _wall_s()
        self.logins = 0
        self.keep_alives = 0

    def __repr__(self) -> str:
        return f"<BetfairLogin {self.name} {self.sso_url}>"

    @property
    def current(self) -> str | None:
        """The token held now (None before the first login)."""
        return self._token

    async def token(self) -> str:
        """The session token, logging in first when there is none."""
        if self._token is not None:
            return self._token
        async with self._lock:
            if self._token is None:
                await self._login()
            assert self._token is not None
            return self._token

    async def relogin(self, stale: str | None) -> str:
        """A call answered that ``stale`` is no longer a session: log in again
        (once, however many callers saw the same stale token) and return the
        new token."""
        async with self._lock:
            if self._token is None or self._token == stale:
                self._token = None
                if not self.credentials.can_login:
                    self._fatal = SourceAuthError("betfair session expired and no username/password to log in "
                                                  "again", "NO_SESSION", provider="betfair")
                    raise self._fatal
                await self._login()
            assert self._token is not None
            return self._token

    async def _login(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        creds = self.credentials
        if not creds.can_login:
            raise SourceAuthError("betfair login needs username and password (or a session)", "NO_SESSION",
                                  provider="betfair")
        cert = self._cert_client is not None
        operation = "certlogin" if cert else "login"
        client = self._cert_client if self._cert_client is not None else self._client
        url = f"{self.cert_sso_url if cert else self.sso_url}/api/{operation}"
        answer = await self._post(client, url, operation, data={"username": creds.username or "",
                                                                  "password": creds.password or ""})
        token = answer.sessionToken if cert else answer.token
        status = answer.loginStatus if cert else answer.status
        if status != "SUCCESS" or not token:
            code = (answer.loginStatus if cert else answer.error) or "LOGIN_FAILED"
            if code in _RETRYABLE_LOGIN_ERRORS:
                raise BetfairApiError(code, operation=operation)
            self._fatal = SourceAuthError(f"betfair {operation} refused", code, provider="betfair")
            logger.error("betfair %s: %s refused: %s; not retrying", self.name, operation, code)
            raise self._fatal
        register_secret(token)
        self._token = token
        self._refreshed_at = _wall_s()
        self.logins += 1
        logger.info("betfair %s: logged in (%s)", self.name, operation)

    async def keep_alive(self) -> None:
        """Extend the session (``/api/keepAlive``); a session error logs in again.

        Raises:
            BetfairApiError: the call failed (retry later).
            SourceAuthError: a new login was refused for good.
        """
        token = self._token
        if token is None:
            await self.token()
            return
        headers = {"X-Authentication": token}
        try:
            answer = await self._post(self._client, f"{self.sso_url}/api/keepAlive", "keepAlive", headers=headers)
        except BetfairApiError as exc:
            if not exc.session_expired:
                raise
            answer = _LoginAnswer(status="FAIL", error=exc.code)
        if answer.status == "SUCCESS":
            if answer.token and answer.token != token:
                register_secret(answer.token)
                self._token = answer.token
            self._refreshed_at = _wall_s()
            self.keep_alives += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("betfair %s: session kept alive", self.name)
            return
        code = answer.error or "KEEP_ALIVE_FAILED"
        if code in SESSION_ERROR_CODES:
            logger.info("betfair %s: keep-alive answered %s; logging in again", self.name, code)
            await self.relogin(token)
            return
        raise BetfairApiError(code, operation="keepAlive")

    async def run_keep_alive(self, stop: asyncio.Event | None = None) -> None:
        """Keep the session alive until cancelled (or ``stop`` is set): a
        keep-alive ``keep_alive_s`` after the last login or keep-alive; a
        failed one is retried with backoff (1 s … 60 s, never later than the
        next regular one). Returns at once when ``keep_alive_s`` is 0 or the
        login is a fixed session with no app key to keep it."""
        if self.keep_alive_s <= 0:
            return
        stop = stop or asyncio.Event()
        backoff = Backoff(initial_s=1.0, max_s=60.0)
        retry_at: float | None = None
        while not stop.is_set():
            due = retry_at if retry_at is not None else self._refreshed_at + self.keep_alive_s
            delay = due - _wall_s()
            if delay > 0:
                await wait_event(stop, delay)
                continue
            try:
                await self.keep_alive()
                retry_at = None
                backoff.reset()
            except BetfairApiError as exc:
                wait = min(backoff.next_delay() + 0.05, self.keep_alive_s)
                retry_at = _wall_s() + wait
                logger.warning("betfair %s: %s; retrying in %.1f s", self.name, exc, wait)
            except SourceAuthError as exc:
                logger.error("betfair %s: %s; keep-alive stopped", self.name, exc)
                return

    async def logout(self) -> None:
        """End the session (``/api/logout``); errors are logged, never raised."""
        token, self._token = self._token, None
        if token is None or token == self.credentials.session:
            return
        try:
            await self._post(self._client, f"{self.sso_url}/api/logout", "logout",
                             headers={"X-Authentication": token})
            logger.info("betfair %s: logged out", self.name)
        except BetfairApiError as exc:
            logger.info("betfair %s: %s", self.name, exc)

    async def aclose(self) -> None:
        """Close the HTTP clients (the session stays valid until it expires)."""
        await self._client.aclose()
        if self._cert_client is not None:
            await self._cert_client.aclose()

    async def _post(self, client: httpx.AsyncClient, url: str, operation: str, *,
                    data: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> _LoginAnswer:
        all_headers = {"X-Application": self.credentials.app_key, "Accept": "application/json", **(headers or {})}
        try:
            resp = await client.post(url, data=data, headers=all_headers)
        except httpx.HTTPError as exc:
            raise BetfairApiError("transport", operation=operation, detail=type(exc).__name__) from None
        if resp.status_code >= 500 or resp.status_code == 429:
            raise BetfairApiError(f"http_{resp.status_code}", operation=operation)
        try:
            return _decode_login(resp.content)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise BetfairApiError("bad_answer" if resp.status_code < 400 else f"http_{resp.status_code}",
                                  operation=operation) from None


# -- the Betting API -----------------------------------------------------------------


class BettingApi:
    """Betting API calls over JSON-RPC with the session of ``login``.

    url: base URL (default :data:`BETTING_URL`; ``/json-rpc/v1`` is
    appended). timeout_s: per-request limit, seconds. verify: TLS
    verification (httpx ``verify``). ``requests`` counts calls sent.
    """

    def __init__(self, login: BetfairLogin, *, url: str = BETTING_URL, timeout_s: float = 15.0,
                 verify: _ssl.SSLContext | str | bool = True) -> None:
        self.login = login
        self.url = url.rstrip("/") + "/json-rpc/v1"
        self._client = httpx.AsyncClient(timeout=timeout_s, verify=_tls(verify))
        self.requests = 0

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """Call ``SportsAPING/v1.0/<method>``; returns its ``result`` (decoded
        JSON). A session error logs in again and repeats the call once.

        Raises:
            BetfairApiError: Betfair answered an error (``code`` = its
                ``APINGException`` errorCode, e.g. ``TOO_MUCH_DATA``,
                ``TOO_MANY_REQUESTS``) or the call failed (``http_503``,
                ``transport``, ``bad_answer``).
            SourceAuthError: a new login was refused for good.
        """
        token = await self.login.token()
        try:
            return await self._call(method, params, token)
        except BetfairApiError as exc:
            if not exc.session_expired:
                raise
            logger.info("betfair %s: %s answered %s; logging in again", self.login.name, method, exc.code)
        token = await self.login.relogin(token)
        return await self._call(method, params, token)

    async def _call(self, method: str, params: dict[str, Any], token: str) -> Any:
        body = orjson.dumps([{"jsonrpc": "2.0", "method": f"SportsAPING/v1.0/{method}", "params": params, "id": 1}])
        headers = {"X-Application": self.login.credentials.app_key, "X-Authentication": token,
                   "Content-Type": "application/json", "Accept": "application/json"}
        self.requests += 1
        try:
            resp = await self._client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise BetfairApiError("transport", operation=method, detail=type(exc).__name__) from None
        try:
            answer = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            answer = None
        if isinstance(answer, list) and answer:
            answer = answer[0]
        if not isinstance(answer, dict):
            code = f"http_{resp.status_code}" if resp.status_code >= 400 else "bad_answer"
            raise BetfairApiError(code, operation=method)
        error = answer.get("error")
        if error is not None:
            raise BetfairApiError(_error_code(error), operation=method)
        if resp.status_code >= 400:
            raise BetfairApiError(f"http_{resp.status_code}", operation=method)
        return answer.get("result")

    async def list_market_catalogue(self, market_ids: Sequence[str],
                                    projection: Sequence[str] = CATALOGUE_PROJECTION) -> list[dict[str, Any]]:
        """``listMarketCatalogue`` of ``market_ids`` (CLOSED markets are not
        returned: Betfair lists only ACTIVE/SUSPENDED ones). Raises as :meth:`call`."""
        result = await self.call("listMarketCatalogue", {
            "filter": {"marketIds": list(market_ids)}, "marketProjection": list(projection),
            "maxResults": len(market_ids)})
        if not isinstance(result, list):
            raise BetfairApiError("bad_answer", operation="listMarketCatalogue")
        return [e for e in result if isinstance(e, dict) and isinstance(e.get("marketId"), str)]

    async def aclose(self) -> None:
        await self._client.aclose()


def _error_code(error: Any) -> str:
    """The ``APINGException`` errorCode of a JSON-RPC ``error`` (else its message, else ``UNEXPECTED_ERROR``)."""
    if isinstance(error, dict):
        data = error.get("data")
        if isinstance(data, dict):
            for value in data.values():
                if isinstance(value, dict) and isinstance(value.get("errorCode"), str):
                    return str(value["errorCode"])
        message = error.get("message")
        if isinstance(message, str) and message:
            return message
    return "UNEXPECTED_ERROR"


# -- which markets the stream shows ---------------------------------------------------


class _DefView(msgspec.Struct, gc=False):
    version: int | None = None
    status: str | None = None


class _McView(msgspec.Struct, gc=False):
    id: str
    marketDefinition: _DefView | None = None


class _McmView(msgspec.Struct, gc=False):
    mc: list[_McView] | None = None


_decode_view = msgspec.json.Decoder(_McmView).decode
_MARKER = b'"marketDefinition"'


def definitions_in(line: bytes) -> list[tuple[str, int | None, bool]]:
    """``(market id, marketDefinition.version, closed)`` of every market
    change in one ESA ``mcm`` line that carries a definition (``closed``:
    its status is ``CLOSED``); ``[]`` for any other line (decoded only when
    the bytes mention a definition: price deltas cost one substring search)."""
    if _MARKER not in line:
        return []
    try:
        msg = _decode_view(line)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []
    return [(mc.id, mc.marketDefinition.version, mc.marketDefinition.status == "CLOSED")
            for mc in msg.mc or () if mc.marketDefinition is not None]


# -- the catalogue fetcher -----------------------------------------------------------


_CLOSED = object()  # (CatalogueFetcher.run: a market no longer wanted — the stream showed it closed)


class CatalogueFetcher:
    """Names for the markets the stream shows (see the module docstring).

    Args:
        api: the Betting API client.
        deliver: ``await deliver(entries)`` with one ``{"op":
            "marketCatalogue", …}`` JSON line (bytes) per market returned.
        projection: ``marketProjection`` (default :data:`CATALOGUE_PROJECTION`).
        max_weight: the most one request may weigh (default
            :data:`MAX_REQUEST_WEIGHT`, Betfair's limit); the batch size is
            :func:`markets_per_request`.
        min_interval_s: least time between two requests, seconds.
        backoff_initial_s, backoff_max_s: retry delays after a failed
            request (full jitter), seconds.
        missing_retry_s: after an answer leaves out a market the stream
            shows open, ask for it again after each of these delays
            (seconds, counted from that answer); then not until its version
            changes.
        name: the source name, for logs.

    :meth:`observe` (sync, from the stream's delivery) asks for a market;
    :meth:`run` fetches until cancelled. A market the stream shows closed
    is not asked for (Betfair would not list it). For tests and logs:
    ``requests`` (markets per request sent, in order), ``weights`` (their
    weights), ``failures``, ``delivered`` (entries handed on), ``missing``
    (markets an answer left out, counted per answer), :attr:`retrying`.
    """

    def __init__(self, api: BettingApi, deliver: Callable[[list[bytes]], Awaitable[None]], *,
                 projection: Sequence[str] = CATALOGUE_PROJECTION, max_weight: int = MAX_REQUEST_WEIGHT,
                 min_interval_s: float = 0.2, backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0,
                 missing_retry_s: Sequence[float] = (2.0, 10.0, 60.0), name: str = "betfair") -> None:
        self.api = api
        self.deliver = deliver
        self.projection = tuple(projection)
        self.weight_per_market = catalogue_weight(self.projection)
        self.batch_size = markets_per_request(self.projection, max_weight)
        self.min_interval_s = min_interval_s
        self.name = name
        self._backoff = Backoff(initial_s=backoff_initial_s, max_s=backoff_max_s)
        self._wanted: dict[str, int | None] = {}  # market id -> the version to fetch for (insertion order)
        self._done: dict[str, int | None] = {}  # market id -> the version last fetched (or not returned)
        self.missing_retry_s = tuple(missing_retry_s)
        # market id -> (version, answers that left it out, when to ask again: monotonic s)
        self._missing: dict[str, tuple[int | None, int, float]] = {}
        self._wake = asyncio.Event()
        self.requests: list[int] = []
        self.weights: list[int] = []
        self.failures = 0
        self.delivered = 0
        self.missing = 0

    def observe(self, market_id: str, version: int | None, closed: bool = False) -> None:
        """The stream carried ``market_id``'s definition at ``version``: fetch
        its catalogue if it was never fetched or its version moved on —
        unless ``closed`` (its status is ``CLOSED``: Betfair lists only open
        markets), which also ends any pending ask for it."""
        if closed:
            self._wanted.pop(market_id, None)
            self._missing.pop(market_id, None)
            self._done[market_id] = version
            return
        if market_id in self._done and self._done[market_id] == version:
            return
        if market_id in self._wanted and self._wanted[market_id] == version:
            return
        self._missing.pop(market_id, None)
        self._wanted[market_id] = version
        self._wake.set()

    def observe_lines(self, lines: Iterable[bytes]) -> None:
        """:meth:`observe` every definition in ``lines`` (raw ``mcm`` lines)."""
        for line in lines:
            for market_id, version, closed in definitions_in(line):
                self.observe(market_id, version, closed)

    def _ask_again_due(self) -> float | None:
        """Move the left-out markets whose next ask is due into the wanted
        ones; return the seconds until the next one is due (None: none left)."""
        if not self._missing:
            return None
        now = time.monotonic()
        nxt = None
        for mid, (version, _, due) in list(self._missing.items()):
            if due <= now:
                self._wanted.setdefault(mid, version)
            elif nxt is None or due < nxt:
                nxt = due
        return None if nxt is None else nxt - now

    def _left_out(self, mid: str, version: int | None) -> None:
        """An answer did not list ``mid`` (asked at ``version``)."""
        self.missing += 1
        prev = self._missing.get(mid)
        tries = prev[1] + 1 if prev is not None and prev[0] == version else 1
        if tries > len(self.missing_retry_s):
            self._missing.pop(mid, None)
            return
        self._missing[mid] = (version, tries, time.monotonic() + self.missing_retry_s[tries - 1])

    @property
    def pending(self) -> int:
        """Markets waiting for a request."""
        return len(self._wanted)

    @property
    def retrying(self) -> int:
        """Markets an answer left out that will be asked for again."""
        return len(self._missing)

    async def run(self) -> None:
        """Fetch until cancelled. Never raises for a failed request (it is
        retried with backoff); returns when a login is refused for good
        (the stream carries on without names)."""
        last = -1e18
        while True:
            wait = self._ask_again_due()
            if not self._wanted:
                self._wake.clear()
                if wait is None:
                    await self._wake.wait()
                else:  # (not asyncio.wait_for: on 3.11 it can swallow a cancel — feed.aio)
                    await wait_event(self._wake, wait)
                continue
            gap = last + self.min_interval_s - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            batch = list(self._wanted.items())[:self.batch_size]
            ids = [mid for mid, _ in batch]
            last = time.monotonic()
            self.requests.append(len(ids))
            self.weights.append(len(ids) * self.weight_per_market)
            try:
                entries = await self.api.list_market_catalogue(ids, self.projection)
            except BetfairApiError as exc:
                self.failures += 1
                if exc.code == "TOO_MUCH_DATA" and self.batch_size > 1:
                    self.batch_size = max(1, self.batch_size // 2)  # Betfair weighs more than our table says
                delay = self._backoff.next_delay()
                logger.warning("betfair %s: catalogue of %d market(s): %s; retrying in %.2f s",
                               self.name, len(ids), exc, delay)
                await asyncio.sleep(delay)
                continue
            except SourceAuthError as exc:
                logger.error("betfair %s: catalogue stopped: %s (prices go on without names)", self.name, exc)
                return
            self._backoff.reset()
            listed = {e["marketId"] for e in entries}
            for mid, version in batch:
                wanted = self._wanted.get(mid, _CLOSED)
                if wanted is _CLOSED:
                    continue  # the stream showed it closed meanwhile (observe: done, nothing to ask)
                if wanted == version:
                    del self._wanted[mid]
                    if mid in listed:
                        self._missing.pop(mid, None)
                    else:
                        self._left_out(mid, version)
                self._done[mid] = version
            if entries:
                lines = [orjson.dumps({"op": "marketCatalogue", **e}) for e in entries]
                await self.deliver(lines)
                self.delivered += len(lines)
            missing = len(ids) - len(entries)
            if missing and logger.isEnabledFor(logging.DEBUG):
                logger.debug("betfair %s: %d market(s) without a catalogue (closed or unknown)", self.name, missing)
