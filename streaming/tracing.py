"""Trace ids and deprecation headers on every HTTP response of the API node.

:class:`TraceMiddleware` is a pure ASGI middleware (it never buffers a body:
it only adds headers to the ``http.response.start`` message, so SSE streams —
whose socket leaves the ASGI path after the head, :mod:`streaming.sockets` —
get them on their head, and WebSocket handshakes on ``websocket.accept`` /
``websocket.http.response.start``). It is the outermost middleware of the
app, so answers of :mod:`streaming.auth` (401) carry the headers too. Bodies
are never touched: error bodies keep their shape.

**Trace id** (``X-Trace-Id`` on the response):

1. the request's ``X-Trace-Id`` when well-formed: 1–:data:`TRACE_ID_MAX`
   characters of ``[0-9A-Za-z_-]``;
2. else the trace-id of a well-formed W3C ``traceparent``
   (``00-<32 hex>-<16 hex>-<2 hex>``, not all zeros, version not ``ff``);
3. else a new one: 32 random hex digits (128 bits, as a uuid4's hex).

A malformed value is never echoed (it could carry anything into logs and
headers); a new id replaces it. While the request is handled the id is in
:func:`feed.logjson.current_trace_id`, so every log line made for it carries
``trace_id`` in ``--log-format json``. If the app raises before it started
its response, the middleware answers as Starlette's error handler would
(``500 Internal Server Error``, text) with the trace id, logs one line with
the trace id and re-raises (the server logs the traceback).

Answers the connection guards of :mod:`streaming.server` write themselves
(408, 414, 429, 431: before or outside the ASGI app) carry no trace id.

**Deprecation headers** for retiring ``/v1`` endpoints and fields:
:data:`DEPRECATIONS` lists :class:`Deprecation` entries (empty by default:
add one when a field or endpoint is scheduled for removal and document it in
the README's API section). Every response whose path matches an entry gets

- ``Deprecation: @<unix seconds>`` (RFC 9745; a date in the future announces it),
- ``Sunset: <HTTP-date>`` (RFC 8594) when the entry has a sunset date,
- ``Link: <url>; rel="deprecation"; type="text/html"`` when it has a link,
- ``X-Deprecated-Fields: <field>, …`` for entries that retire fields of the
  endpoint's answer rather than the endpoint itself.

Several matching entries: the earliest deprecation and sunset dates, every
link and every field. Example::

    DEPRECATIONS.add(Deprecation("/v1/markets*", field="selections[].price_raw",
                                 deprecation="2027-01-01", sunset="2027-07-01",
                                 link="https://example.com/changelog#price-raw"))
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import date, datetime, timezone
from email.utils import format_datetime
from typing import Any

from feed.logjson import TRACE, Trace, current_trace_id

__all__ = ["DEPRECATIONS", "Deprecation", "DeprecationRegistry", "TRACE_HEADER", "TRACE_ID_MAX",
           "TraceMiddleware", "current_trace_id", "new_trace_id", "trace_id_of"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TRACE_HEADER = "X-Trace-Id"
#: longest trace id taken from a request
TRACE_ID_MAX = 128

_TRACE_ID = re.compile(rb"[0-9A-Za-z_-]{1,%d}" % TRACE_ID_MAX)
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?")


_POOL_BYTES = 4096
_pool = b""
_pool_at = 0


def _fresh_pool() -> None:
    global _pool, _pool_at
    _pool, _pool_at = b"", 0


os.register_at_fork(after_in_child=_fresh_pool)  # a forked child never repeats its parent's ids


def new_trace_id() -> str:
    """A fresh trace id (32 hex digits, 128 random bits from ``os.urandom`` — as a uuid4's hex).
    The random bytes are read 4 KiB at a time (one ``getrandom`` call per 256 ids, not one
    per request)."""
    global _pool, _pool_at
    at = _pool_at
    if at + 16 > len(_pool):
        _pool, at = os.urandom(_POOL_BYTES), 0
    _pool_at = at + 16
    return _pool[at:at + 16].hex()


def trace_id_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The trace id of a request with ASGI ``headers`` (see the module docstring)."""
    given: bytes | None = None
    parent: bytes | None = None
    for name, value in headers:
        if name == b"x-trace-id":
            given = value.strip()
        elif name == b"traceparent":
            parent = value.strip()
    if given is not None and _TRACE_ID.fullmatch(given):
        return given.decode("ascii")
    if parent is not None:
        m = _TRACEPARENT.fullmatch(parent)
        # version ff is invalid; a version-00 header has exactly four fields
        if m and m.group(1) != b"ff" and m.group(2).strip(b"0") and m.group(3).strip(b"0") \
                and (m.group(1) != b"00" or len(parent) == 55):
            return m.group(2).decode("ascii")
    return new_trace_id()


def _moment(value: str | date | datetime) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Deprecation:
    """One retiring endpoint or field.

    endpoint: a request path (``/v1/sources``) or a prefix ending in ``*``
    (``/v1/markets*``: the list and every market). field: the retiring field
    of the endpoint's answer (None: the endpoint itself). deprecation /
    sunset: ISO dates or datetimes (UTC when naive). link: a page saying what
    to use instead.
    """

    endpoint: str
    deprecation: str | date | datetime
    sunset: str | date | datetime | None = None
    link: str | None = None
    field: str | None = None
    deprecated_at: datetime = dc_field(init=False, repr=False, compare=False)
    sunset_at: datetime | None = dc_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.endpoint.startswith("/"):
            raise ValueError(f"a deprecation's endpoint is a path starting with '/', not {self.endpoint!r}")
        if self.link is not None and any(c in self.link for c in '<>"\r\n'):
            raise ValueError(f"a deprecation link must not contain <, >, \" or line breaks: {self.link!r}")
        object.__setattr__(self, "deprecated_at", _moment(self.deprecation))
        object.__setattr__(self, "sunset_at", None if self.sunset is None else _moment(self.sunset))
        if self.sunset_at is not None and self.sunset_at < self.deprecated_at:
            raise ValueError(f"{self.endpoint}: sunset {self.sunset} is before the deprecation {self.deprecation}")

    def matches(self, path: str) -> bool:
        if self.endpoint.endswith("*"):
            return path.startswith(self.endpoint[:-1])
        return path == self.endpoint


@dataclass
class DeprecationRegistry:
    """The deprecations in force (see the module docstring); the headers of a
    path are computed once and cached until the registry changes."""

    entries: list[Deprecation] = dc_field(default_factory=list)
    _cache: dict[str, list[tuple[bytes, bytes]]] = dc_field(default_factory=dict, repr=False)

    def add(self, entry: Deprecation) -> Deprecation:
        self.entries.append(entry)
        self._cache.clear()
        return entry

    def remove(self, entry: Deprecation) -> None:
        self.entries.remove(entry)
        self._cache.clear()

    def clear(self) -> None:
        self.entries.clear()
        self._cache.clear()

    def headers(self, path: str) -> list[tuple[bytes, bytes]]:
        """The response headers for ``path`` (empty when nothing matches)."""
        if not self.entries:
            return []
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        hits = [e for e in self.entries if e.matches(path)]
        out: list[tuple[bytes, bytes]] = []
        if hits:
            dep = min(e.deprecated_at for e in hits)
            out.append((b"deprecation", b"@%d" % int(dep.timestamp())))
            sunsets = [e.sunset_at for e in hits if e.sunset_at is not None]
            if sunsets:
                out.append((b"sunset", format_datetime(min(sunsets).astimezone(timezone.utc), usegmt=True).encode()))
            links = dict.fromkeys(e.link for e in hits if e.link)
            if links:
                out.append((b"link", ", ".join(f'<{u}>; rel="deprecation"; type="text/html"' for u in links)
                            .encode("latin-1")))
            fields = dict.fromkeys(e.field for e in hits if e.field)
            if fields:
                out.append((b"x-deprecated-fields", ", ".join(fields).encode("latin-1")))
        if len(self._cache) < 1024:  # bounded: paths carry ids
            self._cache[path] = out
        return out


#: the deprecations of this API (empty: nothing is being retired)
DEPRECATIONS = DeprecationRegistry()


class TraceMiddleware:
    """Pure ASGI middleware adding ``X-Trace-Id`` and deprecation headers
    (see the module docstring). registry: the deprecations to apply
    (default :data:`DEPRECATIONS`, read on every request)."""

    def __init__(self, app: ASGIApp, registry: DeprecationRegistry | None = None) -> None:
        self.app = app
        self.registry = registry if registry is not None else DEPRECATIONS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        trace_id = trace_id_of(scope.get("headers") or ())
        scope["oddsfeed.trace_id"] = trace_id
        deprecations = self.registry.headers(scope.get("path", "")) if self.registry.entries else ()
        extra = [(b"x-trace-id", trace_id.encode("ascii")), *deprecations]
        names = {k for k, _ in extra}
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            t = message["type"]
            if t == "http.response.start" or t == "websocket.accept" or t == "websocket.http.response.start":
                started = True
                message["headers"] = [*(h for h in message.get("headers") or () if h[0].lower() not in names),
                                      *extra]
            elif t == "websocket.close":
                started = True  # the server answers 403 itself
            await send(message)

        trace = Trace(trace_id)
        token = TRACE.set(trace)
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            # one line with the trace id (the server logs the traceback after this middleware returns)
            logger.error("%s %s failed: %s: %s", scope.get("method", "WEBSOCKET"), scope.get("path", ""),
                         type(exc).__name__, exc)
            if kind == "http" and not started:
                # what Starlette's ServerErrorMiddleware would send (same body), with our headers
                await send_with_headers({"type": "http.response.start", "status": 500,
                                         "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                                     (b"content-length", b"21")]})
                await send({"type": "http.response.body", "body": b"Internal Server Error"})
            raise
        finally:
            trace.trace_id = None  # tasks started for the request and still running stop carrying it
            TRACE.reset(token)
