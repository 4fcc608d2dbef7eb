"""TheOddsApiNormaliser on hand-written v4 odds bodies (tests/fixtures/theoddsapi).

Expected updates and final markets were written by hand from the provider
docs (``*.expected.json``). Updates go through the same Book as the ingest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from feed.book import Book
from feed.errors import FeedDecodeError
from feed.normalise.theoddsapi import TheOddsApiNormaliser, sport_of
from tests.test_normalise_pinnacle import check_market, check_updates

FIXTURES = Path(__file__).parent / "fixtures" / "theoddsapi"


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def run_scenario(name: str) -> tuple[TheOddsApiNormaliser, Book, dict[str, Any]]:
    expected = json.loads((FIXTURES / name).read_text())
    n = TheOddsApiNormaliser(expected["source"])
    book = Book()
    for step in expected["steps"]:
        n.expect(expected["sport_key"])
        before = dict(n.dropped)
        batch = n.feed(load(step["body"]), step["recv_ms"])
        check_updates(batch.updates, step["updates"])
        for reason, count in step.get("dropped", {}).items():
            assert n.dropped[reason] - before.get(reason, 0) == count
        for u in batch.updates:
            assert book.apply(u, stored_at=step["recv_ms"]) is not None, u.market_id
    return n, book, expected


def test_golden_epl_snapshots() -> None:
    _, book, expected = run_scenario("epl.expected.json")
    assert set(book.markets) == set(expected["final"])
    for mid, want in expected["final"].items():
        check_market(book.markets[mid], want)


def test_golden_american_and_unix_dates() -> None:
    expected = json.loads((FIXTURES / "american_odds.expected.json").read_text())
    n = TheOddsApiNormaliser(odds_format="american")
    batch = n.feed(load("american_odds.json"), 1755349200000)
    book = Book()
    for u in batch.updates:
        book.apply(u)
    want = {k: v for k, v in expected.items() if k != "_comment"}
    assert set(book.markets) == set(want)
    for mid, w in want.items():
        check_market(book.markets[mid], w)


def test_scope_limits_what_vanishes() -> None:
    n = TheOddsApiNormaliser()
    n.expect("soccer_epl")
    n.feed(load("01_snapshot.json"), 1755349200000)
    n.expect("basketball_nba")  # another sport's empty answer does not touch EPL markets
    assert n.feed(b"[]", 1755349201000).updates == []
    n.expect("soccer_epl")  # the EPL's empty answer suspends every EPL market
    batch = n.feed(b"[]", 1755349202000)
    assert len(batch.updates) == 5
    assert all(u.header is not None and u.header.status == "SUSPENDED" for u in batch.updates)
    assert n.differ.emitted == {}  # forgotten: a return is a fresh image
    n.expect("soccer_epl")
    assert all(u.image for u in n.feed(load("01_snapshot.json"), 1755349203000).updates)


def test_in_play_follows_commence_time() -> None:
    n = TheOddsApiNormaliser()
    n.expect("soccer_epl")
    first = {u.market_id: u for u in n.feed(load("01_snapshot.json"), 1755349200000).updates}
    assert first["toa:a1b2c3d4e5f60718293a4b5c6d7e8f90:pinnacle:h2h"].header.in_play  # type: ignore[union-attr]
    assert not first["toa:e912304de2b2ede8b6a1f3b4c5d6e7f8:pinnacle:h2h"].header.in_play  # type: ignore[union-attr]
    assert n.live_events["soccer_epl"] == {"a1b2c3d4e5f60718293a4b5c6d7e8f90"}
    n.expect("soccer_epl")
    later = {u.market_id: u for u in n.feed(load("01_snapshot.json"), 1755352800000).updates}  # kick-off
    assert later["toa:e912304de2b2ede8b6a1f3b4c5d6e7f8:pinnacle:h2h"].header.in_play  # type: ignore[union-attr]


def test_restore_suspends_markets_gone_while_down() -> None:
    _, book, _ = run_scenario("epl.expected.json")
    n2 = TheOddsApiNormaliser()
    n2.restore(book.markets.values())
    assert set(n2.differ.emitted) == {"toa:e912304de2b2ede8b6a1f3b4c5d6e7f8:pinnacle:h2h",
                                      "toa:e912304de2b2ede8b6a1f3b4c5d6e7f8:williamhill:h2h"}
    n2.expect("soccer_epl")
    body = json.loads(load("04_snapshot.json"))
    body[0]["bookmakers"] = body[0]["bookmakers"][:1]
    body[0]["bookmakers"][0]["markets"][0]["last_update"] = "2025-08-16T13:05:00Z"
    batch = n2.feed(json.dumps(body).encode(), 1755349500000)
    by_id = {u.market_id: u for u in batch.updates}
    assert by_id["toa:e912304de2b2ede8b6a1f3b4c5d6e7f8:williamhill:h2h"].header.status == "SUSPENDED"  # type: ignore[union-attr]
    assert [s.selection_id for s in by_id["toa:e912304de2b2ede8b6a1f3b4c5d6e7f8:pinnacle:h2h"].selections] == ["home"]
    for u in batch.updates:
        assert book.apply(u) is not None


def _with_price(price: Any) -> bytes:
    body = json.loads(load("01_snapshot.json"))
    body[0]["bookmakers"][0]["markets"][0]["outcomes"][0]["price"] = price
    return json.dumps(body, allow_nan=True).encode()


@pytest.mark.parametrize(("body", "reason"), [
    (_with_price(1.0), "invalid_price"),
    (_with_price(0), "invalid_price"),
    (_with_price(-3.5), "invalid_price"),
    (_with_price(2000), "invalid_price"),
    (_with_price("2.10"), "invalid_price"),
    (_with_price(None), "invalid_price"),
    (_with_price(float("inf")), "invalid_json"),
    (b'[{"id": "x", "sport_key": "soccer_epl", "bookmakers": [', "invalid_json"),
    (b'{"message": "not an array"}', "invalid_schema"),
    (b'[{"id": "bad id with spaces", "sport_key": "soccer_epl"}]', "invalid_schema"),
    (b'[{"id": "e1", "sport_key": "basketball_nba"}]', "invalid_schema"),  # not the sport asked for
    ((b'[{"id": "e1", "sport_key": "soccer_epl", "home_team": "A", "away_team": "B", "bookmakers": [{"key": "b",'
      b' "markets": [{"key": "h2h", "outcomes": [{"name": "A", "price": 2}, {"name": "A", "price": 3}]}]}]}]'),
     "invalid_schema"),
])
def test_bad_bodies_are_rejected_whole(body: bytes, reason: str) -> None:
    n = TheOddsApiNormaliser()
    n.expect("soccer_epl")
    n.feed(load("01_snapshot.json"), 1755349200000)
    before = {k: (v.header, dict(v.selections)) for k, v in n.differ.emitted.items()}
    n.expect("soccer_epl")
    with pytest.raises(FeedDecodeError) as info:
        n.feed(body, 1755349260000)
    assert info.value.reason == reason
    assert {k: (v.header, dict(v.selections)) for k, v in n.differ.emitted.items()} == before
    n.expect("soccer_epl")
    assert len(n.feed(load("02_snapshot.json"), 1755349260000).updates) == 3


def test_sport_of() -> None:
    assert sport_of("soccer_epl") == "soccer"
    assert sport_of("americanfootball_nfl") == "american_football"
    assert sport_of("basketball_nba") == "basketball"
    assert sport_of("icehockey_nhl") == "ice_hockey"
