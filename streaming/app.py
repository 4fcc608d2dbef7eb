"""The streaming API as a Starlette app: ``create_app(settings) → Starlette``.

The lifespan owns the Redis :class:`~feed.store.Store` (opened from
``redis_url`` / ``settings.redis_url`` unless one is passed; closed only if
the app opened it) and the :class:`~streaming.reader.Node` (node state, one
reader task per partition, the hub, the health poller). On exit it closes
every client connection (SSE streams end, WebSockets get 1001), cancels the
tasks and closes what it opened.

uvicorn waits for open responses *before* it runs the lifespan shutdown, so
a server that must stop while SSE streams are open should call
:func:`begin_shutdown` first — :class:`StreamingServer` does that.

Routes: ``/v1/stream`` (SSE, :mod:`streaming.sse`), ``/v1/ws``
(:mod:`streaming.ws`), ``/v1/markets``, ``/v1/markets/{id}``, ``/v1/events``,
``/v1/events/{id}``, ``/v1/sports``, ``/v1/sources``, ``/health``, ``/ready``
(:mod:`streaming.rest`), and ``/`` (the static board in ``streaming/web``)
when it exists, and ``/metrics`` (:mod:`streaming.metrics`). With
``settings.api_keys``, ``settings.jwt_secrets`` or ``settings.tenants_file``
set, ``/v1/*`` needs a credential (:mod:`streaming.auth`), and what it may
do and see, and its limits, come from the tenants file
(:mod:`streaming.tenants`, watched for changes by the lifespan).

:class:`StreamingServer` also installs the connection guards of
:mod:`streaming.server` (request-header deadline, per-IP cap, TCP
keepalive, coalesced WebSocket writes) and the WebSocket ping settings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypedDict

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from feed.errors import ConfigError
from feed.settings import Settings
from feed.store import Store
from streaming import history, openapi, pricecheck, rest
from streaming.auth import AuthMiddleware
from streaming.fastpath import price_check_routes
from streaming.metrics import make_registry, metrics_endpoint
from streaming.queryparams import QueryCheckMiddleware
from streaming.reader import Node
from streaming.server import Guard, install
from streaming.sse import stream
from streaming.state import NodeOptions, parse_stale_by_sport
from streaming.tenants import Tenants
from streaming.tracing import TraceMiddleware
from streaming.ws import websocket_endpoint

__all__ = ["AppState", "StreamingServer", "begin_shutdown", "create_app"]

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"


class AppState(TypedDict):
    """What the lifespan yields (Starlette copies it into ``request.state``)."""

    node: Node


def create_app(settings: Settings, *, store: Store | None = None, redis_url: str | None = None,
               options: NodeOptions | None = None) -> Starlette:
    """The streaming API for ``settings``.

    store: an open Store to use (the app will not close it); otherwise the
    lifespan opens one on ``redis_url`` or ``settings.redis_url`` (raises
    ConfigError when neither is given — the embedded Redis is started by the
    CLI, not here). options: node tuning (:class:`~streaming.state.NodeOptions`).
    """
    opts = options or NodeOptions()
    try:
        parse_stale_by_sport(settings.stale_after_ms_by_sport)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    tenants = Tenants(settings.tenants_file)  # raises ConfigError for a bad file
    if settings.tenants_file and not (tenants.has_keys or settings.api_keys or settings.jwt_secrets):
        raise ConfigError(f"tenants file {settings.tenants_file} lists no API key and no JWT secret is set "
                          "(ODDSFEED_API_KEYS / ODDSFEED_JWT_SECRETS): no request could be accepted")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[AppState]:
        owns = store is None
        s = store
        if s is None:
            url = redis_url or settings.redis_url
            if not url:
                raise ConfigError("no redis url: pass redis_url= or set settings.redis_url")
            s = await Store.open(url, partitions=settings.partitions, log_maxlen=settings.log_maxlen,
                                 cluster=settings.redis_cluster, push=settings.log_push)
        node = Node(settings, s, options=opts, owns_store=owns)
        try:
            await node.start()
        except BaseException:
            if owns:
                await s.close()
            raise
        app.state.node = node
        for route in getattr(app.state, "fast_routes", {}).values():
            route.node = node  # the price checks the HTTP protocol answers itself (streaming.fastpath)
        node.tenants = tenants
        tenants.on_change = node.hub.tenants_changed
        app.state.metrics_registry = make_registry(node)
        # always: it also forgets idle principals (one per API key / JWT subject seen), file or not
        watcher = asyncio.create_task(tenants.watch(), name="tenants-file") if auth else None
        try:
            yield {"node": node}
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            await node.stop()

    routes: list[BaseRoute] = [
        *pricecheck.routes(),  # POST /v1/price-check[/batch]: first, the hottest REST route (~7 µs of route matching)
        Route("/v1/stream", stream, methods=["GET"]),
        WebSocketRoute("/v1/ws", websocket_endpoint),
        *history.routes(),  # before rest's /v1/markets/{market_id:path}, which would shadow …/history
        *rest.routes(),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *openapi.routes(),  # GET /openapi.json, /docs (+ its assets): public, outside /v1/
        *rest.fallback_routes(),  # any other /v1 request: a JSON 404 / 405 / 426, never the board's files
    ]
    if (WEB_DIR / "index.html").is_file():
        routes.append(Mount("/", app=StaticFiles(directory=WEB_DIR, html=True), name="web"))
    auth = bool(settings.api_keys or settings.jwt_secrets or settings.tenants_file)
    middleware = [Middleware(AuthMiddleware, settings=settings, tenants=tenants)] if auth else []
    middleware.append(Middleware(QueryCheckMiddleware))  # inside auth: a 401 comes before a 400
    middleware.insert(0, Middleware(TraceMiddleware))  # outermost: X-Trace-Id / Deprecation on every answer (streaming.tracing)
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.settings = settings
    app.state.options = opts
    # plain price checks answered by the HTTP protocol itself (streaming.fastpath; StreamingServer
    # hands these to its protocol): the same tenants object, so the same principals and limits
    app.state.fast_routes = price_check_routes(app, settings, tenants, auth=auth)
    return app


def begin_shutdown(app: Starlette) -> None:
    """Close every stream now (SSE responses end, WebSockets get 1001) so
    the server's graceful shutdown does not wait on them. Idempotent."""
    node: Node | None = getattr(app.state, "node", None)
    if node is not None and not node.stopping:
        node.stopping = True
        node.shutdown.set()
        node.hub.close_all()


class StreamingServer(uvicorn.Server):
    """``uvicorn.Server`` that ends the app's streams before its graceful
    shutdown waits for open connections, and installs the connection guards
    of :mod:`streaming.server` from the app's settings (header deadline,
    per-IP cap, coalesced WebSocket frames without permessage-deflate,
    WebSocket ping interval/timeout and max message size from its options).

    Use as ``StreamingServer(uvicorn.Config(app, …), app).serve()``.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.streaming_app = app
        settings: Settings | None = getattr(app.state, "settings", None)
        options: NodeOptions | None = getattr(app.state, "options", None)
        self.guard = Guard(
            header_timeout_s=(settings.request_header_timeout_ms / 1000) if settings else 10.0,
            max_per_ip=settings.max_connections_per_ip if settings else 0,
            fast_routes=getattr(app.state, "fast_routes", None))
        app.state.http_guard = self.guard  # (its counters: tests, diagnostics)
        if options is not None:
            config.ws_ping_interval = options.ws_ping_interval_s
            config.ws_ping_timeout = options.ws_ping_timeout_s
            # the app answers a too-big message with an error before closing (1009); the protocol's
            # own limit (4× that) bounds what is ever buffered
            config.ws_max_size = min(config.ws_max_size, 4 * options.ws_max_message_bytes)
        if not config.loaded:
            install(config, self.guard)

    async def shutdown(self, sockets: list | None = None) -> None:
        begin_shutdown(self.streaming_app)
        await super().shutdown(sockets)
