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
when it exists. With ``settings.api_keys`` set, ``/v1/*`` needs a key in
``X-API-Key``, ``Authorization: Bearer <key>`` or ``?api_key=``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypedDict

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from feed.errors import ConfigError
from feed.settings import Settings
from feed.store import Store
from streaming import rest
from streaming.reader import Node
from streaming.sse import stream
from streaming.state import NodeOptions
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

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[AppState]:
        owns = store is None
        s = store
        if s is None:
            url = redis_url or settings.redis_url
            if not url:
                raise ConfigError("no redis url: pass redis_url= or set settings.redis_url")
            s = await Store.open(url, partitions=settings.partitions, log_maxlen=settings.log_maxlen,
                                 cluster=settings.redis_cluster)
        node = Node(settings, s, options=opts, owns_store=owns)
        try:
            await node.start()
        except BaseException:
            if owns:
                await s.close()
            raise
        app.state.node = node
        try:
            yield {"node": node}
        finally:
            await node.stop()

    routes: list[BaseRoute] = [
        Route("/v1/stream", stream, methods=["GET"]),
        WebSocketRoute("/v1/ws", websocket_endpoint),
        *rest.routes(),  # type: ignore[list-item]
    ]
    if (WEB_DIR / "index.html").is_file():
        routes.append(Mount("/", app=StaticFiles(directory=WEB_DIR, html=True), name="web"))
    middleware = [Middleware(ApiKeyMiddleware, keys=settings.api_keys)] if settings.api_keys else []
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)


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
    shutdown waits for open connections.

    Use as ``StreamingServer(uvicorn.Config(app, …), app).serve()``.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.streaming_app = app

    async def shutdown(self, sockets: list | None = None) -> None:  # type: ignore[override]
        begin_shutdown(self.streaming_app)
        await super().shutdown(sockets)


class ApiKeyMiddleware:
    """Require an API key on ``/v1/*`` (HTTP → 401 JSON, WebSocket → close 1008)."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _ok(self, scope: Scope) -> bool:
        key = None
        for name, value in scope.get("headers", ()):
            if name == b"x-api-key":
                key = value
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                key = value[7:].strip()
        if key is None:
            q = QueryParams(scope.get("query_string", b"").decode("latin-1")).get("api_key")
            key = q.encode() if q else None
        if key is None:
            return False
        return any(hmac.compare_digest(key, k) for k in self.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"].startswith("/v1/") and not self._ok(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": "missing or invalid api key"})
                return
            await rest.json_error(401, "unauthorized", "send a valid API key in X-API-Key, "
                                  "Authorization: Bearer <key> or ?api_key=")(scope, receive, send)
            return
        await self.app(scope, receive, send)
