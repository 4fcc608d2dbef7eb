"""``view=best`` in the subscription's ``odds_format``.

SSE and WebSocket accepted ``odds_format`` with ``view=best`` and the subscription kept it, but every
best message went out in decimal (``streaming.bestview`` queued plain messages, and the converter only
knew ``selections``): a client that asked for American odds read a best price of 2.5 as +2.5. Now each
outcome's ``best.price``, ``best_lay.price`` and ``fair`` are converted — on the snapshot, a change and
the hub's resync snapshots — once per format per message (``Message.formatted``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import msgspec
import pytest
from websockets.asyncio.client import connect

import streaming.odds_format as odds_format
from feed.book import Book
from feed.models import MarketHeader, Selection
from feed.normalise.base import MarketUpdate
from feed.settings import Settings
from feed.store import Store
from streaming.hub import Hub
from streaming.odds_format import convert_best_json, convert_json
from streaming.state import Filter, NodeOptions, NodeState
from streaming_helpers import Feed, SSEReader, make_app, now_ms, serve

IDS = {"home": "h", "draw": "d", "away": "a"}


def _market(mid: str, book: str, prices: dict[str, float], lays: dict[str, float] | None = None) -> MarketUpdate:
    t = now_ms()
    lays = lays or {}
    sels = [Selection(selection_id=IDS[o], name=o.title(), outcome=o, price=p, back=[(p, 100.0)],
                      lay=[(lays[o], 50.0)] if o in lays else []) for o, p in prices.items()]
    return MarketUpdate(market_id=mid, source=book, image=True,
                        header=MarketHeader(sport="soccer", event_id="a:e", event_name="Arsenal v Chelsea",
                                            bookmaker=book, status="OPEN", market_type="match_result",
                                            name="Match Odds", start_time=t + 3_600_000),
                        selections=sels, source_ts=t, received_at=t + 1)


def _price(mid: str, book: str, outcome: str, p: float) -> MarketUpdate:
    t = now_ms()
    return MarketUpdate(market_id=mid, source=book, image=False, header=None,
                        selections=[Selection(selection_id=IDS[outcome], name=outcome.title(), outcome=outcome,
                                              price=p, back=[(p, 100.0)])], source_ts=t, received_at=t + 1)


def _outcomes(msg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (ev,) = msg["events"] if "events" in msg else [msg]
    (mkt,) = [m for m in ev["markets"] if not m.get("removed")]
    return {o["outcome"]: o for o in mkt["outcomes"]}


def _prices(msg: dict[str, Any]) -> dict[str, tuple[Any, Any, Any]]:
    return {k: (o["best"]["price"], (o.get("best_lay") or {}).get("price"), o.get("fair"))
            for k, o in _outcomes(msg).items()}


def test_the_converter_takes_best_best_lay_and_fair_and_nothing_else() -> None:
    best = {"price": 2.5, "bookmaker": "b", "market_id": "m", "selection_id": "h", "age_ms": 7, "size": 100.0}
    body = msgspec.json.encode({"type": "best", "snapshot": True, "events": [{"event_id": "ev:a", "markets": [
        {"market": "match_result", "market_type": "match_result", "outcomes": [
            {"outcome": "home", "best": best, "best_lay": {**best, "price": 2.6}, "fair": 2.75, "books": 2},
            {"outcome": "away", "best": {**best, "price": 1.5}, "fair": None, "books": 1},
            {"outcome": "long", "best": {**best, "price": 1000.0}, "fair": 1500.0, "books": 2},
            {"outcome": "short", "best": {**best, "price": 1.01}, "fair": 1.004, "books": 2}]}]}], "as_of": 1})
    am = msgspec.json.decode(convert_json(body, "american"))
    got = {o["outcome"]: o for o in am["events"][0]["markets"][0]["outcomes"]}
    assert (got["home"]["best"]["price"], got["home"]["best_lay"]["price"], got["home"]["fair"]) == (150, 160, 175)
    assert (got["away"]["best"]["price"], got["away"]["fair"]) == (-200, None)
    # a fair price outside a stored price's range (1.01–1000) is converted, never refused
    assert (got["long"]["best"]["price"], got["long"]["fair"]) == (99900, 149900)
    assert (got["short"]["best"]["price"], got["short"]["fair"]) == (-10000, -25000)
    assert {k: v for k, v in got["home"]["best"].items() if k != "price"} == {
        k: v for k, v in best.items() if k != "price"}  # size, age, where: as they were
    assert got["home"]["books"] == 2 and am["as_of"] == 1
    fr = msgspec.json.decode(convert_best_json(body, "fractional"))
    got = {o["outcome"]: o for o in fr["events"][0]["markets"][0]["outcomes"]}
    assert (got["home"]["best"]["price"], got["home"]["best_lay"]["price"], got["home"]["fair"]) == (
        "3/2", "8/5", "7/4")
    assert (got["long"]["fair"], got["short"]["fair"], got["short"]["best"]["price"]) == ("1499/1", "1/250", "1/100")
    change = msgspec.json.encode({"type": "best", "event_id": "ev:a", "markets": [
        {"market": "match_result", "market_type": "match_result", "outcomes": [
            {"outcome": "home", "best": best, "fair": 3.0}]},
        {"market": "total:line=2.5", "market_type": "total", "specifiers": {"line": "2.5"}, "outcomes": [],
         "removed": True}], "as_of": 2})
    out = msgspec.json.decode(convert_json(change, "american"))
    assert out["markets"][0]["outcomes"][0]["best"]["price"] == 150 and out["markets"][0]["outcomes"][0]["fair"] == 200
    assert out["markets"][1] == msgspec.json.decode(change)["markets"][1]
    empty = b'{"type":"best","snapshot":true,"events":[],"as_of":1}'
    assert convert_json(empty, "american") is empty


class _Node:
    def __init__(self) -> None:
        self.st = NodeState(Settings(), 1, NodeOptions())
        self.book = Book()
        for u in (_market("a:1", "book_a", {"home": 2.5, "draw": 3.2, "away": 1.5}, {"home": 2.6}),
                  _market("b:1", "book_b", {"home": 2.4, "draw": 3.4, "away": 1.45})):
            self.book.apply(u)
        self.st.replace_partitions({0: ("1-0", list(self.book.markets.values()))}, "ep")
        self.hub = Hub(self.st, None, outbox_max_bytes=1 << 20)
        self.n = 2

    def write(self, u: MarketUpdate) -> None:
        d = self.book.apply(u)
        assert d is not None
        entry = self.st.apply_entry(0, f"{self.n}-0", [d], now_ms())
        self.n += 1
        assert entry is not None
        self.hub.dispatch(entry)


def _best_msgs(frames: list[bytes]) -> list[dict[str, Any]]:
    return [m for f in frames if (m := msgspec.json.decode(f))["type"] == "best"]


async def test_every_best_message_is_in_the_subscriptions_odds_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshot, change, resync (a reload's and a slow consumer's): American, fractional and decimal
    subscribers each read the same best prices in their format; a change is converted once per format,
    however many subscribers share it."""
    node = _Node()
    hub = node.hub
    conns = {}
    for name, fmt in (("american", "american"), ("american2", "american"), ("fractional", "fractional"),
                      ("decimal", None)):
        conn = conns[name] = hub.connect("ws", heartbeat_ms=60_000)
        await hub.subscribe(conn, Filter(), fmt=fmt, view="best")

    def read(name: str) -> dict[str, tuple[Any, Any, Any]]:
        (msg,) = _best_msgs(conns[name].take())
        return _prices(msg)

    dec = read("decimal")
    assert {k: v[:2] for k, v in dec.items()} == {"home": (2.5, 2.6), "draw": (3.4, None), "away": (1.5, None)}
    fair = {k: v[2] for k, v in dec.items()}
    assert all(isinstance(f, float) for f in fair.values())
    snap = read("american")
    assert snap == {"home": (150, 160, odds_format.decimal_to_american(fair["home"])),
                    "draw": (240, None, odds_format.decimal_to_american(fair["draw"])),
                    "away": (-200, None, odds_format.decimal_to_american(fair["away"]))}
    assert read("american2") == snap
    frac = read("fractional")
    assert frac["home"][:2] == ("3/2", "8/5") and frac["draw"][0] == "12/5" and frac["away"][0] == "1/2"
    assert frac["away"][2] == odds_format.decimal_to_fractional(fair["away"])

    calls: list[str] = []
    real = odds_format.convert_best_json

    def counted(body: bytes, fmt: str) -> bytes:
        calls.append(fmt)
        return real(body, fmt)
    monkeypatch.setattr(odds_format, "convert_best_json", counted)
    node.write(_price("b:1", "book_b", "home", 3.0))  # a new best home price
    assert sorted(calls) == ["american", "fractional"]  # once per format, not per subscriber
    assert read("decimal")["home"][0] == 3.0
    assert read("american")["home"][0] == 200 and read("american2")["home"][0] == 200
    assert read("fractional")["home"][0] == "2/1"

    hub.resync("test")  # the node reloaded: a fresh snapshot each
    assert read("american")["home"][0] == 200 and read("fractional")["home"][0] == "2/1"
    assert read("decimal")["home"][0] == 3.0
    conn = conns["american"]  # a slow consumer's resync snapshot
    (msg,) = _best_msgs(hub.resync_frames(conn))
    assert _prices(msg)["home"][:2] == (200, 160)
    hub.close_all()


async def test_best_streams_in_american_and_fractional_on_the_wire(store: Store, redis_url: str) -> None:
    """End to end: SSE ``?view=best&odds_format=american`` and a WebSocket subscribe with
    ``"view":"best","odds_format":"fractional"`` read converted prices, snapshot and change."""
    feed = Feed(store)
    await feed.write(_market("a:1", "book_a", {"home": 2.5, "draw": 3.2, "away": 1.5}))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c, \
            connect(base.replace("http://", "ws://") + "/v1/ws") as ws:
        async with c.stream("GET", "/v1/stream?view=best&odds_format=american") as resp:
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "view": "best", "odds_format": "fractional"}))

            async def ws_best() -> dict[str, Any]:
                while True:
                    m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if m["type"] == "best":
                        return m
            sse = SSEReader(resp)
            snap = await sse.until(lambda e: e.event == "best")
            assert {k: v[0] for k, v in _prices(snap.data).items()} == {"home": 150, "draw": 220, "away": -200}
            assert {k: v[0] for k, v in _prices(await ws_best()).items()} == {"home": "3/2", "draw": "11/5",
                                                                              "away": "1/2"}
            await feed.write(_price("a:1", "book_a", "home", 3.0))
            change = await sse.until(lambda e: e.event == "best")
            assert _prices(change.data)["home"][0] == 200 and isinstance(_prices(change.data)["home"][2], int)
            assert _prices(await ws_best())["home"][0] == "2/1"
