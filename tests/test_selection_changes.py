"""Deltas carry only what changed of each selection (issue 11, item 4).

The book sends per changed selection a :class:`feed.models.SelectionChange`
with only the fields that differ (a ladder side whole, or absent); every
consumer applies it field by field with :func:`feed.models.apply_delta`.
These tests pin the rule on the wire and in the book, the Betfair
normaliser's "rebuild a side only when its top levels moved", old log
entries (full selections) still applying, and conflation merging partial
changes end to end (client book == REST book).
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import msgspec
import pytest
from msgspec import UNSET

from feed.book import Book
from feed.models import (
    DELTA_DECODER,
    ENCODER,
    MARKET_DECODER,
    Delta,
    Market,
    MarketHeader,
    Selection,
    SelectionChange,
    apply_delta,
    apply_selection_change,
    selection_change,
)
from feed.normalise.base import MarketUpdate
from feed.normalise.betfair import BetfairNormaliser
from feed.store import Store
from streaming_helpers import TIMEOUT_S, Feed, LocalBook, SSEReader, make_app, now_ms, serve

T = 1_800_000_000_000
HEADER = MarketHeader(sport="soccer", event_id="e1", name="Match Odds", status="OPEN")


def _upd(sels: list[Selection], *, image: bool = False, t: int = T) -> MarketUpdate:
    return MarketUpdate(market_id="m1", source="t", image=image, header=HEADER if image else None,
                        selections=sels, source_ts=t, received_at=t + 1)


def _wire(d: Delta) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(ENCODER.encode(d))
    return out


S1 = Selection(selection_id="1", name="Home", status="ACTIVE", price=2.0, back=[(2.0, 50.0), (1.99, 20.0)],
               lay=[(2.02, 30.0), (2.04, 10.0)], ltp=2.0, traded_volume=100.0)
S2 = Selection(selection_id="2", name="Away", price=3.5, back=[(3.5, 5.0)], lay=[(3.6, 4.0)], ltp=3.55)


def _booked() -> tuple[Book, Market]:
    book = Book()
    assert book.apply(_upd([S1, S2], image=True)) is not None
    return book, book.markets["m1"]


def test_a_side_that_did_not_change_is_not_sent_and_is_kept() -> None:
    book, before = _booked()
    moved = msgspec.structs.replace(S1, back=[(2.0, 45.0), (1.99, 20.0)])  # only a back size moved
    d = book.apply(_upd([moved], t=T + 5))
    assert d is not None and len(d.selections) == 1
    wire = _wire(d)["selections"][0]
    assert wire == {"selection_id": "1", "back": [[2.0, 45.0], [1.99, 20.0]]}  # no lay, price, ltp, name …
    after = apply_delta(before, DELTA_DECODER.decode(ENCODER.encode(d)))
    assert after == book.markets["m1"]
    sel = after.selection("1") if after else None
    assert sel is not None and sel.lay == S1.lay and sel.ltp == 2.0 and sel.name == "Home"


def test_a_side_that_emptied_is_sent_as_an_empty_list_and_a_cleared_value_as_null() -> None:
    book, before = _booked()
    gone = msgspec.structs.replace(S1, back=[], price=None, ltp=None, status="SUSPENDED")
    d = book.apply(_upd([gone], t=T + 5))
    assert d is not None
    wire = _wire(d)["selections"][0]
    assert wire == {"selection_id": "1", "status": "SUSPENDED", "price": None, "back": [], "ltp": None}
    after = apply_delta(before, DELTA_DECODER.decode(ENCODER.encode(d)))
    assert after == book.markets["m1"]
    sel = after.selection("1") if after else None
    assert sel is not None and sel.back == [] and sel.price is None and sel.lay == S1.lay


def test_a_new_selection_carries_every_field() -> None:
    book, before = _booked()
    s3 = Selection(selection_id="3", name="Draw", price=3.3, back=[(3.3, 2.0)])
    d = book.apply(_upd([s3], t=T + 5))
    assert d is not None
    assert set(_wire(d)["selections"][0]) == set(Selection.__struct_fields__)
    after = apply_delta(before, d)
    assert after == book.markets["m1"] and [s.selection_id for s in after.selections] == ["1", "2", "3"]


def test_an_unchanged_selection_is_left_out_and_an_unchanged_update_is_a_duplicate() -> None:
    book, _ = _booked()
    d = book.apply(_upd([S1, msgspec.structs.replace(S2, ltp=3.6)], t=T + 5))
    assert d is not None and [(c.selection_id, c.ltp, c.back) for c in d.selections] == [("2", 3.6, UNSET)]
    assert book.apply(_upd([S1], t=T + 6)) is None and book.last_drop == "duplicate"


def test_a_selection_given_twice_in_one_update_applies_in_order() -> None:
    book, before = _booked()
    a = msgspec.structs.replace(S1, back=[(2.1, 1.0)], price=2.1)
    b = msgspec.structs.replace(a, lay=[(2.2, 1.0)])
    d = book.apply(_upd([a, b], t=T + 5))
    assert d is not None and [c.selection_id for c in d.selections] == ["1", "1"]
    assert d.selections[1].back is UNSET and d.selections[1].lay == [(2.2, 1.0)]
    assert apply_delta(before, d) == book.markets["m1"]


def test_old_log_entries_with_whole_selections_still_apply() -> None:
    """A delta log entry written before issue 11 (every field of each changed
    selection, ``lay: []`` included) decodes and replaces every field."""
    _, before = _booked()
    old_sel = msgspec.structs.replace(S1, back=[(2.2, 3.0)], price=2.2, lay=[])
    entry = {"market_id": "m1", "seq": before.seq + 1, "kind": "delta", "source": "t", "source_ts": T + 5,
             "received_at": T + 6, "stored_at": T + 7, "selections": [msgspec.to_builtins(old_sel)]}
    (d,) = msgspec.json.decode(json.dumps([entry]).encode(), type=list[Delta])
    after = apply_delta(before, d)
    assert after is not None and after.selection("1") == old_sel and after.selection("2") == S2


def test_selection_change_round_trips_random_changes() -> None:
    rng = random.Random(11)

    def ladder() -> list[tuple[float, float]]:
        return [(round(1.01 + rng.random() * 10, 2), float(rng.randint(1, 99))) for _ in range(rng.randint(0, 3))]

    def value(f: str, cur: Any) -> Any:
        choices: dict[str, list[Any]] = {
            "name": [None, "x", "y"], "handicap": [0.0, -0.5], "status": ["ACTIVE", "SUSPENDED", "REMOVED"],
            "price": [None, 1.5, 2.5], "back": [[], ladder(), ladder()], "lay": [[], ladder(), ladder()],
            "ltp": [None, 2.0, 3.0], "traded_volume": [None, 10.0, 20.0], "max_stake": [None, 100.0],
            "sort_priority": [None, 1, 2], "adjustment_factor": [None, 12.5], "bsp": [None, 4.4],
            "price_raw": [None, "5/2"], "outcome": [None, "home", "away"],
            "void_factor": [None, 0.5, 1.0], "dead_heat_factor": [None, 0.5],
        }
        return rng.choice(choices[f]) if rng.random() < 0.3 else cur

    cur = Selection(selection_id="1")
    for _ in range(500):
        new = Selection(selection_id="1", **{f: value(f, getattr(cur, f)) for f in Selection.__struct_fields__[1:]})
        c = selection_change(cur, new)
        if c is None:
            assert new == cur
            continue
        wire = msgspec.json.decode(ENCODER.encode(c), type=SelectionChange)
        assert apply_selection_change(cur, wire) == new
        sent = set(msgspec.json.decode(ENCODER.encode(c)))
        assert sent == {"selection_id"} | {f for f in Selection.__struct_fields__[1:]
                                           if getattr(cur, f) != getattr(new, f)}
        cur = new


# -- the Betfair normaliser rebuilds a side only when its top levels moved ----------------------------------


def _mcm(pt: int, rc: list[dict[str, Any]], img: bool = False) -> bytes:
    mc: dict[str, Any] = {"id": "1.9", "rc": rc}
    if img:
        mc["img"] = True
        mc["marketDefinition"] = {"status": "OPEN", "eventId": "5", "eventTypeId": "1", "marketType": "MATCH_ODDS",
                                  "runners": [{"id": 7, "status": "ACTIVE"}]}
    return json.dumps({"op": "mcm", "pt": pt, "clk": str(pt), "mc": [mc]}).encode()


def test_a_price_ladder_change_beyond_the_depth_does_not_rebuild_the_side() -> None:
    n = BetfairNormaliser("bf", ladder_depth=3)
    atb = [[2.0 + i / 100, 10.0 + i] for i in range(6)]
    atl = [[2.1 + i / 100, 5.0 + i] for i in range(6)]
    (u,) = n.feed(_mcm(T, [{"id": 7, "atb": atb, "atl": atl}], img=True), T).updates
    back, lay = u.selections[0].back, u.selections[0].lay
    assert back == [(2.05, 15.0), (2.04, 14.0), (2.03, 13.0)] and lay == [(2.1, 5.0), (2.11, 6.0), (2.12, 7.0)]
    book = Book()
    assert book.apply(u) is not None
    # deeper than the 3rd best on both sides: the canonical sides are the very same lists (nothing to send)
    (u,) = n.feed(_mcm(T + 1, [{"id": 7, "atb": [[2.0, 0], [2.025, 3]], "atl": [[2.15, 9], [2.13, 0]]}]), T + 1).updates
    assert u.selections[0].back is back and u.selections[0].lay is lay
    assert book.apply(u) is None and book.last_drop == "duplicate"
    # at the edge (the 3rd best back) and beyond it on lay: back rebuilt, lay the same list
    (u,) = n.feed(_mcm(T + 2, [{"id": 7, "atb": [[2.03, 0]], "atl": [[2.14, 1]]}]), T + 2).updates
    assert u.selections[0].back == [(2.05, 15.0), (2.04, 14.0), (2.025, 3.0)] and u.selections[0].lay is lay
    d = book.apply(u)
    assert d is not None and d.selections[0].back == [(2.05, 15.0), (2.04, 14.0), (2.025, 3.0)]
    assert d.selections[0].lay is UNSET and "lay" not in _wire(d)["selections"][0]


def test_an_unchanged_runner_hands_out_its_last_selection_and_any_change_a_new_one() -> None:
    """A runner change that moves nothing of its canonical selection (prices
    deeper than ``ladder_depth``) yields the very same Selection (the book
    takes it as unchanged at once); a change of any field — ltp, traded
    volume, a side, its definition — yields a new one carrying it."""
    n = BetfairNormaliser("bf", ladder_depth=2)
    atb = [[2.0 + i / 100, 10.0 + i] for i in range(4)]
    (u,) = n.feed(_mcm(T, [{"id": 7, "atb": atb, "atl": [[2.2, 5.0]], "ltp": 2.0, "tv": 10.0}], img=True), T).updates
    first = u.selections[0]
    book = Book()
    assert book.apply(u) is not None
    (u,) = n.feed(_mcm(T + 1, [{"id": 7, "atb": [[2.0, 1.0]]}]), T + 1).updates  # deeper than the 2nd best
    assert u.selections[0] is first
    assert book.apply(u) is None and book.last_drop == "duplicate"
    steps: list[tuple[dict[str, Any], str, Any]] = [
        ({"ltp": 2.5}, "ltp", 2.5),
        ({"tv": 11.0}, "traded_volume", 11.0),
        ({"atl": [[2.19, 1.0]]}, "lay", [(2.19, 1.0), (2.2, 5.0)]),
        ({"atb": [[2.03, 0]]}, "back", [(2.02, 12.0), (2.01, 11.0)]),
        ({"ltp": 0}, "ltp", None),
    ]
    prev = first
    for i, (change, field, value) in enumerate(steps, start=2):
        (u,) = n.feed(_mcm(T + i, [{"id": 7, **change}]), T + i).updates
        sel = u.selections[0]
        assert sel is not prev and getattr(sel, field) == value, (change, sel)
        d = book.apply(u)
        assert d is not None and getattr(d.selections[0], field) == value
        prev = sel
    # a definition that changes the runner's status: a new selection with it
    line = json.dumps({"op": "mcm", "pt": T + 10, "clk": "x", "mc": [{"id": "1.9", "marketDefinition": {
        "status": "OPEN", "eventId": "5", "eventTypeId": "1", "marketType": "MATCH_ODDS",
        "runners": [{"id": 7, "status": "REMOVED"}]}}]}).encode()
    (u,) = n.feed(line, T + 10).updates
    assert u.selections[0] is not prev and u.selections[0].status == "REMOVED"
    d = book.apply(u)
    assert d is not None and d.selections[0].status == "REMOVED"
    assert book.markets["bf:1.9"].selections[0] == u.selections[0]


@pytest.mark.parametrize("seed", range(4))
def test_price_ladders_stay_exact_under_random_changes(seed: int) -> None:
    """Whatever the changes (deep, at the edge, deletions of the best), each
    canonical side equals the best ``ladder_depth`` levels of the full
    ladder, and the book's deltas rebuild the normaliser's selection."""
    rng = random.Random(seed)
    depth = 3
    n = BetfairNormaliser("bf", ladder_depth=depth)
    full_b: dict[float, float] = {}
    full_l: dict[float, float] = {}
    prices = [round(1.5 + i / 50, 2) for i in range(30)]

    def changes(book: dict[float, float]) -> list[list[float]]:
        out = []
        for _ in range(rng.randint(1, 4)):
            p = rng.choice(prices)
            size = 0.0 if rng.random() < 0.4 else float(rng.randint(1, 50))
            out.append([p, size])
            if size:
                book[p] = size
            else:
                book.pop(p, None)
        return out

    u = n.feed(_mcm(T, [{"id": 7, "atb": changes(full_b), "atl": changes(full_l)}], img=True), T).updates[0]
    book = Book()
    assert book.apply(u) is not None
    client = book.markets["bf:1.9"]
    for i in range(1, 400):
        rc: dict[str, Any] = {"id": 7}
        if rng.random() < 0.7:
            rc["atb"] = changes(full_b)
        if rng.random() < 0.7:
            rc["atl"] = changes(full_l)
        if rng.random() < 0.2:
            rc["ltp"] = rng.choice(prices)
        batch = n.feed(_mcm(T + i, [rc]), T + i)
        for u in batch.updates:
            sel = u.selections[0]
            assert sel.back == sorted(full_b.items(), reverse=True)[:depth]
            assert sel.lay == sorted(full_l.items())[:depth]
            d = book.apply(u)
            if d is not None:
                nxt = apply_delta(client, DELTA_DECODER.decode(ENCODER.encode(d)))
                assert nxt is not None
                client = nxt
    assert client == book.markets["bf:1.9"]


# -- conflation merges partial changes: client book == REST book --------------------------------------------


async def test_conflation_merges_changes_of_different_fields_of_one_selection(store: Store, redis_url: str) -> None:
    """Within one window selection 1 changes its back, then its lay, then its
    ltp (three deltas, each carrying one field): the merged delta must carry
    all of them, so the client's book equals the REST book."""
    feed = Feed(store)
    s1 = Selection(selection_id="1", name="sel 1", price=2.0, back=[(2.0, 10.0)], lay=[(2.1, 10.0)], ltp=2.0)
    s2 = Selection(selection_id="2", name="sel 2", price=3.0, back=[(3.0, 10.0)], lay=[(3.2, 10.0)])

    def upd(*sels: Selection, image: bool = False) -> MarketUpdate:
        return MarketUpdate(market_id="m1", source="t", image=image, header=HEADER if image else None,
                            selections=list(sels), source_ts=now_ms(), received_at=now_ms() + 1)

    await feed.write(upd(s1, s2, image=True))
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as c:
        async with c.stream("GET", "/v1/stream?conflate_ms=500") as resp:
            sse = SSEReader(resp)
            local = LocalBook()
            local.on((await sse.next()).data)
            a = msgspec.structs.replace(s1, back=[(2.02, 5.0)], price=2.02)
            b = msgspec.structs.replace(a, lay=[(2.06, 7.0)])
            c3 = msgspec.structs.replace(b, ltp=2.04)
            written = []
            for u in (upd(a), upd(b), upd(c3), upd(msgspec.structs.replace(s2, lay=[]))):
                written += await feed.write(u)
            assert [len(_wire(d)["selections"][0]) for d in written] == [3, 2, 2, 2]  # id + what changed
            merged: list[dict[str, Any]] = []
            while local.markets["m1"].seq != written[-1].seq:
                ev = await sse.next(TIMEOUT_S)
                if ev.event == "delta":
                    merged.append(ev.data)
                    local.on(ev.data)
            assert any(m.get("conflated") for m in merged)
            rest = MARKET_DECODER.decode((await c.get("/v1/markets/m1")).content)
            assert local.markets["m1"].selections == rest.selections == feed.book.markets["m1"].selections
            assert rest.selection("1") == c3 and rest.selection("2") == msgspec.structs.replace(s2, lay=[])
