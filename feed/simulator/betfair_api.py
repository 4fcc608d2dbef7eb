"""Betfair's identity SSO and Betting API, served locally over real HTTP.

The ESA simulator (:mod:`feed.simulator.esa_server`) streams prices with no
names, as Betfair's live stream does; this module serves what a live client
needs beside the stream, in Betfair's wire format:

- ``POST /api/login`` (form ``username``, ``password``; header
  ``X-Application``; ``Accept: application/json``) → ``{"token", "product",
  "status": "SUCCESS"|"FAIL", "error"}`` (``INVALID_USERNAME_OR_PASSWORD``,
  ``INPUT_VALIDATION_ERROR``);
- ``POST /api/certlogin`` → ``{"sessionToken", "loginStatus"}``: over the
  TLS listener that requires a client certificate (``cert_tls``) it logs in;
  on the plain listener it answers ``CERT_AUTH_REQUIRED`` as Betfair does
  without a certificate;
- ``POST /api/keepAlive`` / ``/api/logout`` (header ``X-Authentication``) →
  ``{"token", "product", "status", "error"}`` (``NO_SESSION`` for a token
  that is missing, unknown or expired);
- ``POST /exchange/betting/json-rpc/v1``: JSON-RPC 2.0 (one call or a
  batch) of ``SportsAPING/v1.0/listMarketCatalogue``, answered from the
  simulator's markets (names from the books' definitions, which keep them
  as historic files do; competitions from the model). Errors are
  ``APINGException`` s with Betfair's codes: ``NO_APP_KEY``,
  ``INVALID_APP_KEY``, ``NO_SESSION``, ``INVALID_SESSION_INFORMATION``,
  ``TOO_MUCH_DATA`` (request weight over ``max_weight``),
  ``INVALID_INPUT_DATA``; CLOSED markets are not returned.

:class:`Sessions` is the one registry of session tokens, shared with the ESA
server, which checks the token of every ``authentication``. A token expires
``session_ttl_s`` after it was issued or last kept alive (None: never).

Switches for tests and demos: :meth:`BetfairApi.expire_sessions` (optionally
telling open streams ``NO_SESSION``), :meth:`BetfairApi.fail_catalogue` (the
next ``n`` calls answer an error code or an HTTP status), ``BetfairApi.unlisted``
(market ids the catalogue leaves out though the stream shows them open: as
Betfair's Betting API does for a moment after a market is created), and the counters
``logins``, ``keep_alives``, ``logouts`` and ``catalogue_requests`` (each
call's market count, weight and answer).
"""

from __future__ import annotations

import logging
import secrets
import ssl as _ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from feed.asgi_server import LocalServer
from feed.simulator.market_model import SPORTS, MarketModel

if TYPE_CHECKING:
    from feed.simulator.wire import MarketBook

__all__ = ["PROJECTION_WEIGHTS", "BetfairApi", "CatalogueCall", "Sessions", "catalogue_entry"]

logger = logging.getLogger(__name__)

#: Betfair's market data request weight of each listMarketCatalogue projection, per market
PROJECTION_WEIGHTS: dict[str, int] = {
    "MARKET_DESCRIPTION": 1, "RUNNER_DESCRIPTION": 0, "EVENT": 0, "EVENT_TYPE": 0, "COMPETITION": 0,
    "RUNNER_METADATA": 1, "MARKET_START_TIME": 0,
}
_BETTING_PATH = "/exchange/betting/json-rpc/v1"
_ANGX = {"TOO_MUCH_DATA": "ANGX-0001", "INVALID_INPUT_DATA": "ANGX-0002", "INVALID_SESSION_INFORMATION": "ANGX-0003",
         "NO_APP_KEY": "ANGX-0004", "NO_SESSION": "ANGX-0005", "UNEXPECTED_ERROR": "ANGX-0006",
         "INVALID_APP_KEY": "ANGX-0007", "TOO_MANY_REQUESTS": "ANGX-0008", "SERVICE_BUSY": "ANGX-0009"}


def _now_s() -> float:
    return time.monotonic()


class Sessions:
    """Session tokens the SSO issued (plus ``fixed`` ones, e.g. the
    simulator's configured ``session_token``), each with its expiry.

    ttl_s: a token expires this many seconds after it was issued or kept
    alive (None: never). ``check(token)`` → None when valid, else the code
    Betfair answers: ``NO_SESSION`` (none given) or
    ``INVALID_SESSION_INFORMATION`` (unknown or expired).
    """

    def __init__(self, ttl_s: float | None = None, fixed: tuple[str, ...] = ()) -> None:
        self.ttl_s = ttl_s
        self._expires: dict[str, float | None] = {t: None for t in fixed if t}
        self.on_expire: list[Callable[[str], None]] = []

    def issue(self) -> str:
        token = secrets.token_urlsafe(24)
        self._expires[token] = None if self.ttl_s is None else _now_s() + self.ttl_s
        return token

    def check(self, token: str | None) -> str | None:
        if not token:
            return "NO_SESSION"
        if token not in self._expires:
            return "INVALID_SESSION_INFORMATION"
        expires = self._expires[token]
        if expires is not None and _now_s() >= expires:
            del self._expires[token]
            return "INVALID_SESSION_INFORMATION"
        return None

    def touch(self, token: str) -> bool:
        """Keep ``token`` alive; False when it is not a live session."""
        if self.check(token) is not None:
            return False
        if self._expires[token] is not None and self.ttl_s is not None:
            self._expires[token] = _now_s() + self.ttl_s
        return True

    def revoke(self, token: str) -> bool:
        return self._expires.pop(token, False) is not False

    def expire_all(self) -> int:
        """Every token (fixed ones too) stops being a session; returns how many."""
        n = len(self._expires)
        for token in list(self._expires):
            del self._expires[token]
            for callback in self.on_expire:
                callback(token)
        return n

    def __len__(self) -> int:
        return len(self._expires)


@dataclass
class CatalogueCall:
    """One listMarketCatalogue call: how many markets it named, its weight and
    what it answered (``ok`` or the error code / ``http_<status>``); ``ids``
    the market ids it named, ``returned`` those it listed, ``at`` when it was
    answered (wall-clock seconds) — for tests' diagnostics."""

    markets: int
    weight: int
    answer: str
    ids: tuple[str, ...] = ()
    returned: tuple[str, ...] = ()
    at: float = 0.0


def catalogue_entry(mb: MarketBook, projection: set[str], competition: tuple[str, str] | None) -> dict[str, Any]:
    """A Betfair ``MarketCatalogue`` of one simulated market (names from its
    definition, which keeps them as historic files do)."""
    md = mb.definition or {}
    entry: dict[str, Any] = {"marketId": mb.market_id, "marketName": md.get("name") or md.get("marketType") or ""}
    if "MARKET_START_TIME" in projection and md.get("marketTime"):
        entry["marketStartTime"] = md["marketTime"]
    if "MARKET_DESCRIPTION" in projection:
        entry["description"] = {
            "persistenceEnabled": md.get("persistenceEnabled", False), "bspMarket": md.get("bspMarket", False),
            "marketTime": md.get("marketTime"), "suspendTime": md.get("suspendTime"),
            "bettingType": md.get("bettingType", "ODDS"), "turnInPlayEnabled": md.get("turnInPlayEnabled", False),
            "marketType": md.get("marketType"), "regulator": "MALTA LOTTERIES AND GAMBLING AUTHORITY",
            "marketBaseRate": md.get("marketBaseRate", 5), "discountAllowed": md.get("discountAllowed", True),
            "wallet": "UK wallet", "rules": "Simulated market.", "rulesHasDate": True,
            "priceLadderDescription": md.get("priceLadderDefinition", {"type": "CLASSIC"})}
    entry["totalMatched"] = mb.tv or 0.0
    if "RUNNER_DESCRIPTION" in projection or "RUNNER_METADATA" in projection:
        entry["runners"] = [
            {"selectionId": r.get("id"), "runnerName": r.get("name") or str(r.get("id")),
             "handicap": float(r.get("hc") or 0.0), "sortPriority": r.get("sortPriority", i + 1),
             **({"metadata": {"runnerId": str(r.get("id"))}} if "RUNNER_METADATA" in projection else {})}
            for i, r in enumerate(md.get("runners") or ())]
    sport = md.get("eventTypeId")
    if "EVENT_TYPE" in projection and sport:
        entry["eventType"] = {"id": sport, "name": SPORTS.get(sport, f"Sport {sport}")}
    if "COMPETITION" in projection and competition is not None:
        entry["competition"] = {"id": competition[0], "name": competition[1]}
    if "EVENT" in projection and md.get("eventId"):
        event: dict[str, Any] = {"id": md["eventId"], "name": md.get("eventName") or ""}
        if md.get("countryCode"):
            event["countryCode"] = md["countryCode"]
        event["timezone"] = md.get("timezone", "GMT")
        if md.get("venue"):
            event["venue"] = md["venue"]
        if md.get("openDate"):
            event["openDate"] = md["openDate"]
        entry["event"] = event
    return entry


class BetfairApi:
    """The SSO and Betting API of one simulator (see the module docstring).

    books: the simulator's markets (market id → MarketBook). model: the
    synthetic model (competitions), None in replay mode. sessions: the
    token registry shared with the ESA server. app_key / username /
    password: what logins must match. max_weight: a listMarketCatalogue call
    heavier than this answers TOO_MUCH_DATA (Betfair: 200).
    host / port: the plain HTTP listener (port 0 = any free one; read
    ``port`` after :meth:`start`). cert_tls: ``(server cert, server key,
    client CA)`` PEM paths for a second, TLS listener that requires a
    client certificate signed by that CA (``cert_port``): the certificate
    login.
    """

    def __init__(self, books: dict[str, MarketBook], sessions: Sessions, *, model: MarketModel | None = None,
                 app_key: str = "sim-app-key", username: str = "sim-user", password: str = "sim-password",
                 max_weight: int = 200, host: str = "127.0.0.1", port: int = 0,
                 cert_tls: tuple[str, str, str] | None = None) -> None:
        self.books = books
        self.sessions = sessions
        self.model = model
        self.app_key = app_key
        self.username = username
        self.password = password
        self.max_weight = max_weight
        self.host = host
        self.port = port
        self.cert_tls = cert_tls
        self.cert_port = 0
        self.logins = 0
        self.cert_logins = 0
        self.failed_logins = 0
        self.keep_alives = 0
        self.logouts = 0
        self.catalogue_requests: deque[CatalogueCall] = deque(maxlen=10_000)
        self._faults: deque[str | int] = deque()
        #: market ids listMarketCatalogue leaves out while they are here (see the module docstring)
        self.unlisted: set[str] = set()
        self.app = Starlette(routes=[
            Route("/api/login", self._login, methods=["POST"]),
            Route("/api/certlogin", self._certlogin, methods=["POST"]),
            Route("/api/keepAlive", self._keep_alive, methods=["POST", "GET"]),
            Route("/api/logout", self._logout, methods=["POST", "GET"]),
            Route(_BETTING_PATH, self._betting, methods=["POST"]),
        ])
        self._server: LocalServer | None = None
        self._cert_server: LocalServer | None = None

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Listen (plain HTTP, and the certificate TLS listener when configured)."""
        self._server = LocalServer(self.app, self.host, self.port, name="betfair-api-sim", timeout_keep_alive=30)
        await self._server.start()
        self.port = self._server.port
        if self.cert_tls is not None:
            cert, key, ca = self.cert_tls
            self._cert_server = LocalServer(self.app, self.host, 0, name="betfair-certlogin-sim", ssl_certfile=cert,
                                            ssl_keyfile=key, ssl_ca_certs=ca, ssl_cert_reqs=_ssl.CERT_REQUIRED)
            await self._cert_server.start()
            self.cert_port = self._cert_server.port
        logger.info("betfair api simulator on %s (SSO /api/*, Betting API %s)", self.url, _BETTING_PATH)

    async def stop(self) -> None:
        for server in (self._cert_server, self._server):
            if server is not None:
                await server.stop()
        self._server = self._cert_server = None

    @property
    def url(self) -> str:
        """Base URL of the plain listener (the ``sso_url`` of a client)."""
        return f"http://{self.host}:{self.port}"

    @property
    def betting_url(self) -> str:
        """The ``betting_url`` of a client."""
        return f"{self.url}/exchange/betting"

    @property
    def cert_url(self) -> str:
        """Base URL of the certificate listener (``cert_sso_url``)."""
        return f"https://{self.host}:{self.cert_port}"

    # -- switches -----------------------------------------------------------------

    def expire_sessions(self) -> int:
        """Every session ends now (as after Betfair's expiry); returns how many."""
        return self.sessions.expire_all()

    def fail_catalogue(self, n: int = 1, code: str | int = "TOO_MANY_REQUESTS") -> None:
        """The next ``n`` Betting API calls fail: ``code`` an APINGException
        code (``TOO_MANY_REQUESTS``, ``TOO_MUCH_DATA``, ``SERVICE_BUSY`` …)
        or an HTTP status (``503``)."""
        self._faults.extend([code] * n)

    def clear_faults(self) -> None:
        """Forget the failures :meth:`fail_catalogue` still had queued."""
        self._faults.clear()

    # -- SSO ---------------------------------------------------------------------------

    async def _login(self, request: Request) -> Response:
        form = await _form(request)
        app_key = request.headers.get("x-application", "")
        username, password = form.get("username"), form.get("password")
        if not username or not password or not app_key:
            return self._sso(token="", product=app_key, status="FAIL", error="INPUT_VALIDATION_ERROR")
        if username != self.username or password != self.password or app_key != self.app_key:
            self.failed_logins += 1
            return self._sso(token="", product=app_key, status="FAIL", error="INVALID_USERNAME_OR_PASSWORD")
        self.logins += 1
        return self._sso(token=self.sessions.issue(), product=app_key, status="SUCCESS", error="")

    async def _certlogin(self, request: Request) -> Response:
        if request.url.scheme != "https":  # only the listener that required a client certificate counts
            return self._json({"loginStatus": "CERT_AUTH_REQUIRED"})
        form = await _form(request)
        if form.get("username") != self.username or form.get("password") != self.password \
                or request.headers.get("x-application") != self.app_key:
            self.failed_logins += 1
            return self._json({"loginStatus": "INVALID_USERNAME_OR_PASSWORD"})
        self.cert_logins += 1
        return self._json({"sessionToken": self.sessions.issue(), "loginStatus": "SUCCESS"})

    async def _keep_alive(self, request: Request) -> Response:
        token = request.headers.get("x-authentication", "")
        product = request.headers.get("x-application", "")
        if not self.sessions.touch(token):
            return self._sso(token=token, product=product, status="FAIL", error="NO_SESSION")
        self.keep_alives += 1
        return self._sso(token=token, product=product, status="SUCCESS", error="")

    async def _logout(self, request: Request) -> Response:
        token = request.headers.get("x-authentication", "")
        product = request.headers.get("x-application", "")
        if not self.sessions.revoke(token):
            return self._sso(token=token, product=product, status="FAIL", error="NO_SESSION")
        self.logouts += 1
        return self._sso(token="", product=product, status="SUCCESS", error="")

    def _sso(self, **fields: str) -> Response:
        return self._json(fields)

    @staticmethod
    def _json(body: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    # -- Betting API -------------------------------------------------------------------

    async def _betting(self, request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return self._json({"jsonrpc": "2.0", "error": {"code": -32700, "message": "DSC-0008"}, "id": None})
        calls = body if isinstance(body, list) else [body]
        if self._faults:
            fault = self._faults.popleft()
            n = max((len(_market_ids(c)) for c in calls if isinstance(c, dict)), default=0)
            if isinstance(fault, int):
                self.catalogue_requests.append(CatalogueCall(n, 0, f"http_{fault}"))
                return Response(b"<html>Service Unavailable</html>", status_code=fault, media_type="text/html")
            self.catalogue_requests.append(CatalogueCall(n, 0, fault))
            answers = [_rpc_error(c, fault) for c in calls]
            return self._json(answers if isinstance(body, list) else answers[0])
        app_key = request.headers.get("x-application")
        session = request.headers.get("x-authentication")
        answers = [self._call(c, app_key, session) for c in calls]
        return self._json(answers if isinstance(body, list) else answers[0])

    def _call(self, call: Any, app_key: str | None, session: str | None) -> dict[str, Any]:
        if not isinstance(call, dict):
            return _rpc_error({}, "INVALID_INPUT_DATA")
        ids = _market_ids(call)
        params = call.get("params") if isinstance(call.get("params"), dict) else {}
        assert isinstance(params, dict)
        projection = {p for p in params.get("marketProjection") or () if isinstance(p, str)}
        weight = len(ids) * sum(PROJECTION_WEIGHTS.get(p, 1) for p in projection)
        code = None
        if not app_key:
            code = "NO_APP_KEY"
        elif app_key != self.app_key:
            code = "INVALID_APP_KEY"
        else:
            code = self.sessions.check(session)
        if code is None and call.get("method") != "SportsAPING/v1.0/listMarketCatalogue":
            code = "INVALID_INPUT_DATA"
        if code is None and weight > self.max_weight:
            code = "TOO_MUCH_DATA"
        max_results = params.get("maxResults")
        if code is None and (not isinstance(max_results, int) or not 0 < max_results <= 1000):
            code = "INVALID_INPUT_DATA"
        if code is not None:
            self.catalogue_requests.append(CatalogueCall(len(ids), weight, code, tuple(ids), (), time.time()))
            return _rpc_error(call, code)
        result = []
        model = self.model
        for mid in ids:
            mb = self.books.get(mid)
            if mb is None or mb.definition is None or mb.definition.get("status") == "CLOSED":
                continue  # Betfair lists ACTIVE / SUSPENDED markets only
            if mid in self.unlisted:
                continue
            result.append(catalogue_entry(mb, projection, model.competition_of(mid) if model else None))
            if len(result) >= (max_results if isinstance(max_results, int) else 1000):
                break
        self.catalogue_requests.append(CatalogueCall(len(ids), weight, "ok", tuple(ids),
                                                     tuple(e["marketId"] for e in result), time.time()))
        return {"jsonrpc": "2.0", "result": result, "id": call.get("id")}


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the SSO's login form)."""
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def _market_ids(call: dict[str, Any]) -> list[str]:
    params = call.get("params")
    flt = params.get("filter") if isinstance(params, dict) else None
    ids = flt.get("marketIds") if isinstance(flt, dict) else None
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


def _rpc_error(call: dict[str, Any], code: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {
        "code": -32099, "message": _ANGX.get(code, "ANGX-0006"),
        "data": {"APINGException": {"requestUUID": secrets.token_hex(8), "errorCode": code,
                                    "errorDetails": ""}, "exceptionname": "APINGException"}},
        "id": call.get("id")}
