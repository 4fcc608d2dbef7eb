"""The query parameters each ``/v1`` endpoint takes, and the check that
refuses any other.

An unknown parameter used to be ignored: ``/v1/markets?evnt=e1`` (a typo)
answered 200 with *every* market, and ``?event=a&event=b`` kept only ``b`` —
a client believed it had filtered and had not. Now such a request gets
``400 {"error": "bad_request", "message": …}`` naming the parameter and what
the endpoint takes. The names come from the OpenAPI document
(:func:`streaming.openapi.query_parameters`), so the documentation and the
check cannot drift apart; ``api_key`` and ``access_token`` (credentials,
:mod:`streaming.auth`) are taken everywhere.

Checked: every ``/v1`` path the document lists, for HTTP requests (by
:class:`QueryCheckMiddleware`, inside authentication: a request without a
credential still gets its 401 first), the price-check fast path
(:mod:`streaming.fastpath`) and the WebSocket endpoint (:mod:`streaming.ws`,
which answers a bad query in the stream as it does a bad value). A path the
document does not list is left to the router (404 / 405).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from streaming.responses import json_error

__all__ = ["CREDENTIAL_PARAMS", "QueryCheck", "QueryCheckMiddleware", "query_check"]

#: credentials in the query (EventSource and browsers' WebSocket cannot send headers)
CREDENTIAL_PARAMS = frozenset({"api_key", "access_token"})
_MAX_NAMES_SHOWN = 20


class QueryCheck:
    """Allowed query parameter names per (method, path template).

    ``paths``: OpenAPI path template → method (lowercase) → names, as
    :func:`streaming.openapi.query_parameters` gives them. A template's
    ``{name}`` segment matches any non-empty text (market ids may hold
    ``/``); templates with more literal text are tried first, so
    ``/v1/markets/{market_id}/history`` wins over ``/v1/markets/{market_id}``.
    """

    def __init__(self, paths: Mapping[str, Mapping[str, frozenset[str]]]) -> None:
        compiled = []
        for template, methods in paths.items():
            literal = len(re.sub(r"\{[^}]+\}", "", template))
            pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", ".+", re.escape(template)) + "$")
            compiled.append((literal, template, pattern, {m.upper(): frozenset(n) | CREDENTIAL_PARAMS
                                                          for m, n in methods.items()}))
        compiled.sort(key=lambda c: -c[0])
        self._routes = [(template, pattern, methods) for _, template, pattern, methods in compiled]
        self._exact = {template: methods for template, _, methods in self._routes if "{" not in template}

    def allowed(self, method: str, path: str) -> frozenset[str] | None:
        """The names ``method path`` takes; None when the path or method is not
        a documented one (the router answers it)."""
        methods = self._exact.get(path)
        if methods is None:
            for _, pattern, ms in self._routes:
                if pattern.match(path):
                    methods = ms
                    break
            else:
                return None
        return methods.get("GET" if method == "HEAD" else method)

    def problem(self, method: str, path: str, query: bytes | str) -> str | None:
        """What is wrong with the query string of ``method path`` — a name the
        endpoint does not take, or one given more than once — as a message
        saying what to fix; None when it is fine (or the path is not checked)."""
        if not query:
            return None
        allowed = self.allowed(method, path)
        if allowed is None:
            return None
        text = query.decode("latin-1") if isinstance(query, bytes) else query
        seen: set[str] = set()
        for name, _ in parse_qsl(text, keep_blank_values=True):
            if name not in allowed:
                takes = sorted(allowed - CREDENTIAL_PARAMS)
                listed = ", ".join(takes[:_MAX_NAMES_SHOWN]) if takes else "no parameters"
                return (f"unknown query parameter {name[:64]!r} for {method} {path[:200]}; it takes {listed} "
                        f"(and api_key or access_token for a credential)")
            if name in seen:
                return (f"query parameter {name!r} given more than once; give it once "
                        f"(several values: one comma-separated list)")
            seen.add(name)
        return None


_CHECK: QueryCheck | None = None


def query_check() -> QueryCheck:
    """The check for this version's API (built once from the OpenAPI document)."""
    global _CHECK
    if _CHECK is None:
        from streaming.openapi import query_parameters

        _CHECK = QueryCheck(query_parameters())
    return _CHECK


class QueryCheckMiddleware:
    """Pure ASGI: an HTTP request to a documented ``/v1`` path whose query
    names a parameter the endpoint does not take (or one twice) gets
    ``400 bad_request`` saying which and what it takes; everything else
    passes untouched. WebSocket handshakes pass (the endpoint checks)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.check = query_check()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string") and scope["path"].startswith("/v1/"):
            message = self.check.problem(scope["method"], scope["path"], scope["query_string"])
            if message is not None:
                await json_error(400, "bad_request", message)(scope, receive, send)
                return
        await self.app(scope, receive, send)
