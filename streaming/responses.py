"""JSON responses and the app's node, shared by every HTTP endpoint module.

A leaf module (it imports no other ``streaming`` endpoint module), so
:mod:`streaming.rest`, :mod:`streaming.pricecheck`, :mod:`streaming.sse` and
:mod:`streaming.ws` can all use it without importing each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection
from starlette.responses import Response

from feed.models import ENCODER

if TYPE_CHECKING:
    from streaming.reader import Node

__all__ = ["JSON", "json_error", "json_response", "node_of"]

JSON = "application/json"


def node_of(conn: HTTPConnection) -> Node:
    """The app's :class:`~streaming.reader.Node` (set by the lifespan)."""
    return conn.app.state.node


def json_response(body: bytes | object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response from pre-encoded bytes or any msgspec-encodable object."""
    data = body if isinstance(body, bytes) else ENCODER.encode(body)
    return Response(data, status_code=status, media_type=JSON, headers=headers)


def json_error(status: int, code: str, message: str) -> Response:
    """``{"error": code, "message": message}`` with ``status``."""
    return json_response({"error": code, "message": message}, status)
