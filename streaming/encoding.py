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
    delta      {"type":"delta", <feed.models.Delta fields>[,"conflated":true], "sent_at":ms, "age_ms":int,
                "stale":bool}   (kind "image": "market" is a <market>; kind "delta": each entry of
                "selections" holds only the changed fields of that selection, see
                feed.models.SelectionChange; "conflated": the message stands for several deltas of the
                market — conflate_ms, or a slow consumer's collapsed queue — and carries every field of
                each selection it touches)
    heartbeat  {"type":"heartbeat","as_of":ms}
    status     {"type":"status","source":str,"state":"UP"|"DEGRADED"|"DOWN","reason":str|null,
                "stale_markets":[market_id…],"turned_stale":[…],"turned_fresh":[…],
                "stale_events":[event_id…],"as_of":ms}   ("stale_events": the events whose held
                state from this source is stale now, among those whose event_state messages the
                subscription gets — the whole list, as "stale_markets" is: a state not in it is
                fresh; a change of either list is announced at the next health refresh)
    resumed    {"type":"resumed","recovered":bool,"as_of":ms}   (as_of: when it was queued)
    removed    {"type":"removed","market_id":str,"reason":"not_visible"}   (a market left what the
                subscription sees: a change moved it out of the filter, a relink out of the canonical
                event filtered on, or it left a tenant's sight)
    event_state {"type":"event_state","event_state":<event state>,"sent_at":ms}   (never a token: states
                are whole and versioned, so they do not move a client's resume position)
    error      {"type":"error","code":str,"message":str[,"id":int]}
    ack        {"type":"ack","id":int[,"sub":int]}        (WS only)
    pong       {"type":"pong","id":int}                   (WS only)

``<market>`` is the Market JSON of :mod:`feed.models` plus ``"age_ms"`` and
``"stale"``; ``<event state>`` the EventState JSON plus ``"age_ms"`` and
``"stale"`` (:meth:`streaming.event_states.EventStates.json`). A decoded delta message is a valid :class:`feed.models.Delta`
(msgspec ignores the extra keys), so ``apply_delta`` rebuilds the book.

Resume token: URL-safe base64 (no padding) of ``"<epoch>|<id0>,<id1>,…"``
— the store epoch and the last log entry id delivered for every partition.
SSE: ``id:`` on the last event of each log entry (earlier ones keep the
previous id). WebSocket: every stream message carries ``"token"``; one that
is not the last of its log entry carries the token from before that entry.

Frames for WebSocket are complete RFC 6455 text frames (:meth:`Message.ws_frame`)
so a connection's pending messages go out in one write.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import msgspec

from feed.models import ENCODER, Delta, SelectionChange

__all__ = [
    "LazyDeltaMessage", "Message", "ResumeToken", "StreamId", "ack_message", "delta_message", "encode_token", "decode_token",
    "ws_frame", "ws_frame_header",
    "error_message", "event_state_message", "heartbeat_message", "market_with_age", "parse_stream_id", "pong_message",
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
    """A decoded resume token: the store epoch, one log entry id per partition, and the
    links version the issuing node served under (None: a token of a node from before
    tokens carried it)."""

    epoch: str
    positions: tuple[str, ...]
    keys: tuple[StreamId, ...]
    links_version: int | None = None


def encode_token(epoch: str | None, positions: Sequence[str], links_version: int | None = None) -> bytes:
    """The opaque, URL-safe resume token (ASCII bytes) for ``epoch``, ``positions`` (one
    log entry id per partition) and ``links_version`` — the linker's links the issuing node
    had adopted (:meth:`feed.store.Store.links_version`; None or < 0: none yet, left out).
    A node that adopted a relink the issuing node had not yet does not resume the token's
    canonical-event subscriptions as recovered (:meth:`streaming.hub.Hub._relinked_after`)."""
    if links_version is None or links_version < 0:
        raw = f"{epoch or ''}|{','.join(positions)}".encode()
    else:
        raw = f"{epoch or ''}|{','.join(positions)}|{links_version}".encode()
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
    ids, sep2, version = ids.partition("|")
    if not sep or not epoch or not ids or (sep2 and not (version.isdigit() and len(version) <= 18)):
        return None
    positions = tuple(ids.split(","))
    try:
        keys = tuple(parse_stream_id(p) for p in positions)
    except ValueError:
        return None
    return ResumeToken(epoch, positions, keys, int(version) if sep2 else None)


def ws_frame_header(n: int) -> bytes:
    """RFC 6455 header of one unmasked, final text frame (server → client) of ``n`` payload bytes."""
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big")
    return b"\x81\x7f" + n.to_bytes(8, "big")


def ws_frame(payload: bytes) -> bytes:
    """``payload`` as one complete WebSocket text frame."""
    return ws_frame_header(len(payload)) + payload


class Message:
    """One outgoing message, encoded once and shared by every recipient.

    type: the message type (bytes, e.g. ``b"delta"``); json: the JSON body
    without ``sub``/``token``; token: the resume token after this message
    (ASCII bytes) or None; prev_token: the token *before* the log entry the
    message belongs to — what a WebSocket message that is not the last of
    its entry for a subscription carries (resuming from it replays the
    whole entry, so nothing is skipped). info: what the hub needs to merge
    the message (a :class:`streaming.state.PreparedDelta`) or None.

    Every variant (SSE frame, WS payload per subscription id, complete WS
    frame, another odds format) is built at most once per node and cached.
    """

    __slots__ = ("type", "json", "token", "prev_token", "info", "_sse", "_sse_id", "_json_tok", "_json_prev",
                 "_wsf", "_fmt")

    def __init__(self, type_: bytes, json: bytes, token: bytes | None = None, prev_token: bytes | None = None,
                 info: object = None) -> None:
        self.type = type_
        self.json = json
        self.token = token
        self.prev_token = prev_token
        self.info = info
        self._sse: bytes | None = None
        self._sse_id: bytes | None = None
        self._json_tok: bytes | None = None
        self._json_prev: bytes | None = None
        self._wsf: dict[tuple[int | None, bool], bytes] | None = None
        self._fmt: dict[str, Message] | None = None

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

    def sse_with(self, token: bytes | None) -> bytes:
        """The SSE frame with an explicit ``id:`` (not cached)."""
        if token is None:
            return self.sse(False)
        return b"event: " + self.type + b"\nid: " + token + b"\ndata: " + self.json + b"\n\n"

    def json_with_token(self) -> bytes:
        """The JSON body with ``"token":"<token>"`` appended (or as is without a token)."""
        if self.token is None:
            return self.json
        body = self._json_tok
        if body is None:
            body = self._json_tok = self.json[:-1] + b',"token":"' + self.token + b'"}'
        return body

    def json_with_prev_token(self) -> bytes:
        """The JSON body with the entry's previous token (mid-entry WS messages)."""
        if self.prev_token is None:
            return self.json
        body = self._json_prev
        if body is None:
            body = self._json_prev = self.json[:-1] + b',"token":"' + self.prev_token + b'"}'
        return body

    def ws(self, sub: int | None, with_token: bool = False) -> bytes:
        """The WebSocket payload (UTF-8 JSON) with ``"sub"`` first when given;
        ``with_token`` → ``token``, else ``prev_token`` when the message has one."""
        body = self.json_with_token() if with_token else self.json_with_prev_token()
        if sub is None:
            return body
        return b'{"sub":%d,' % sub + body[1:]

    def ws_with(self, sub: int | None, token: bytes | None) -> bytes:
        """The WebSocket payload with an explicit token (not cached)."""
        body = self.json if token is None else self.json[:-1] + b',"token":"' + token + b'"}'
        if sub is None:
            return body
        return b'{"sub":%d,' % sub + body[1:]

    def ws_frame(self, sub: int | None, with_token: bool = False) -> bytes:
        """:meth:`ws` as a complete WebSocket text frame (cached per subscription id)."""
        cache = self._wsf
        if cache is None:
            cache = self._wsf = {}
        key = (sub, with_token)
        frame = cache.get(key)
        if frame is None:
            frame = cache[key] = ws_frame(self.ws(sub, with_token))
        return frame

    def formatted(self, fmt: str | None) -> "Message":
        """This message with prices in odds format ``fmt`` (None = decimal), built once."""
        if fmt is None:
            return self
        cache = self._fmt
        if cache is None:
            cache = self._fmt = {}
        msg = cache.get(fmt)
        if msg is None:
            from streaming.odds_format import convert_json

            body = convert_json(self.json, fmt)
            msg = self if body is self.json else Message(self.type, body, self.token, self.prev_token, self.info)
            cache[fmt] = msg
        return msg

    def __len__(self) -> int:
        return len(self.json)

    def size_hint(self) -> int:
        """Its JSON's length in bytes, or an upper bound of it while not encoded
        (:class:`LazyDeltaMessage`): what the replay ring's byte bound counts."""
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
                  sent_at: int, token: bytes | None, prev_token: bytes | None = None,
                  conflated: bool = False, info: object = None) -> Message:
    """A ``delta`` message: the Delta's JSON plus ``type``, ``sent_at``,
    ``age_ms``, ``stale`` (and ``"conflated":true`` when it stands for
    several deltas). For ``kind="image"`` pass ``market_json`` (the market
    with age, see :func:`market_with_age`); ``delta.market`` is then not
    encoded again."""
    if delta.market is not None:
        body = ENCODER.encode(msgspec.structs.replace(delta, market=None))
    else:
        body = ENCODER.encode(delta)
    parts = [b'{"type":"delta",', body[1:-1]]
    if market_json is not None:
        parts.append(b',"market":')
        parts.append(market_json)
    if conflated:
        parts.append(b',"conflated":true')
    parts.append(b',"sent_at":%d,"age_ms":%d,"stale":%s}' % (sent_at, age_ms, _bool(stale)))
    return Message(b"delta", b"".join(parts), token, prev_token, info)


class LazyDeltaMessage(Message):
    """A ``delta`` message (as :func:`delta_message` without ``market_json`` or ``conflated``)
    whose JSON is encoded the first time anything reads it — byte for byte what
    :func:`delta_message` writes for the same arguments.

    A node with no stream connection applies every log entry but sends it to no one, so it
    does not pay for encoding it: the entry's messages wait in the replay ring (for a resume
    that may never come) as the delta plus its ``sent_at`` / ``age_ms`` / ``stale``, taken
    when it was applied. :attr:`json` is an ordinary attribute once read (the first read
    fills it through ``__getattr__``); :meth:`size_hint` is an upper estimate of its length
    in bytes without encoding it (the ring's byte bound).
    """

    __slots__ = ("_delta", "_tail")

    def __init__(self, delta: Delta, *, age_ms: int, stale: bool, sent_at: int, token: bytes | None,
                 prev_token: bytes | None = None) -> None:
        # (no Message.__init__: it sets json)
        self.type = b"delta"
        self.token = token
        self.prev_token = prev_token
        self.info = None
        self._sse = self._sse_id = self._json_tok = self._json_prev = None
        self._wsf = None
        self._fmt = None
        self._delta: Delta | None = delta
        self._tail = (sent_at, age_ms, stale)

    def __getattr__(self, name: str) -> bytes:
        if name != "json" or self._delta is None:
            raise AttributeError(name)
        sent_at, age_ms, stale = self._tail
        json = self.json = b'{"type":"delta",%s,"sent_at":%d,"age_ms":%d,"stale":%s}' % (
            ENCODER.encode(self._delta)[1:-1], sent_at, age_ms, _bool(stale))
        self._delta = None
        return json

    def size_hint(self) -> int:
        """An upper estimate of ``len(self.json)`` (the exact length once encoded)."""
        d = self._delta
        if d is None:
            return len(self.json)
        # (every field present, every number at its longest and every character of a string written
        # as a 6-byte \uXXXX escape: _DELTA_MAX / _SELECTION_MAX / _LEVEL_MAX, measured at import)
        n = _DELTA_MAX + 6 * (len(d.market_id) + len(d.source) + len(d.session or ""))
        for s in d.selections:
            n += _SELECTION_MAX + 6 * len(s.selection_id) + _LEVEL_MAX * (len(s.back or ()) + len(s.lay or ()))
            for text in (s.name, s.price_raw, s.outcome):
                if type(text) is str:
                    n += len(text) * 6
        if d.header is not None:
            n += len(ENCODER.encode(d.header))
        return n


def _longest_encodings() -> tuple[int, int, int]:
    """(a delta message without selections, one selection change, one ladder level) with every
    field present, every number at its longest (a float's 24 characters, an int's 20, the
    longest status) and every string empty — bytes, measured from the encoder itself, so a field
    added to the model is counted (:meth:`LazyDeltaMessage.size_hint` adds the strings)."""
    f, i = -2.2250738585072014e-308, -(2 ** 63)
    longest: dict[str, Any] = {
        name: ("" if name in ("name", "price_raw", "outcome") else "SUSPENDED" if name == "status"
               else [] if name in ("back", "lay") else i if name == "sort_priority" else f)
        for name in SelectionChange.__struct_fields__ if name != "selection_id"}
    sel = SelectionChange(selection_id="", **longest)
    delta = Delta(market_id="", seq=i, kind="delta", source="", source_ts=i, received_at=i, stored_at=i,
                  source_ts_original=i, session="", selections=[sel], traded_volume=f)
    whole = LazyDeltaMessage(delta, age_ms=i, stale=False, sent_at=i, token=None).json
    one = len(ENCODER.encode(sel)) + 1  # (its comma)
    return len(whole) - one + 1, one, len(ENCODER.encode((f, f))) + 1


_DELTA_MAX, _SELECTION_MAX, _LEVEL_MAX = _longest_encodings()


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


def heartbeat_message(*, as_of: int, token: bytes | None, held: Iterable[str] | None = None) -> Message:
    """``{"type":"heartbeat","as_of":ms}``; ``held`` (a conflated subscription's): the markets
    whose changes its window still holds, ``"held":[ids]`` — the heartbeat does not vouch for
    them (what the client holds of them may be behind)."""
    if held is None:
        return Message(b"heartbeat", b'{"type":"heartbeat","as_of":%d}' % as_of, token)
    return Message(b"heartbeat", b'{"type":"heartbeat","as_of":%d,"held":%s}' % (as_of, ENCODER.encode(list(held))),
                   token)


def status_message(*, source: str, state: str, reason: str | None, stale_markets: Sequence[str],
                   token: bytes | None, turned_stale: Sequence[str] = (), turned_fresh: Sequence[str] = (),
                   stale_events: Sequence[str] = (), as_of: int | None = None) -> Message:
    """``{"type":"status","source","state","reason","stale_markets":[ids],
    "turned_stale":[ids],"turned_fresh":[ids],"stale_events":[event ids],"as_of":ms}``."""
    obj: dict[str, object] = {"type": "status", "source": source, "state": state, "reason": reason,
                              "stale_markets": list(stale_markets), "turned_stale": list(turned_stale),
                              "turned_fresh": list(turned_fresh), "stale_events": list(stale_events)}
    if as_of is not None:
        obj["as_of"] = as_of
    return Message(b"status", ENCODER.encode(obj), token)


def event_state_message(state_json: bytes, *, sent_at: int, info: object = None) -> Message:
    """``{"type":"event_state","event_state":<state JSON with age_ms and stale>,"sent_at":ms}``.

    No token (SSE: no ``id:`` line; WebSocket: no ``"token"``): a state is
    whole and versioned, resending one is harmless, so it never moves a
    client's resume position. The key is ``event_state``, not ``state``:
    ``status`` messages use ``state`` for a string, and clients that decode
    one envelope for every message type (this package's Python client before
    event states) would fail on an object there."""
    return Message(b"event_state", b'{"type":"event_state","event_state":%s,"sent_at":%d}' % (state_json, sent_at),
                   None, None, info)


def resumed_message(*, recovered: bool, token: bytes | None = None, as_of: int | None = None) -> Message:
    """``{"type":"resumed","recovered":bool,"as_of":ms}`` for ONE resume: ``as_of`` is when it is
    queued for the subscription, a send time as a heartbeat's is (clients measure their stream's
    lag from it; after a resume from the ring the replayed deltas' ``sent_at`` is when each was
    applied, so one of them as the new connection's baseline would hide a slow client's lag) —
    never cached nor shared between resumes. (None: left out, as a server before it sent it.)"""
    if as_of is None:
        return Message(b"resumed", b'{"type":"resumed","recovered":%s}' % _bool(recovered), token)
    return Message(b"resumed", b'{"type":"resumed","recovered":%s,"as_of":%d}' % (_bool(recovered), as_of), token)


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
