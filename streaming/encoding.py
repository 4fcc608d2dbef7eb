"""Encode every outgoing message once: JSON bytes, SSE frame, WS payload.

Pure: no I/O, no clock reads (callers pass ``now_ms``), no Starlette.

A :class:`Message` is built once per node for each thing the hub sends and
holds its JSON body (``{"type": …, …}`` without ``sub``/``token``) and,
lazily, the variants transports need — all derived by byte concatenation,
never by re-encoding:

- SSE frame: ``event: <type>\\n[id: <token>\\n]data: <json>\\n\\n``
- WS payload: ``{"sub":<n>,<json fields>[,"token":"<token>"]}``

Wire messages (all times integer ms since the Unix epoch, UTC)::

    snapshot   {"type":"snapshot","markets":[<market>…],"as_of":ms[,"recovered":bool][,"reason":str]}
    delta      {"type":"delta", <feed.models.Delta fields>, "sent_at":ms, "age_ms":int, "stale":bool}
               (kind "image": "market" is a <market>)
    heartbeat  {"type":"heartbeat","as_of":ms}
    status     {"type":"status","source":str,"state":"UP"|"DEGRADED"|"DOWN","reason":str|null,
                "stale_markets":[market_id…]}
    resumed    {"type":"resumed","recovered":bool}
    error      {"type":"error","code":str,"message":str[,"id":int]}
    ack        {"type":"ack","id":int[,"sub":int]}        (WS only)
    pong       {"type":"pong","id":int}                   (WS only)

``<market>`` is the Market JSON of :mod:`feed.models` plus ``"age_ms"`` and
``"stale"``. A decoded delta message is a valid :class:`feed.models.Delta`
(msgspec ignores the extra keys), so ``apply_delta`` rebuilds the book.

Resume token: URL-safe base64 (no padding) of ``"<epoch>|<id0>,<id1>,…"``
— the store epoch and the last log entry id delivered for every partition.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import msgspec

from feed.models import ENCODER, Delta

__all__ = [
    "Message", "ResumeToken", "StreamId", "ack_message", "delta_message", "encode_token", "decode_token",
    "error_message", "heartbeat_message", "market_with_age", "parse_stream_id", "pong_message",
    "resumed_message", "snapshot_message", "status_message",
]

#: Longest resume token accepted (characters); longer ones are void.
TOKEN_MAX_CHARS = 8192

StreamId = tuple[int, int]


def parse_stream_id(entry_id: str) -> StreamId:
    """``"<ms>-<seq>"`` → (ms, seq) for ordering log entry ids. Raises ValueError."""
    ms, sep, seq = entry_id.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"not a stream id: {entry_id!r}")
    return int(ms), int(seq)


class ResumeToken(NamedTuple):
    """A decoded resume token: the store epoch and one log entry id per partition."""

    epoch: str
    positions: tuple[str, ...]
    keys: tuple[StreamId, ...]


def encode_token(epoch: str | None, positions: Sequence[str]) -> bytes:
    """The opaque, URL-safe resume token (ASCII bytes) for ``epoch`` and
    ``positions`` (one log entry id per partition)."""
    raw = f"{epoch or ''}|{','.join(positions)}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def decode_token(token: str | bytes | None) -> ResumeToken | None:
    """The token's epoch and positions, or None when it is malformed
    (a malformed token is treated as "not recoverable", never an error)."""
    if not token:
        return None
    if isinstance(token, str):
        try:
            token = token.strip().encode("ascii")
        except UnicodeEncodeError:
            return None
    if len(token) > TOKEN_MAX_CHARS:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + b"=" * (-len(token) % 4)).decode("ascii")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    epoch, sep, ids = raw.partition("|")
    if not sep or not epoch or not ids:
        return None
    positions = tuple(ids.split(","))
    try:
        keys = tuple(parse_stream_id(p) for p in positions)
    except ValueError:
        return None
    return ResumeToken(epoch, positions, keys)


class Message:
    """One outgoing message, encoded once and shared by every recipient.

    type: the message type (bytes, e.g. ``b"delta"``); json: the JSON body
    without ``sub``/``token``; token: the resume token this message may
    carry (ASCII bytes) or None. ``sse(with_id)`` and ``json_with_token()``
    are cached, so each variant is built at most once per node.
    """

    __slots__ = ("type", "json", "token", "_sse", "_sse_id", "_json_tok")

    def __init__(self, type_: bytes, json: bytes, token: bytes | None = None) -> None:
        self.type = type_
        self.json = json
        self.token = token
        self._sse: bytes | None = None
        self._sse_id: bytes | None = None
        self._json_tok: bytes | None = None

    def sse(self, with_id: bool = False) -> bytes:
        """The SSE frame, with ``id: <token>`` when ``with_id`` and a token is set.

        An event without ``id:`` keeps the client's previous last event id
        (WHATWG), which is how a batch's earlier events stay "not yet
        delivered" until its last event arrives.
        """
        if with_id and self.token is not None:
            frame = self._sse_id
            if frame is None:
                frame = self._sse_id = (b"event: " + self.type + b"\nid: " + self.token
                                        + b"\ndata: " + self.json + b"\n\n")
            return frame
        frame = self._sse
        if frame is None:
            frame = self._sse = b"event: " + self.type + b"\ndata: " + self.json + b"\n\n"
        return frame

    def json_with_token(self) -> bytes:
        """The JSON body with ``"token":"<token>"`` appended (or as is without a token)."""
        if self.token is None:
            return self.json
        body = self._json_tok
        if body is None:
            body = self._json_tok = self.json[:-1] + b',"token":"' + self.token + b'"}'
        return body

    def ws(self, sub: int | None, with_token: bool = False) -> bytes:
        """The WebSocket payload (UTF-8 JSON) with ``"sub"`` first when given."""
        body = self.json_with_token() if with_token else self.json
        if sub is None:
            return body
        return b'{"sub":%d,' % sub + body[1:]

    def __len__(self) -> int:
        return len(self.json)

    def __repr__(self) -> str:
        return f"Message({self.type.decode()}, {len(self.json)} bytes)"


def _bool(v: bool) -> bytes:
    return b"true" if v else b"false"


def market_with_age(market_json: bytes, age_ms: int, stale: bool) -> bytes:
    """Market JSON (as :data:`feed.models.ENCODER` writes it) with
    ``"age_ms"`` and ``"stale"`` appended."""
    return b'%s,"age_ms":%d,"stale":%s}' % (market_json[:-1], age_ms, _bool(stale))


def delta_message(delta: Delta, *, market_json: bytes | None, age_ms: int, stale: bool,
                  sent_at: int, token: bytes | None) -> Message:
    """A ``delta`` message: the Delta's JSON plus ``type``, ``sent_at``,
    ``age_ms``, ``stale``. For ``kind="image"`` pass ``market_json`` (the
    market with age, see :func:`market_with_age`); ``delta.market`` is then
    not encoded again."""
    if delta.market is not None:
        body = ENCODER.encode(msgspec.structs.replace(delta, market=None))
    else:
        body = ENCODER.encode(delta)
    parts = [b'{"type":"delta",', body[1:-1]]
    if market_json is not None:
        parts.append(b',"market":')
        parts.append(market_json)
    parts.append(b',"sent_at":%d,"age_ms":%d,"stale":%s}' % (sent_at, age_ms, _bool(stale)))
    return Message(b"delta", b"".join(parts), token)


def snapshot_message(markets: Iterable[bytes], *, as_of: int, token: bytes | None,
                     recovered: bool | None = None, reason: str | None = None) -> Message:
    """A ``snapshot`` of the given market JSONs (each with age, see
    :func:`market_with_age`). ``recovered``/``reason`` are included when given."""
    tail = b'],"as_of":%d' % as_of
    if recovered is not None:
        tail += b',"recovered":' + _bool(recovered)
    if reason is not None:
        tail += b',"reason":' + msgspec.json.encode(reason)
    return Message(b"snapshot", b'{"type":"snapshot","markets":[' + b",".join(markets) + tail + b"}", token)


def heartbeat_message(*, as_of: int, token: bytes | None) -> Message:
    """``{"type":"heartbeat","as_of":ms}``."""
    return Message(b"heartbeat", b'{"type":"heartbeat","as_of":%d}' % as_of, token)


def status_message(*, source: str, state: str, reason: str | None, stale_markets: Sequence[str],
                   token: bytes | None) -> Message:
    """``{"type":"status","source","state","reason","stale_markets":[ids]}``."""
    body = ENCODER.encode({"type": "status", "source": source, "state": state, "reason": reason,
                           "stale_markets": list(stale_markets)})
    return Message(b"status", body, token)


def resumed_message(*, recovered: bool, token: bytes | None = None) -> Message:
    """``{"type":"resumed","recovered":bool}``."""
    return Message(b"resumed", b'{"type":"resumed","recovered":%s}' % _bool(recovered), token)


def error_message(code: str, message: str, *, id: int | str | None = None) -> Message:
    """``{"type":"error","code","message"[,"id"]}``; never carries a token."""
    obj: dict[str, object] = {"type": "error", "code": code, "message": message}
    if id is not None:
        obj["id"] = id
    return Message(b"error", ENCODER.encode(obj))


def ack_message(id: int | str | None, sub: int | None = None) -> Message:
    """``{"type":"ack","id":…[,"sub":n]}`` (WebSocket)."""
    obj: dict[str, object] = {"type": "ack", "id": id}
    if sub is not None:
        obj["sub"] = sub
    return Message(b"ack", ENCODER.encode(obj))


def pong_message(id: int | str | None) -> Message:
    """``{"type":"pong","id":…}`` (WebSocket)."""
    return Message(b"pong", ENCODER.encode({"type": "pong", "id": id}))
