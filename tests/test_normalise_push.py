"""feed.normalise.push: the generic JSON push format → canonical updates.

Golden files (``tests/fixtures/push/<name>.ndjson`` + ``<name>.expected.json``)
are written by hand: each message's expected batch (cursor, heartbeat, the
updates with their header and selections, what was dropped or rejected).
Expected headers list the fields that differ from ``MarketHeader()`` plus
``status``; selections list ``selection_id``, ``status``, ``price`` and the
name when there is one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from feed.book import Book
from feed.errors import FeedDecodeError
from feed.models import MarketHeader, Selection
from feed.normalise.push import PushNormaliser, entry_key, market_id_of, ts_to_ms
from feed.odds import to_decimal

FIXTURES = Path(__file__).parent / "fixtures" / "push"
RECV_MS = 1718000099999
_HEADER_DEFAULTS = msgspec.to_builtins(MarketHeader())


def compact_header(h: MarketHeader | None) -> dict[str, Any] | None:
    if h is None:
        return None
    full = msgspec.to_builtins(h)
    out = {k: v for k, v in full.items() if v != _HEADER_DEFAULTS[k]}
    out["status"] = h.status
    return out


def compact_selection(s: Selection) -> dict[str, Any]:
    out: dict[str, Any] = {"selection_id": s.selection_id}
    if s.name is not None:
        out["name"] = s.name
    out["status"] = s.status
    out["price"] = s.price
    if s.max_stake is not None:
        out["max_stake"] = s.max_stake
    return out


def run_golden(name: str) -> list[dict[str, Any]]:
    n = PushNormaliser("px")
    out: list[dict[str, Any]] = []
    for i, raw in enumerate((FIXTURES / f"{name}.ndjson").read_bytes().splitlines(), start=1):
        before = dict(n.dropped)
        try:
            batch = n.feed(raw, RECV_MS)
        except FeedDecodeError as exc:
            out.append({"line": i, "rejected": exc.reason})
            continue
        got: dict[str, Any] = {"line": i, "op": batch.op}
        if batch.heartbeat:
            got["heartbeat"] = True
        got["cursor"] = batch.cursor
        got["pt"] = batch.provider_ts
        if batch.rejected:  # markets rejected alone
            got["rejected_markets"] = [[e.reason, e.market_id] for e in batch.rejected]
        got["updates"] = [
            {"market_id": u.market_id, "image": u.image, "source_ts": u.source_ts,
             "header": compact_header(u.header), "selections": [compact_selection(s) for s in u.selections]}
            for u in batch.updates
        ]
        for u in batch.updates:
            assert u.received_at == RECV_MS and u.source == "px"
        dropped = [k for k, v in n.dropped.items() if v != before.get(k, 0)]
        if dropped:
            got["dropped"] = dropped[0]
        out.append(got)
    return out


@pytest.mark.parametrize("name", ["soccer_lifecycle", "racing_formats"])
def test_golden(name: str) -> None:
    expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    got = run_golden(name)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g == e, f"line {e['line']}"


def test_golden_updates_apply_in_the_book() -> None:
    """The updates of a golden run are accepted by the book as they come
    (images first, no delta for an unknown market, nothing out of order)."""
    n, book = PushNormaliser("px"), Book()
    for raw in (FIXTURES / "soccer_lifecycle.ndjson").read_bytes().splitlines():
        try:
            batch = n.feed(raw, RECV_MS)
        except FeedDecodeError:
            continue
        for u in batch.updates:
            book.apply(u, RECV_MS)
    assert book.dropped.get("no_image", 0) == 0 and book.dropped.get("out_of_order", 0) == 0
    ml, total = book.markets["px:f1:moneyline"], book.markets["px:f1:total:2.5"]
    assert (ml.status, total.status) == ("CANCELLED", "CANCELLED")
    assert [(s.selection_id, s.status) for s in ml.selections] == [("home", "WINNER"), ("draw", "LOSER"),
                                                                   ("away", "LOSER")]
    assert [(s.selection_id, s.status, s.price) for s in total.selections] == [("over", "SUSPENDED", 1.85)]


# -- helpers -----------------------------------------------------------------------------------


def odd(sel: str = "home", price: Any = 2.0, *, fixture: dict[str, Any] | None = None, market: str = "ml",
        **extra: Any) -> dict[str, Any]:
    return {"fixture": fixture or {"id": "f1", "sport": "soccer", "home": "A", "away": "B"},
            "market": {"id": market, "name": "Moneyline"}, "selection": {"id": sel, "name": sel.title()},
            "price": price, **extra}


def msg(type_: str = "odds", n: int = 1, *data: dict[str, Any], ms: int | None = None, **extra: Any) -> bytes:
    ms = 1718000000000 + n * 1000 if ms is None else ms
    body: dict[str, Any] = {"type": type_, "entry_id": f"{ms}-{n}", "seq": n, "emitted_at": ms, **extra}
    if type_ in ("odds", "locked-odds", "snapshot"):
        body["data"] = list(data) or [odd()]
    return json.dumps(body).encode()


def feed(n: PushNormaliser, raw: bytes) -> Any:
    return n.feed(raw, RECV_MS)


# -- prices --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("price", "fmt", "decimal"), [
    (2.5, None, 2.5), (1.01, "decimal", 1.01), (1000, "decimal", 1000.0),
    (150, "american", 2.5), (-200, "american", 1.5), (-110, "american", 1.909), (100, "american", 2.0),
    ("5/2", "fractional", 3.5), ("evs", "fractional", 2.0), ("1/100", "fractional", 1.01), ("11-10", "fractional", 2.1),
])
def test_price_formats_convert_to_decimal(price: Any, fmt: str | None, decimal: float) -> None:
    n = PushNormaliser("px")
    extra = {"price_format": fmt} if fmt else {}
    batch = feed(n, msg("odds", 1, odd(price=price, **extra)))
    assert batch.updates[0].selections[0].price == decimal


def test_converted_prices_keep_the_providers_text() -> None:
    """README: American and fractional prices are converted to decimal with the provider's text in
    ``price_raw`` (push left it empty); a locked odd without a price keeps both."""
    n = PushNormaliser("px")
    batch = feed(n, msg("odds", 1, odd("a", -110, price_format="american"), odd("b", 150, price_format="american"),
                        odd("c", "5/2", price_format="fractional"), odd("d", 2.5)))
    assert [(s.selection_id, s.price, s.price_raw) for s in batch.updates[0].selections] == [
        ("a", to_decimal(-110, "american"), "-110"), ("b", 2.5, "150"), ("c", 3.5, "5/2"), ("d", 2.5, None)]
    batch = feed(n, msg("locked-odds", 2, odd("a", None)))
    assert [(s.status, s.price, s.price_raw) for s in batch.updates[0].selections] == [
        ("SUSPENDED", to_decimal(-110, "american"), "-110")]


def test_message_level_price_format_is_the_default_and_an_odd_overrides_it() -> None:
    n = PushNormaliser("px")
    batch = feed(n, msg("odds", 1, odd("a", "5/2"), odd("b", -200, price_format="american"),
                        price_format="fractional"))
    assert [s.price for s in batch.updates[0].selections] == [3.5, 1.5]


@pytest.mark.parametrize(("price", "fmt"), [
    (1.0, None), (0.5, None), (-3, None), (1000.01, None), ("NaN", None), ("Infinity", None), ("2.5", None),
    (True, None), ([2.0], None), ({"v": 2}, None), (50, "american"), (-99.5, "american"), ("2.5", "american"),
    ("0/1", "fractional"), ("5/0", "fractional"), ("abc", "fractional"), (2.5, "fractional"),
    ("1/100000", "fractional"), (-10_000_000, "american"),
])
def test_invalid_prices_reject_their_market_alone(price: Any, fmt: str | None) -> None:
    """Issue 8: an invalid price rejects its market (every odd of it in the
    message: not the good odd of the same market either); the message's
    other markets apply and the entry id advances."""
    n = PushNormaliser("px")
    feed(n, msg("odds", 1, odd("a", 2.0), odd("b", 3.0), odd("o", 1.9, market="btts")))
    extra = {"price_format": fmt} if fmt else {}
    raw = msg("odds", 2, odd("a", 2.2), odd("b", price, **extra), odd("o", 1.95, market="btts"))
    batch = feed(n, raw)
    assert [(e.reason, e.market_id) for e in batch.rejected] == [("invalid_price", "px:f1:ml")]
    assert batch.rejected[0].raw == raw
    assert [(u.market_id, [s.price for s in u.selections]) for u in batch.updates] == [("px:f1:btts", [1.95])]
    assert batch.cursor == n.last_entry_id
    # nothing of the bad market was applied: not the good odd either
    assert [s.price for s in n.markets["px:f1:ml"].sels.values()] == [2.0, 3.0]
    batch = feed(n, msg("odds", 3, odd("a", 2.4)))
    assert [s.price for s in batch.updates[0].selections] == [2.4]


@pytest.mark.parametrize(("literal", "reason"), [(b"NaN", "invalid_json"), (b"Infinity", "invalid_json")])
def test_non_finite_number_literals(literal: bytes, reason: str) -> None:
    raw = msg("odds", 1).replace(b'"price": 2.0', b'"price": ' + literal)
    with pytest.raises(FeedDecodeError) as info:
        feed(PushNormaliser("px"), raw)
    assert info.value.reason == reason


@pytest.mark.parametrize("literal", [b"1e400", b"-1e400"])
def test_out_of_range_number_literals_reject_the_market(literal: bytes) -> None:
    raw = msg("odds", 1).replace(b'"price": 2.0', b'"price": ' + literal)
    batch = feed(PushNormaliser("px"), raw)
    assert [(e.reason, e.market_id) for e in batch.rejected] == [("invalid_price", "px:f1:ml")]
    assert batch.updates == []


BAD_ODDS = [
    ("max_stake -1", odd("b", 3.0, max_stake=-1), "invalid_size", "px:f1:ml"),
    ("max_stake 1e308", odd("b", 3.0, max_stake=1e308), "invalid_size", "px:f1:ml"),
    ("price 1.0099", odd("b", 1.0099), "invalid_price", "px:f1:ml"),
    ("price 1.001", odd("b", 1.001), "invalid_price", "px:f1:ml"),
    ("line 1e6", {**odd("b", 3.0), "market": {"id": "ml", "line": 1e6}}, "invalid_number", None),
    ("timestamp an hour ahead", odd("b", 3.0, timestamp=RECV_MS / 1000 + 3600), "clock_skew", "px:f1:ml"),
    ("timestamp 1e308", odd("b", 3.0, timestamp=1e308), "clock_skew", "px:f1:ml"),
    ("timestamp negative", odd("b", 3.0, timestamp=-1), "clock_skew", "px:f1:ml"),
    ("start_time 1e308", odd("b", 3.0, fixture={"id": "f1", "start_time": 1e308}), "invalid_time", "px:f1:ml"),
    ("start_time year 9999", odd("b", 3.0, fixture={"id": "f1", "start_time": "9999-01-01T00:00:00"}),
     "invalid_time", "px:f1:ml"),
    ("no fixture", {"market": {"id": "ml"}, "selection": {"id": "b"}, "price": 2}, "invalid_schema", None),
    ("fixture id with a space", odd("b", 3.0, fixture={"id": "f 1"}), "invalid_schema", None),
    ("fixture id -4", odd("b", 3.0, fixture={"id": -4}), "invalid_schema", None),
    ("fixture id 2**53", odd("b", 3.0, fixture={"id": 2**53}), "invalid_schema", None),
    ("odd status maybe", odd("b", 3.0, status="maybe"), "invalid_schema", "px:f1:ml"),
    ("fixture status on fire", odd("b", 3.0, fixture={"id": "f1", "status": "on fire"}), "invalid_schema", "px:f1:ml"),
]


@pytest.mark.parametrize(("bad", "reason", "market"), [(o, r, m) for _, o, r, m in BAD_ODDS],
                         ids=[n for n, _, _, _ in BAD_ODDS])
def test_a_bad_odd_rejects_its_market_alone(bad: dict[str, Any], reason: str, market: str | None) -> None:
    from feed.validate import validate_update

    n = PushNormaliser("px")
    feed(n, msg("odds", 1, odd("a", 2.0), odd("b", 3.0), odd("o", 1.9, market="btts")))
    before = dict(n.markets["px:f1:ml"].sels)
    raw = msg("odds", 2, odd("o", 1.95, market="btts"), odd("a", 2.2), bad)
    batch = feed(n, raw)
    assert [(e.reason, e.market_id) for e in batch.rejected] == [(reason, market)], [str(e) for e in batch.rejected]
    got = {u.market_id for u in batch.updates}
    assert "px:f1:btts" in got
    if market is not None:  # (an unnameable odd: its market cannot be left out, its good odds apply)
        assert "px:f1:ml" not in got and n.markets["px:f1:ml"].sels == before
    for u in batch.updates:
        validate_update(u, RECV_MS)


def test_a_bad_emitted_at_rejects_the_markets_of_odds_without_their_own_time() -> None:
    n = PushNormaliser("px")
    raw = msg("odds", 1, odd("a", 2.0), odd("o", 1.9, market="btts", timestamp=1718000000.0), ms=RECV_MS + 3_600_000)
    batch = n.feed(raw, RECV_MS)
    assert [(e.reason, e.market_id) for e in batch.rejected] == [("clock_skew", "px:f1:ml")]
    assert [u.market_id for u in batch.updates] == ["px:f1:btts"] and batch.provider_ts is None
    with pytest.raises(FeedDecodeError) as info:
        n.feed(msg("fixture-status", 2, data={"id": "f1", "status": "live"}, ms=RECV_MS + 3_600_000), RECV_MS)
    assert info.value.reason == "clock_skew"


def test_a_snapshot_is_a_full_image() -> None:
    n = PushNormaliser("px")
    assert feed(n, msg("snapshot", 1, odd("a", 2.0))).full_image
    assert not feed(n, msg("odds", 2, odd("a", 2.1))).full_image


@pytest.mark.parametrize(("raw", "reason"), [
    (b'{"type":"odds","entry_id":"1-1","seq":', "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
    (b'[1, 2]', "invalid_schema"),
    (b'{"entry_id":"1-1"}', "invalid_schema"),
    (b'{"type":"gossip","entry_id":"1-1"}', "unknown_type"),
    (b'{"type":"odds","data":[]}', "invalid_schema"),
    (b'{"type":"odds","entry_id":"yesterday","data":[]}', "invalid_schema"),
    (b'{"type":"odds","entry_id":"1-1","data":{"fixture":{"id":"f"}}}', "invalid_schema"),
    (b'{"type":"odds","entry_id":"1-1","emitted_at":-1,"data":[]}', "invalid_schema"),
    (b'{"type":"fixture-status","entry_id":"1-1","data":{"id":"f1","status":"on fire"}}', "invalid_schema"),
    (b'{"type":"fixture-status","entry_id":"1-1","data":{"id":"f1","start_time":"soon"}}', "invalid_schema"),
    (b'{"type":"fixture-status","entry_id":"1-1","data":{"id":"f1","start_time":1e308}}', "invalid_time"),
])
def test_bad_bodies_are_rejected_with_their_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(FeedDecodeError) as info:
        feed(PushNormaliser("px"), raw)
    assert info.value.reason == reason


# -- ordering ------------------------------------------------------------------------------------


def test_duplicates_and_out_of_order_entries_are_dropped_idempotently() -> None:
    n = PushNormaliser("px")
    feed(n, msg("odds", 1, odd("a", 2.0)))
    second = msg("odds", 2, odd("a", 2.2))
    assert feed(n, second).cursor == n.last_entry_id
    assert feed(n, second).updates == []
    late = msg("odds", 1, odd("a", 9.0), ms=1718000000500)
    assert feed(n, late).updates == []
    assert n.dropped == {"duplicate": 1, "out_of_order": 1}
    assert n.markets["px:f1:ml"].sels["a"].price == 2.2


def test_entry_ids_compare_as_numbers() -> None:
    assert entry_key("1718000000000-10") > entry_key("1718000000000-9")  # type: ignore[operator]
    assert entry_key("999-5") < entry_key("1000-0")  # type: ignore[operator]
    assert entry_key("abc") is None and entry_key("1-2-3") is None


def test_an_older_snapshot_is_ignored_and_an_equal_one_applies() -> None:
    n = PushNormaliser("px")
    feed(n, msg("odds", 5, odd("a", 2.0)))
    assert feed(n, msg("snapshot", 4, odd("a", 7.0))).updates == []
    assert n.dropped == {"stale_snapshot": 1}
    batch = feed(n, msg("snapshot", 5, odd("a", 2.0), odd("b", 3.0)))
    assert batch.updates[0].image and [s.selection_id for s in batch.updates[0].selections] == ["a", "b"]


def test_times_in_seconds_or_ms() -> None:
    assert ts_to_ms(1718000000.25) == 1718000000250
    assert ts_to_ms(1718000000250) == 1718000000250


def test_market_source_ts_never_goes_back() -> None:
    """A provider may send an odd changed earlier after one changed later:
    the odd is applied (it is newer for its selection) and the market's
    source_ts stays at the newest change."""
    n = PushNormaliser("px")
    feed(n, msg("odds", 1, odd("a", 2.0, timestamp=1718000005000), odd("b", 3.0, timestamp=1718000003000)))
    batch = feed(n, msg("odds", 2, odd("b", 3.2, timestamp=1718000004000)))
    assert batch.updates[0].source_ts == 1718000005000
    assert batch.updates[0].selections[0].price == 3.2


# -- semantics -----------------------------------------------------------------------------------


def test_locked_odds_keep_the_last_price_and_suspend_the_market_when_all_are_locked() -> None:
    n = PushNormaliser("px")
    feed(n, msg("odds", 1, odd("a", 2.0), odd("b", 3.0)))
    batch = feed(n, msg("locked-odds", 2, odd("a", None)))
    (u,) = batch.updates
    assert u.header is None  # b is still open: the market stays OPEN
    assert [(s.selection_id, s.status, s.price) for s in u.selections] == [("a", "SUSPENDED", 2.0)]
    batch = feed(n, msg("odds", 3, odd("b", 3.0, locked=True)))
    (u,) = batch.updates
    assert u.header is not None and (u.header.status, u.header.suspend_reason) == ("SUSPENDED", "locked")
    batch = feed(n, msg("odds", 4, odd("a", 2.1)))
    (u,) = batch.updates
    assert u.header is not None and u.header.status == "OPEN"
    assert [(s.status, s.price) for s in u.selections] == [("ACTIVE", 2.1)]


def test_fixture_status_moves_every_market_of_the_fixture() -> None:
    n = PushNormaliser("px")
    feed(n, msg("odds", 1, odd("a", 2.0), odd("o", 1.9, market="btts")))
    batch = feed(n, msg("fixture-status", 2, data={"id": "f1", "status": "suspended"}))
    assert [(u.market_id, u.header.status, u.header.suspend_reason) for u in batch.updates] == [  # type: ignore[union-attr]
        ("px:f1:ml", "SUSPENDED", "fixture_suspended"), ("px:f1:btts", "SUSPENDED", "fixture_suspended")]
    batch = feed(n, msg("fixture-status", 3, data={"id": "f1", "status": "live", "is_live": True}))
    assert [(u.header.status, u.header.in_play) for u in batch.updates] == [("OPEN", True), ("OPEN", True)]  # type: ignore[union-attr]
    assert feed(n, msg("fixture-status", 4, data={"id": "f1", "status": "live"})).updates == []
    # a fixture we hold no market of: remembered, no update
    assert feed(n, msg("fixture-status", 5, data={"id": "f9", "status": "live"})).updates == []
    batch = feed(n, msg("odds", 6, odd("x", 2.0, fixture={"id": "f9"})))
    assert batch.updates[0].header.in_play is True  # type: ignore[union-attr]


def test_a_fixture_change_inside_odds_reaches_its_other_markets() -> None:
    n = PushNormaliser("px")
    feed(n, msg("odds", 1, odd("a", 2.0), odd("o", 1.9, market="btts")))
    batch = feed(n, msg("odds", 2, odd("a", 2.1, is_live=True)))
    assert [(u.market_id, u.header is not None and u.header.in_play) for u in batch.updates] == [
        ("px:f1:ml", True), ("px:f1:btts", True)]


def _book_run(n: PushNormaliser, book: Book, raw: bytes) -> Any:
    batch = feed(n, raw)
    for u in batch.updates:
        book.apply(u, RECV_MS)
    return batch


def test_each_sportsbook_of_a_stream_is_a_market_of_its_own() -> None:
    """A stream carrying two books' odds for one selection (OpticOdds with several ``sportsbook=``
    filters) made one market of them: DraftKings' side overwritten by FanDuel's price, the other
    side still DraftKings', ``bookmaker`` the last book seen (found by the normaliser audit). The
    first book named keeps the plain id; another book's odds go to ``…@<book>``."""
    n, book = PushNormaliser("px"), Book()
    am = {"price_format": "american"}
    _book_run(n, book, msg("odds", 1, odd("a", -150, sportsbook="DraftKings", **am),
                           odd("b", 130, sportsbook="DraftKings", **am), odd("a", -110, sportsbook="FanDuel", **am),
                           odd("o", 1.9, market="btts", sportsbook="FanDuel")))
    assert sorted(book.markets) == ["px:f1:btts", "px:f1:ml", "px:f1:ml@fanduel"]
    dk, fd = book.markets["px:f1:ml"], book.markets["px:f1:ml@fanduel"]
    assert (dk.bookmaker, fd.bookmaker, book.markets["px:f1:btts"].bookmaker) == ("DraftKings", "FanDuel", "FanDuel")
    assert {s.selection_id: s.price_raw for s in dk.selections} == {"a": "-150", "b": "130"}
    assert {s.selection_id: s.price_raw for s in fd.selections} == {"a": "-110"}
    assert (dk.event_id, fd.event_id, fd.market_type_raw) == ("px:f1", "px:f1", "ml")
    # later odds of each book stay in its market; an odd naming no book is the first book's (sticky)
    _book_run(n, book, msg("odds", 2, odd("b", 2.4, sportsbook="FanDuel"), odd("a", 1.7, sportsbook="DraftKings")))
    _book_run(n, book, msg("odds", 3, odd("b", 2.3)))
    line = {"market": {"id": "total", "line": 2.5}}
    _book_run(n, book, msg("odds", 4, odd("u", 1.95, market="btts", sportsbook="FanDuel"),
                           odd("u", 2.05, sportsbook="DraftKings", market="btts"),
                           odd("o", 1.8, market="btts", sportsbook="DraftKings"),
                           {**odd("o", 1.6, sportsbook="DraftKings"), **line},
                           {**odd("o", 1.65, sportsbook="FanDuel"), **line}))
    prices = {mid: {s.selection_id: s.price for s in m.selections} for mid, m in book.markets.items()}
    assert prices == {"px:f1:ml": {"a": 1.7, "b": 2.3}, "px:f1:ml@fanduel": {"a": to_decimal(-110, "american"), "b": 2.4},
                      "px:f1:btts": {"o": 1.9, "u": 1.95}, "px:f1:btts@draftkings": {"u": 2.05, "o": 1.8},
                      "px:f1:total:2.5": {"o": 1.6}, "px:f1:total:2.5@fanduel": {"o": 1.65}}
    # restarted: the plain ids stay with their books, whichever book's odd comes first
    again = PushNormaliser("px")
    again.restore(book.markets.values(), n.last_entry_id)
    batch = feed(again, msg("odds", 5, odd("a", 1.8, sportsbook="FanDuel"), odd("o", 1.85, market="btts",
                                                                               sportsbook="DraftKings"),
                            odd("a", 1.75, sportsbook="DraftKings"), odd("a", 1.76, sportsbook="Bet 365"),
                            {**odd("o", 1.66, sportsbook="FanDuel"), **line}, {**odd("u", 2.2), **line}))
    assert [(u.market_id, u.image) for u in batch.updates] == [
        ("px:f1:ml@fanduel", False), ("px:f1:btts@draftkings", False), ("px:f1:ml", False),
        ("px:f1:ml@bet_365", True), ("px:f1:total:2.5@fanduel", False), ("px:f1:total:2.5", False)]


_T = 1718000010000
_LIVE = {"id": "f1", "sport": "soccer", "home": "A", "away": "B", "status": "live", "is_live": True}


def _settled_market() -> tuple[PushNormaliser, Book]:
    """``px:f1:ml`` priced at _T, then its fixture settled at _T + 5 s (the market CLOSED)."""
    n, book = PushNormaliser("px"), Book()
    _book_run(n, book, msg("odds", 1, odd("a", 1.5, fixture=_LIVE, timestamp=_T),
                           odd("b", 4.0, fixture=_LIVE, timestamp=_T), ms=_T))
    _book_run(n, book, msg("fixture-status", 2, ms=_T + 5000,
                           data={"id": "f1", "status": "settled", "is_live": False, "timestamp": _T + 5000}))
    m = book.markets["px:f1:ml"]
    assert (m.status, m.in_play) == ("CLOSED", False)
    return n, book


def test_a_stale_odd_changes_nothing_not_even_its_fixture() -> None:
    """An odd older than the one held was dropped (``stale_odd``) after its fixture fields had
    been applied: carrying ``status: live`` it reopened a settled market OPEN and in play at its
    old prices (found by the normaliser audit)."""
    n, book = _settled_market()
    batch = _book_run(n, book, msg("odds", 3, odd("a", 1.45, fixture=_LIVE, is_live=True, timestamp=_T - 1000),
                                   ms=_T + 6000))
    assert batch.updates == [] and n.dropped == {"stale_odd": 1}
    m = book.markets["px:f1:ml"]
    assert (m.status, m.in_play) == ("CLOSED", False)
    assert [(s.selection_id, s.price) for s in m.selections] == [("a", 1.5), ("b", 4.0)]
    assert n.fixtures["f1"].status == "settled" and n.markets["px:f1:ml"].header.status == "CLOSED"  # type: ignore[union-attr]


def test_fixture_fields_older_than_the_fixtures_never_reopen_a_settled_market() -> None:
    """An odd changed before the settlement but sent after it is news for its selection, not for
    its fixture: its price is taken, its ``status: live`` is not (``late_fixture_fields``); a
    ``fixture-status`` older than the settlement changes nothing either. A newer one applies."""
    n, book = _settled_market()
    batch = _book_run(n, book, msg("odds", 3, odd("a", 1.45, fixture=_LIVE, is_live=True, timestamp=_T + 2000),
                                   ms=_T + 6000))
    assert [(u.market_id, u.header) for u in batch.updates] == [("px:f1:ml", None)]  # a price, no new status
    assert n.dropped == {"late_fixture_fields": 1} and n.markets["px:f1:ml"].sels["a"].price == 1.45
    m = book.markets["px:f1:ml"]
    assert (m.status, m.in_play) == ("CLOSED", False)
    batch = feed(n, msg("fixture-status", 4, ms=_T + 7000,
                        data={"id": "f1", "status": "live", "is_live": True, "timestamp": _T + 3000}))
    assert (batch.updates, batch.event_states) == ([], [])
    assert n.dropped == {"late_fixture_fields": 2} and n.states["px:f1"].status == "CLOSED"
    batch = feed(n, msg("fixture-status", 5, ms=_T + 8000, data={"id": "f1", "status": "cancelled"}))
    assert [(u.header.status if u.header else None) for u in batch.updates] == ["CANCELLED"]
    assert [e.status for e in batch.event_states] == ["CANCELLED"]


def test_a_snapshots_fixture_fields_always_apply() -> None:
    """A snapshot is the current state: its fixture fields apply even when its odds carry
    their original (older) change times."""
    n, _ = _settled_market()
    feed(n, msg("fixture-status", 3, ms=_T + 6000, data={"id": "f1", "status": "live", "timestamp": _T + 6000}))
    assert n.markets["px:f1:ml"].header.status == "OPEN"  # type: ignore[union-attr]
    batch = feed(n, msg("snapshot", 4, odd("a", 1.5, fixture={**_LIVE, "status": "suspended"}, timestamp=_T),
                        ms=_T + 7000))
    assert [(u.image, u.header.status if u.header else None) for u in batch.updates] == [(True, "SUSPENDED")]


def test_market_ids_carry_the_line() -> None:
    assert market_id_of("f1", "total", 2.5) == "px:f1:total:2.5"
    assert market_id_of("f1", "spread", -1.0) == "px:f1:spread:-1"
    assert market_id_of("f1", "ml", None, prefix="op") == "op:f1:ml"
    assert market_id_of("f1", "total", 2.5, book="Bet 365") == "px:f1:total:2.5@bet_365"
    assert market_id_of("f1", "ml", None, book="Ébet ") == "px:f1:ml@bet"


def test_restore_from_stored_markets_continues_with_deltas() -> None:
    first, book = PushNormaliser("px"), Book()
    for raw in (msg("odds", 1, odd("a", 2.0), odd("b", 3.0)), msg("locked-odds", 2, odd("a", None)),
                msg("odds", 3, odd("o", 1.9, market="btts")),
                msg("fixture-status", 4, data={"id": "f1", "status": "postponed"})):
        for u in first.feed(raw, RECV_MS).updates:
            book.apply(u, RECV_MS)
    again = PushNormaliser("px")
    again.restore(book.markets.values(), first.last_entry_id)
    assert feed(again, msg("odds", 4, odd("b", 9.0), ms=1718000004000)).updates == []  # the cursor's entry
    batch = feed(again, msg("odds", 5, odd("b", 3.3)))
    (u,) = batch.updates
    assert not u.image and u.header is None  # a delta on what was stored, the market still postponed
    assert book.apply(u, RECV_MS) is not None
    assert [(s.selection_id, s.status, s.price) for s in book.markets["px:f1:ml"].selections] == [
        ("a", "SUSPENDED", 2.0), ("b", "ACTIVE", 3.3)]
    assert book.markets["px:f1:ml"].status == "SUSPENDED"


def test_ping_and_connected_are_heartbeats() -> None:
    n = PushNormaliser("px")
    b = feed(n, b'{"type":"ping","seq":3,"emitted_at":1718000000.5}')
    assert (b.heartbeat, b.provider_ts, b.cursor, b.updates) == (True, 1718000000500, None, [])
    b = feed(n, b'{"type":"connected","ping_interval_ms":400}')
    assert b.heartbeat and b.op == "connected"


def test_a_replay_time_map_shifts_source_ts_and_keeps_the_original() -> None:
    from feed.ingest import Ingest
    from feed.sources.base import Payload

    ingest = Ingest(None, source="px", normaliser=PushNormaliser("px"))  # type: ignore[arg-type]  # feed() needs no store
    ingest.time_map = lambda t: t + 5
    ingest.feed([Payload(RECV_MS, msg("odds", 1, odd("a", 2.0, timestamp=1718000000000)))])
    (u,) = ingest._pending
    assert (u.source_ts, u.source_ts_original) == (1718000000005, 1718000000000)


@pytest.mark.parametrize("start", ["2024-06-10T19:00:00Z", "2024-06-10T19:00:00", "2024-06-10T21:00:00+02:00",
                                   1718046000, 1718046000000])
def test_start_time_forms(start: Any) -> None:
    n = PushNormaliser("px")
    batch = feed(n, msg("odds", 1, odd(fixture={"id": "f1", "start_time": start})))
    assert batch.updates[0].header.start_time == 1718046000000  # type: ignore[union-attr]


# -- lines and restored fixture statuses (best-price audit) -------------------------------------


_AH_FIXTURE = {"id": "f1", "sport": "Soccer", "home": "Arsenal", "away": "Chelsea"}


def _ah(sel: str, name: str, price: float, market: dict[str, Any]) -> dict[str, Any]:
    return {"fixture": _AH_FIXTURE, "market": market, "selection": {"id": sel, "name": name}, "price": price,
            "sportsbook": "book1"}


def test_a_handicap_without_its_line_is_rejected_never_filed_on_the_level_ball_line() -> None:
    """``market.line`` was optional and every push selection has handicap 0, so an Asian handicap
    sent without its line ("Arsenal -1.5" at 3.30) was filed by the aggregate under
    ``handicap:line=0`` and served as the best level-ball price (found by the best-price audit,
    p3). A market of a lined type without its line is rejected alone (``missing_line``); with its
    line (the home side's) it is filed on that line."""
    from streaming.aggregate import group_markets

    n, book = PushNormaliser("px"), Book()
    bare = {"id": "asian_handicap", "name": "Asian Handicap"}
    raw = msg("odds", 1, _ah("ars", "Arsenal -1.5", 3.30, bare), _ah("che", "Chelsea +1.5", 1.33, bare),
              {**odd("home", 1.5, fixture=_AH_FIXTURE), "sportsbook": "book1"})
    batch = _book_run(n, book, raw)
    assert [(e.reason, e.market_id) for e in batch.rejected] == [("missing_line", "px:f1:asian_handicap")]
    assert batch.rejected[0].raw == raw and batch.cursor == n.last_entry_id
    assert [u.market_id for u in batch.updates] == ["px:f1:ml"]  # the message's other market applies
    assert "px:f1:asian_handicap" not in n.markets
    assert not any(k.startswith("handicap") for k in group_markets(book.markets.values()))
    lined = {**bare, "line": -1.5}  # the home side's line: Arsenal -1.5 / Chelsea +1.5
    batch = _book_run(n, book, msg("odds", 2, _ah("ars", "Arsenal -1.5", 3.30, lined),
                                   _ah("che", "Chelsea +1.5", 1.33, lined)))
    assert batch.rejected == [] and [u.market_id for u in batch.updates] == ["px:f1:asian_handicap:-1.5"]
    groups = group_markets(book.markets.values())
    assert [k for k in groups if k.startswith("handicap")] == ["handicap:line=-1.5"]
    ((_, sels),) = groups["handicap:line=-1.5"]
    assert {s.outcome: s.price for s in sels} == {"home": 3.30, "away": 1.33}


@pytest.mark.parametrize(("market_id", "accepted"), [
    ("asian_handicap", False), ("spread", False), ("spreads_h1", False), ("handicap", False),
    ("european_handicap", False), ("total", False), ("totals", False), ("over_under", False),
    ("team_total", False), ("player_points", False), ("alternate_totals", False),
    ("over_under_25", True), ("ml", True), ("1x2", True), ("btts", True), ("win", True), ("corners_special", True),
])
def test_markets_of_lined_types_need_their_line(market_id: str, accepted: bool) -> None:
    """Total, handicap, European handicap, team total and player props are quoted per line
    (``feed.taxonomy``): without ``market.line`` (and no line in the id, ``over_under_25``) the
    market is rejected alone; types without a line, and unknown (``raw:``) ones, need none."""
    n = PushNormaliser("px")
    batch = feed(n, msg("odds", 1, odd("o", 1.9, market=market_id)))
    if accepted:
        assert batch.rejected == [] and [u.market_id for u in batch.updates] == [f"px:f1:{market_id}"]
    else:
        assert [(e.reason, e.market_id) for e in batch.rejected] == [("missing_line", f"px:f1:{market_id}")]
        assert batch.updates == [] and n.markets == {}
        batch = feed(n, msg("odds", 2, {**odd("o", 1.9, market=market_id),
                                        "market": {"id": market_id, "line": 2.5}}))
        assert batch.rejected == [] and [u.market_id for u in batch.updates] == [f"px:f1:{market_id}:2.5"]
        assert batch.updates[0].header.specifiers["line"] == "2.5"


def test_restore_never_settles_a_fixture_from_a_market_closed_by_its_own_results() -> None:
    """``restore`` set a fixture ``settled`` when any of its markets was closed — even one closed
    because all its selections carry results — so after a restart the fixture's open markets
    turned CLOSED with their next update (a price check: MARKET_CLOSED for an open market; found
    by the best-price audit). Only a market that a fixture status made what it is tells that."""
    first, book = PushNormaliser("px"), Book()
    for raw in (msg("odds", 1, odd("a", 2.0), odd("b", 3.0), odd("y", 1.8, market="btts")),
                msg("odds", 2, odd("a", None, status="won"), odd("b", None, status="lost"))):
        for u in first.feed(raw, RECV_MS).updates:
            book.apply(u, RECV_MS)
    assert (book.markets["px:f1:ml"].status, book.markets["px:f1:btts"].status) == ("SETTLED", "OPEN")
    stored = list(book.markets.values())
    for order in (stored, stored[::-1]):
        again = PushNormaliser("px")
        again.restore(order, first.last_entry_id)
        assert again.fixtures["f1"].status is None
        batch = feed(again, msg("odds", 3, odd("y", 1.7, market="btts")))
        (u,) = batch.updates
        assert u.header is None and [(s.selection_id, s.price) for s in u.selections] == [("y", 1.7)]
        assert again.markets["px:f1:btts"].header.status == "OPEN"  # type: ignore[union-attr]


def test_restore_keeps_a_fixture_settlement_that_a_market_shows() -> None:
    """A market closed while a selection of it is still unresulted was closed by its fixture's
    settlement: the restored fixture stays settled (a later odd does not reopen it)."""
    first, book = PushNormaliser("px"), Book()
    for raw in (msg("odds", 1, odd("a", 2.0), odd("b", 3.0), odd("y", 1.8, market="btts")),
                msg("odds", 2, odd("a", None, status="won"), odd("b", None, status="lost")),
                msg("fixture-status", 3, data={"id": "f1", "status": "settled"})):
        for u in first.feed(raw, RECV_MS).updates:
            book.apply(u, RECV_MS)
    assert (book.markets["px:f1:ml"].status, book.markets["px:f1:btts"].status) == ("SETTLED", "CLOSED")
    again = PushNormaliser("px")
    again.restore(book.markets.values(), first.last_entry_id)
    assert again.fixtures["f1"].status == "settled"
    batch = feed(again, msg("odds", 4, odd("y", 1.7, market="btts")))
    assert [u.header for u in batch.updates] == [None]
    assert again.markets["px:f1:btts"].header.status == "CLOSED"  # type: ignore[union-attr]


# -- scores move the fixture's in-play flag ---------------------------------------------------------

_PRE = {"id": "f1", "sport": "soccer", "home": "A", "away": "B", "status": "not_started", "is_live": False}


def _scores(n: int, ms: int, *, ts: int | None = None, **item: Any) -> bytes:
    """A ``scores`` message sent at ``ms`` with one item of f1 (its ``timestamp``: ``ts``, default ``ms``)."""
    return msg("scores", n, ms=ms, data=[{"fixture_id": "f1", "timestamp": ms if ts is None else ts, **item}])


def _pre_match() -> tuple[PushNormaliser, Book]:
    """``px:f1:ml`` and ``px:f1:btts`` priced pre-match at _T."""
    n, book = PushNormaliser("px"), Book()
    _book_run(n, book, msg("odds", 1, odd("a", 2.0, fixture=_PRE, timestamp=_T),
                           odd("o", 1.9, market="btts", fixture=_PRE, timestamp=_T), ms=_T))
    assert [m.in_play for m in book.markets.values()] == [False, False]
    return n, book


def test_a_scores_item_takes_every_market_of_its_fixture_in_play() -> None:
    """A fixture taken live by a ``scores`` message (``status: live``, ``is_live: true``) got a LIVE
    event state while its markets stayed ``in_play: false`` (only odds and ``fixture-status`` moved
    them), so in-play staleness limits did not apply to them (found by the in-play audit). The
    item's in-play signal moves the fixture as a ``fixture-status`` does: every market follows."""
    n, book = _pre_match()
    batch = _book_run(n, book, _scores(2, _T + 1000, status="live", is_live=True, period="1h",
                                       clock={"seconds": 1}, score={"home": 0, "away": 0}))
    assert [(e.status, e.in_play) for e in batch.event_states] == [("LIVE", True)]
    assert [(u.market_id, u.image, u.header is not None and (u.header.status, u.header.in_play), u.selections,
             u.source_ts) for u in batch.updates] == [
        ("px:f1:ml", False, ("OPEN", True), [], _T + 1000), ("px:f1:btts", False, ("OPEN", True), [], _T + 1000)]
    assert [m.in_play for m in book.markets.values()] == [True, True]
    # a score alone says nothing of in-play; later odds without is_live keep it
    batch = feed(n, _scores(3, _T + 2000, score={"home": 1, "away": 0}))
    assert batch.updates == [] and len(batch.event_states) == 1
    batch = _book_run(n, book, msg("odds", 4, odd("a", 2.1, fixture={"id": "f1"}, timestamp=_T + 3000), ms=_T + 3000))
    assert [u.header for u in batch.updates] == [None] and book.markets["px:f1:ml"].in_play is True
    # a status without is_live moves it as a fixture's does: live / not_started only
    assert feed(n, _scores(5, _T + 4000, status="ended")).updates == []
    batch = _book_run(n, book, _scores(6, _T + 5000, is_live=False))
    assert [(u.market_id, u.header.in_play) for u in batch.updates] == [  # type: ignore[union-attr]
        ("px:f1:ml", False), ("px:f1:btts", False)]
    batch = _book_run(n, book, _scores(7, _T + 6000, status="live"))
    assert [u.header.in_play for u in batch.updates] == [True, True]  # type: ignore[union-attr]
    assert [m.in_play for m in book.markets.values()] == [True, True]
    # an item rejected alone (a negative score) moves nothing
    batch = feed(n, _scores(8, _T + 7000, is_live=False, score={"home": -1, "away": 0}))
    assert [e.reason for e in batch.rejected] == ["invalid_number"] and batch.updates == []
    assert n.fixtures["f1"].in_play is True


def test_a_scores_item_never_moves_the_in_play_flag_back() -> None:
    """Time-ordered like a fixture's fields: a ``scores`` item older than the in-play flag held is
    ignored (``late_fixture_fields``), and an odd older than the item keeps its price and its other
    fixture fields but not its in-play flag; a settled fixture is not reopened in play."""
    n, book = _pre_match()
    # a pre-match odd changed at _T + 2 s, then a scores item of _T + 1 s saying live: older
    _book_run(n, book, msg("odds", 2, odd("a", 2.05, fixture=_PRE, timestamp=_T + 2000), ms=_T + 2000))
    batch = feed(n, _scores(3, _T + 3000, ts=_T + 1000, status="live", is_live=True))
    assert batch.updates == [] and n.dropped == {"late_fixture_fields": 1}
    assert [e.status for e in batch.event_states] == ["LIVE"]  # (the event state has no newer one)
    # a newer one takes it live; an odd older than it is a price (and names), never pre-match again
    batch = _book_run(n, book, _scores(4, _T + 5000, status="live", is_live=True))
    assert [u.header.in_play for u in batch.updates] == [True, True]  # type: ignore[union-attr]
    batch = _book_run(n, book, msg("odds", 5, odd("a", 2.2, fixture={**_PRE, "league": "L1"}, is_live=False,
                                                  timestamp=_T + 4000), ms=_T + 6000))
    assert n.dropped == {"late_fixture_fields": 2}
    m = book.markets["px:f1:ml"]
    assert (m.in_play, m.competition, m.selection("a").price) == (True, "L1", 2.2)  # type: ignore[union-attr]
    assert book.markets["px:f1:btts"].in_play is True
    # a newer odd's flag applies
    batch = _book_run(n, book, msg("odds", 6, odd("a", 2.3, is_live=False, timestamp=_T + 7000), ms=_T + 7000))
    assert [u.header is not None and u.header.in_play for u in batch.updates] == [False, False]
    # settled at _T + 5 s: a live scores item of _T + 3 s changes nothing
    n, book = _settled_market()
    batch = _book_run(n, book, _scores(3, _T + 6000, ts=_T + 3000, status="live", is_live=True))
    assert (batch.updates, batch.event_states) == ([], [])
    assert (book.markets["px:f1:ml"].status, book.markets["px:f1:ml"].in_play) == ("CLOSED", False)


def test_scores_before_the_odds_in_a_snapshot_and_after_a_restart() -> None:
    """A fixture a ``scores`` item took live before any market of it: its first odds are in play;
    a snapshot's ``scores`` apply like its odds' fixture fields; a restarted normaliser orders
    items by its stored markets' times."""
    n = PushNormaliser("px")
    assert feed(n, _scores(1, 1718000001000, status="live")).updates == []
    batch = feed(n, msg("odds", 2, odd("a", 2.0)))
    assert [(u.image, u.header.in_play) for u in batch.updates] == [(True, True)]  # type: ignore[union-attr]
    n = PushNormaliser("px")
    snap = feed(n, msg("snapshot", 1, odd("a", 2.0), scores=[{"fixture_id": "f1", "is_live": True}]))
    assert [e.in_play for e in snap.event_states] == [True]
    assert n.markets["px:f1:ml"].header.in_play is True  # type: ignore[union-attr]
    book = Book()
    for u in snap.updates:
        book.apply(u, RECV_MS)
    assert book.markets["px:f1:ml"].in_play is True
    again = PushNormaliser("px")
    again.restore(book.markets.values(), n.last_entry_id)
    stored_ts = book.markets["px:f1:ml"].source_ts
    assert feed(again, _scores(2, stored_ts + 5, ts=stored_ts - 1, is_live=False)).updates == []
    assert again.dropped == {"late_fixture_fields": 1}
    batch = feed(again, _scores(3, stored_ts + 6, ts=stored_ts + 1, is_live=False))
    assert [u.header.in_play for u in batch.updates] == [False]  # type: ignore[union-attr]
