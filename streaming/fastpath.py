"""Price checks answered in the HTTP protocol layer: a whole request in, one write out, no ASGI.

A price check is the hottest REST request and the one with a CPU target
(issue 11: ≤ 100 µs of the API node's CPU per check). Through ASGI each one
pays for uvicorn's request cycle and its task, three middleware coroutines,
Starlette's router and two socket writes — several times the check itself.
So the HTTP protocol (:mod:`streaming.server`) answers a plain
``POST /v1/price-check`` or ``/v1/price-check/batch`` itself once its body
is complete: it calls a :class:`SyncRoute` with the request's headers,
query and body, and writes the answer's head and body in one write. A
request it does not take goes through ASGI exactly as before — nothing is
answered differently, only cheaper.

Taken by the fast path: ``POST``, a target that is exactly the route's path
(plus a query), a ``Content-Length`` no larger than the route's limit, no
``Transfer-Encoding`` and no ``Expect`` header, not an upgrade, nothing of
an earlier request still being answered on the connection, and the
connection not paused for writing (a client that stopped reading gets
uvicorn's flow control). Anything else takes the ASGI path. The body must
arrive within the route's deadline (``settings.price_check_deadline_ms``)
or the answer is the same 408 as the endpoint's, and the connection is
closed (lingering close).

What the route does is what the ASGI stack does for these paths, in the
same order, with the same code: :class:`streaming.tracing.TraceMiddleware`'s
``X-Trace-Id`` (from the request or new) and deprecation headers, and the
trace context of log lines; :class:`streaming.auth.AuthMiddleware`'s
credential check and the ``price_check`` scope (the same 401/403 answers
and log line) when authentication is on; then
:meth:`streaming.pricecheck.PriceCheckEndpoint.answer`. A bug in it is
logged with the trace id and answered 500, as the middleware would. The
server's default headers (``date``, ``server``) are added as uvicorn adds
them. Not done here: uvicorn's access log line (the server runs at
``warning``, where uvicorn writes none). ``ODDSFEED_PRICE_CHECK_FAST_PATH=false``
turns the fast path off.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.types import Receive, Scope, Send

from streaming.auth import AuthError, AuthMiddleware
from streaming.pricecheck import MAX_BODY_BYTES, NOT_READY, Answer, PriceCheckEndpoint, answer_of
from streaming.queryparams import query_check
from streaming.responses import json_error
from streaming.tracing import DEPRECATIONS, TRACE, Trace, trace_id_of

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from feed.settings import Settings
    from streaming.reader import Node
    from streaming.tenants import Tenants

__all__ = ["SyncRoute", "price_check_routes"]

logger = logging.getLogger(__name__)

_SERVER_ERROR: Answer = (500, [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21")],
                         b"Internal Server Error")


async def _no_app(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover - never called
    raise RuntimeError("the fast path's AuthMiddleware only checks credentials")


class SyncRoute:
    """One path the HTTP protocol answers itself (see the module docstring).

    app: the Starlette app. path: the route's path. endpoint: the price-check endpoint whose
    synchronous :meth:`~streaming.pricecheck.PriceCheckEndpoint.answer` is
    called. auth: the credential checker (None: authentication is off).
    max_body_bytes: a larger ``Content-Length`` goes through ASGI (which
    answers 413). :attr:`node`: the node, set by the app's lifespan once it
    has started (None before: the answer is 503 ``not_ready``).
    """

    __slots__ = ("_deadline_s", "app", "auth", "endpoint", "max_body_bytes", "node", "path", "requests")

    def __init__(self, app: Starlette, path: str, endpoint: PriceCheckEndpoint, auth: AuthMiddleware | None,
                 *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.path = path
        self.endpoint = endpoint
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.node: Node | None = None  # (a Starlette State lookup per request costs ~1-3 µs)
        settings: Settings = app.state.settings  # (a Starlette State lookup per request costs ~1 µs)
        self._deadline_s = settings.price_check_deadline_ms / 1000
        #: requests answered here (tests and the benchmark read it)
        self.requests = 0

    def deadline_s(self) -> float:
        """How long the body may take to arrive after the head, s."""
        return self._deadline_s

    def answer(self, headers: list[tuple[bytes, bytes]], query: bytes, body: bytes, client: str | None) -> Answer:
        """The answer to a whole request: ``headers`` as ASGI gives them (lowercase names),
        ``query`` the raw query string, ``body`` the whole body, ``client`` the peer's address."""
        self.requests += 1
        return self._traced(headers, query, body, client)

    def timed_out(self, headers: list[tuple[bytes, bytes]]) -> Answer:
        """408: the body did not arrive in time (the endpoint's answer, with the trace headers)."""
        return self._traced(headers, b"", None, None)

    def _traced(self, headers: list[tuple[bytes, bytes]], query: bytes, body: bytes | None,
                client: str | None) -> Answer:
        """The answer (``body`` None: the 408) with the trace headers, made in the request's trace."""
        trace_id = trace_id_of(headers)
        extra = [(b"x-trace-id", trace_id.encode("ascii"))]
        if DEPRECATIONS.entries:
            extra += DEPRECATIONS.headers(self.path)
        trace = Trace(trace_id)
        token = TRACE.set(trace)
        try:
            if body is None:
                status, hdrs, body = PriceCheckEndpoint.timed_out(round(self._deadline_s * 1000))
            else:
                status, hdrs, body = self._answer(headers, query, body, client)
        except Exception as exc:
            logger.exception("POST %s failed: %s: %s", self.path, type(exc).__name__, exc)
            status, hdrs, body = _SERVER_ERROR
        finally:
            trace.trace_id = None
            TRACE.reset(token)
        # (the endpoint's and the auth answers' headers never hold X-Trace-Id or a deprecation
        # header — the middleware's filter has nothing to remove here)
        return status, hdrs + extra, body

    def _answer(self, headers: list[tuple[bytes, bytes]], query: bytes, body: bytes, client: str | None) -> Answer:
        grant = None
        if self.auth is not None:
            try:
                grant = self.auth.check({"headers": headers, "query_string": query})
                grant.require("price_check")
            except AuthError as exc:
                return self.auth.deny(exc, "POST", self.path, client)
        if query:  # credentials only: anything else is a 400 saying what to fix, as on the ASGI path
            problem = query_check().problem("POST", self.path, query)
            if problem is not None:
                return answer_of(json_error(400, "bad_request", problem))
        node = self.node
        if node is None:  # before the lifespan started the node
            return NOT_READY
        return self.endpoint.answer(node, grant, body)


def price_check_routes(app: Starlette, settings: Settings, tenants: Tenants | None, *,
                       auth: bool) -> dict[bytes, SyncRoute]:
    """The fast path's routes (raw path → route) for ``POST /v1/price-check`` and
    ``/v1/price-check/batch``; {} when ``settings.price_check_fast_path`` is off."""
    if not settings.price_check_fast_path:
        return {}
    checker = AuthMiddleware(_no_app, settings=settings, tenants=tenants) if auth else None
    return {path.encode(): SyncRoute(app, path, PriceCheckEndpoint(batch=batch), checker)
            for path, batch in (("/v1/price-check", False), ("/v1/price-check/batch", True))}
