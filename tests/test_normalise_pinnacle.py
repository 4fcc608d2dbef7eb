"""PinnacleNormaliser on hand-written Lines API bodies (tests/fixtures/pinnacle).

The golden scenario's expected updates and final markets were written by
hand from the provider docs (``*.expected.json``), never by saving our own
output. Updates go through the same Book as the ingest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from feed.book import Book
from feed.errors import FeedDecodeError
from feed.models import Market, Selection
from feed.normalise.base import MarketUpdate
from feed.normalise.pinnacle import PinnacleNormaliser, market_id_parts
from feed.normalise.pinnacle import channel as pinnacle_channel

FIXTURES = Path(__file__).parent / "fixtures" / "pinnacle"


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def check_selections(got: list[Selection], want: list[dict[str, Any]]) -> None:
    assert [s.selection_id for s in got] == [w["selection_id"] for w in want]
    for s, w in zip(got, want, strict=True):
        for key, value in w.items():
            assert getattr(s, key) == value, (s.selection_id, key)


def check_market(m: Market, want: dict[str, Any]) -> None:
    for key, value in want.items():
        if key == "selections":
            check_selections(m.selections, value)
        else:
            assert getattr(m, key) == value, (m.market_id, key)


def check_updates(got: list[MarketUpdate], want: list[dict[str, Any]]) -> None:
    assert sorted(u.market_id for u in got) == sorted(w["market_id"] for w in want)
    by_id = {u.market_id: u for u in got}
    for w in want:
        u = by_id[w["market_id"]]
        assert u.image == w["image"], w["market_id"]
        if u.image:
            continue
        assert (u.header is not None) == w["header"], w["market_id"]
        assert [s.selection_id for s in u.selections] == w["selections"], w["market_id"]
        if "status" in w:
            assert u.header is not None and u.header.status == w["status"], w["market_id"]
        if "suspend_reason" in w:
            assert u.header is not None and u.header.suspend_reason == w["suspend_reason"], w["market_id"]
        if "source_ts" in w:
            assert u.source_ts == w["source_ts"], w["market_id"]


def run_scenario(name: str) -> tuple[PinnacleNormaliser, Book, dict[str, Any]]:
    expected = json.loads((FIXTURES / name).read_text())
    n = PinnacleNormaliser(expected["source"], odds_format=expected["odds_format"])
    book = Book()
    for step in expected["steps"]:
        batch = n.feed(load(step["body"]), step["recv_ms"], pinnacle_channel(step["endpoint"], None, snapshot=step["snapshot"]))
        check_updates(batch.updates, step["updates"])
        assert json.loads(n.cursor()) == step["cursor"], step["body"]
        for u in batch.updates:
            book.apply(u, stored_at=step["recv_ms"])
    return n, book, expected


def test_golden_soccer_match() -> None:
    n, book, expected = run_scenario("soccer_match.expected.json")
    assert set(book.markets) == set(expected["final"])
    for mid, want in expected["final"].items():
        check_market(book.markets[mid], want)
    assert n.dropped["stale_response"] == 1


def test_golden_american_prices_are_converted_to_decimal() -> None:
    expected = json.loads((FIXTURES / "american_odds.expected.json").read_text())
    n = PinnacleNormaliser(odds_format="american")
    n.feed(load("american_fixtures.json"), 1755349200000, pinnacle_channel("fixtures", None, snapshot=True))
    batch = n.feed(load("american_odds.json"), 1755349200000, pinnacle_channel("odds", None, snapshot=True))
    book = Book()
    for u in batch.updates:
        book.apply(u)
    assert set(book.markets) == set(expected) - {"_comment"}
    for mid, want in expected.items():
        if mid != "_comment":
            check_market(book.markets[mid], want)


def test_without_a_hint_the_endpoint_is_recognised_and_taken_as_delta() -> None:
    n = PinnacleNormaliser()
    n.feed(load("01_fixtures_snapshot.json"), 1755349190000)
    batch = n.feed(load("02_odds_snapshot.json"), 1755349200000)
    assert batch.op == "odds" and len(batch.updates) == 6
    assert n.since("odds", 29) == 2000 and n.since("fixtures", 29) == 1000
    # a body with neither list says nothing
    assert n.feed(b'{"sportId": 29, "last": 9999}', 1755349200001).updates == []


def test_odds_before_their_fixture_are_rendered_when_it_arrives() -> None:
    n = PinnacleNormaliser()
    assert n.feed(load("02_odds_snapshot.json"), 1755349200000, pinnacle_channel("odds", None, snapshot=True)).updates == []
    assert n.missing_fixtures == {1590000001, 1590000002}
    batch = n.feed(load("01_fixtures_snapshot.json"), 1755349200500, pinnacle_channel("fixtures", None, snapshot=True))
    assert len(batch.updates) == 6 and all(u.image for u in batch.updates)
    assert n.missing_fixtures == set()


def test_a_snapshot_suspends_what_it_no_longer_lists() -> None:
    n = PinnacleNormaliser()
    n.feed(load("01_fixtures_snapshot.json"), 1755349190000, pinnacle_channel("fixtures", None, snapshot=True))
    n.feed(load("02_odds_snapshot.json"), 1755349200000, pinnacle_channel("odds", None, snapshot=True))
    body = json.loads(load("02_odds_snapshot.json"))
    body["last"] = 3000
    body["leagues"][0]["events"] = body["leagues"][0]["events"][1:]  # only the corners event is left
    batch = n.feed(json.dumps(body).encode(), 1755349300000, pinnacle_channel("odds", None, snapshot=True))
    suspended = sorted(u.market_id for u in batch.updates)
    assert suspended == ["pn:1590000001:0:moneyline", "pn:1590000001:0:spread:-0.25", "pn:1590000001:0:spread:-0.5",
                         "pn:1590000001:0:total:2.5", "pn:1590000001:1:moneyline"]
    assert all(u.header is not None and u.header.status == "SUSPENDED" and u.header.suspend_reason == "not_offered"
               for u in batch.updates)


def test_an_online_period_past_its_cutoff_is_suspended() -> None:
    n = PinnacleNormaliser()
    n.feed(load("01_fixtures_snapshot.json"), 1755349190000, pinnacle_channel("fixtures", None, snapshot=True))
    batch = n.feed(load("02_odds_snapshot.json"), 1755352800000, pinnacle_channel("odds", None, snapshot=True))  # received exactly at the cutoff
    assert {u.header.status for u in batch.updates if u.header} == {"SUSPENDED"}
    assert {u.header.suspend_reason for u in batch.updates if u.header} == {"past_cutoff"}


def test_restore_resumes_the_cursor_and_suspends_vanished_lines() -> None:
    n, book, _ = run_scenario("soccer_match.expected.json")
    n2 = PinnacleNormaliser()
    n2.restore(book.markets.values(), n.cursor())
    assert n2.since("odds", 29) == 2300
    # after the restart: fixtures snapshot, then a delta for the 1st-half period without its moneyline
    fx = json.loads(load("01_fixtures_snapshot.json"))
    fx["league"][0]["events"].append(json.loads(load("05_fixtures_delta_live.json"))["league"][0]["events"][0])
    fx["last"] = 1200
    assert n2.feed(json.dumps(fx).encode(), 1755353500000, pinnacle_channel("fixtures", None, snapshot=True)).updates == []  # names unchanged: nothing to say
    delta = {"sportId": 29, "last": 2400, "leagues": [{"id": 1980, "events": [{"id": 1590000099, "periods": [
        {"lineId": 2711111300, "number": 1, "cutoff": "2025-08-16T15:55:00Z", "status": 1,
         "moneylineUpdatedAt": "2025-08-16T14:11:00Z", "totals": [{"points": 0.5, "over": 1.5, "under": 2.5}]}]}]}]}
    batch = n2.feed(json.dumps(delta).encode(), 1755353500000, pinnacle_channel("odds", None, snapshot=False))
    by_id = {u.market_id: u for u in batch.updates}
    assert by_id["pn:1590000001:1:moneyline"].header.suspend_reason == "not_offered"  # type: ignore[union-attr]
    assert by_id["pn:1590000001:1:total:0.5"].image
    for u in batch.updates:
        assert book.apply(u) is not None
    assert json.loads(n2.cursor())["odds"] == {"29": 2400}


def test_a_period_older_than_the_one_held_is_ignored() -> None:
    n = PinnacleNormaliser()
    n.feed(load("01_fixtures_snapshot.json"), 1755349190000, pinnacle_channel("fixtures", None, snapshot=True))
    n.feed(load("03_odds_delta.json"), 1755349500000, pinnacle_channel("odds", None, snapshot=True))
    old = json.loads(load("02_odds_snapshot.json"))
    old["last"] = 2500  # a newer cursor carrying an older period (13:04:59 → 12:59:58)
    batch = n.feed(json.dumps(old).encode(), 1755349600000, pinnacle_channel("odds", None, snapshot=False))
    assert "pn:1590000001:0:moneyline" not in {u.market_id for u in batch.updates}
    assert n.dropped["stale_period"] == 1


def _snapshot_with(**moneyline: Any) -> bytes:
    body = json.loads(load("02_odds_snapshot.json"))
    body["leagues"][0]["events"][0]["periods"][0]["moneyline"].update(moneyline)
    return json.dumps(body, allow_nan=True).encode()


def _snapshot_with_period(**fields: Any) -> bytes:
    body = json.loads(load("02_odds_snapshot.json"))
    body["leagues"][0]["events"][0]["periods"][0].update(fields)
    return json.dumps(body).encode()


def _snapshot_with_spread(**fields: Any) -> bytes:
    body = json.loads(load("02_odds_snapshot.json"))
    body["leagues"][0]["events"][0]["periods"][0]["spreads"][1].update(fields)
    return json.dumps(body).encode()


def _fixture_snapshot_with(**fields: Any) -> bytes:
    body = json.loads(load("01_fixtures_snapshot.json"))
    body["league"][0]["events"][0].update(fields)
    return json.dumps(body).encode()


@pytest.mark.parametrize(("body", "reason"), [
    (_snapshot_with(home=float("nan")), "invalid_json"),  # NaN is not JSON
    (b'{"sportId": 29, "last": 2000, "leagues": [{"id": 1980, "events": [', "invalid_json"),
    (b"\xff\xfe not json", "invalid_json"),
    (b'{"sportId": "soccer", "last": 1}', "invalid_schema"),
    (b'{"sportId": 29, "last": 100000000000000000000000000000}', "invalid_schema"),
    (b'{"sportId": 29, "last": 2000, "leagues": {"id": 1}}', "invalid_schema"),
    (b'[1, 2, 3]', "invalid_schema"),
])
def test_bad_bodies_are_rejected_whole(body: bytes, reason: str) -> None:
    n = PinnacleNormaliser()
    n.feed(load("01_fixtures_snapshot.json"), 1755349190000, pinnacle_channel("fixtures", None, snapshot=True))
    before = n.cursor()
    with pytest.raises(FeedDecodeError) as info:
        n.feed(body, 1755349200000, pinnacle_channel("odds", None, snapshot=True))
    assert info.value.reason == reason
    assert info.value.raw == body
    assert n.cursor() == before
    assert n.differ.emitted == {}
    # the next good body goes through
    assert len(n.feed(load("02_odds_snapshot.json"), 1755349200000, pinnacle_channel("odds", None, snapshot=True)).updates) == 6


_EVENT_1_MARKETS = ["pn:1590000001:0:moneyline", "pn:1590000001:0:spread:-0.25", "pn:1590000001:0:spread:-0.5",
                    "pn:1590000001:0:total:2.5", "pn:1590000001:1:moneyline"]
_CORNERS = "pn:1590000001:0:corners:total:9.5"  # event 1590000002 (the corners event of the same match)

BAD_EVENTS = [
    ("price 0.95", _snapshot_with(home=0.95), "invalid_price"),
    ("price 1.0", _snapshot_with(home=1.0), "invalid_price"),
    ("price 1.001", _snapshot_with(home=1.001), "invalid_price"),
    ("price 1.0099", _snapshot_with(home=1.0099), "invalid_price"),
    ("price 1000.01", _snapshot_with(home=1000.01), "invalid_price"),
    ("price 1500", _snapshot_with(home=1500), "invalid_price"),
    ("price text", _snapshot_with(home="2.10"), "invalid_price"),
    ("price bool", _snapshot_with(home=True), "invalid_price"),
    ("negative max stake", _snapshot_with_spread(max=-300), "invalid_size"),
    ("max stake 1e308", _snapshot_with_spread(max=1e308), "invalid_size"),
    ("negative maxMoneyline", _snapshot_with_period(maxMoneyline=-1), "invalid_size"),
    ("hdp 1e6", _snapshot_with_spread(hdp=1e6), "invalid_number"),
    ("lineId 2**53", _snapshot_with_period(lineId=2**53), "invalid_schema"),
    ("cutoff year 9999", _snapshot_with_period(cutoff="9999-01-01T00:00:00Z"), "invalid_time"),
    ("updated an hour ahead", _snapshot_with_period(moneylineUpdatedAt="2025-08-16T14:00:00Z"), "clock_skew"),
    ("updated in 2200", _snapshot_with_period(spreadUpdatedAt="2200-01-01T00:00:00Z"), "invalid_time"),
]


@pytest.mark.parametrize(("body", "reason"), [(b, r) for _, b, r in BAD_EVENTS], ids=[n for n, _, _ in BAD_EVENTS])
def test_a_bad_event_is_rejected_alone(body: bytes, reason: str) -> None:
    """Issue 8: one bad event of a body is rejected alone; the body's other
    events apply and the cursor advances; every update passes feed.validate."""
    from feed.validate import validate_update

    n = PinnacleNormaliser()
    n.feed(load("01_fixtures_snapshot.json"), 1755349190000, pinnacle_channel("fixtures", None, snapshot=True))
    batch = n.feed(body, 1755349200000, pinnacle_channel("odds", None, snapshot=True))
    assert [u.market_id for u in batch.updates] == [_CORNERS]
    assert {e.reason for e in batch.rejected} == {reason}, [str(e) for e in batch.rejected]
    assert [e.market_id for e in batch.rejected] == [None]  # event 1590000001 had no market yet
    assert all(e.raw == body for e in batch.rejected)
    assert json.loads(n.cursor())["odds"] == {"29": 2000}
    for u in batch.updates:
        validate_update(u, 1755349200000)


def test_a_bad_event_in_a_later_snapshot_keeps_its_markets_and_names_them() -> None:
    """A market of a rejected event is not suspended (``not_offered``);
    every known market of the event is named in ``batch.rejected``; the
    provider state keeps its last good odds, and the differ forgets the
    markets, so the poller's next (snapshot) poll re-images them whole."""
    n = PinnacleNormaliser()
    n.feed(load("01_fixtures_snapshot.json"), 1755349190000, pinnacle_channel("fixtures", None, snapshot=True))
    n.feed(load("02_odds_snapshot.json"), 1755349200000, pinnacle_channel("odds", None, snapshot=True))
    assert all(m in n.differ.emitted for m in _EVENT_1_MARKETS)
    batch = n.feed(_snapshot_with(home=1.0099), 1755349210000, pinnacle_channel("odds", None, snapshot=True))
    assert sorted(e.market_id for e in batch.rejected) == sorted(_EVENT_1_MARKETS)  # (corners: another event)
    assert {e.reason for e in batch.rejected} == {"invalid_price"}
    assert batch.updates == []  # nothing suspended, nothing else changed
    assert not any(m in n.differ.emitted for m in _EVENT_1_MARKETS)
    assert n.odds[1590000001][0].ml["home"][0] == 2.10  # type: ignore[index]
    again = n.feed(load("02_odds_snapshot.json"), 1755349220000, pinnacle_channel("odds", None, snapshot=True))
    assert sorted(u.market_id for u in again.updates if u.image) == sorted(_EVENT_1_MARKETS)


def test_a_bad_fixture_is_rejected_alone() -> None:
    n = PinnacleNormaliser()
    batch = n.feed(_fixture_snapshot_with(starts=1e308), 1755349190000, pinnacle_channel("fixtures", None, snapshot=True))
    assert [e.reason for e in batch.rejected] == ["invalid_schema"]  # starts must be text
    n2 = PinnacleNormaliser()
    batch = n2.feed(_fixture_snapshot_with(starts="1960-01-01T00:00:00Z"), 1755349190000, pinnacle_channel("fixtures", None, snapshot=True))
    assert [e.reason for e in batch.rejected] == ["invalid_time"]
    assert sorted(n2.fixtures) == [1590000002]


def test_american_price_out_of_range_is_invalid_price() -> None:
    n = PinnacleNormaliser(odds_format="american")
    body = json.loads(load("american_odds.json"))
    body["leagues"][0]["events"][0]["periods"][0]["moneyline"]["home"] = 50
    batch = n.feed(json.dumps(body).encode(), 1)
    (e,) = batch.rejected
    assert e.reason == "invalid_price" and "moneyline.home" in e.detail


@pytest.mark.parametrize("american", [-10001, -20000, -1e9])
def test_american_price_below_1_01_is_invalid_price(american: float) -> None:
    n = PinnacleNormaliser(odds_format="american")
    body = json.loads(load("american_odds.json"))
    body["leagues"][0]["events"][0]["periods"][0]["moneyline"]["home"] = american
    (e,) = n.feed(json.dumps(body).encode(), 1).rejected
    assert e.reason == "invalid_price", str(e)


def test_names_are_cleaned() -> None:
    n = PinnacleNormaliser()
    fx = json.loads(load("01_fixtures_snapshot.json"))
    fx["league"][0]["events"][0]["home"] = "Arse\u202enal\u0000 " + "x" * 500
    n.feed(json.dumps(fx).encode(), 1, pinnacle_channel("fixtures", None, snapshot=True))
    assert n.fixtures[1590000001].home == ("Arsenal " + "x" * 500)[:200]


def test_market_id_parts() -> None:
    assert market_id_parts("pn:1590000001:0:moneyline") == (1590000001, "", 0, "moneyline", None)
    assert market_id_parts("pn:1590000001:0:corners:total:9.5") == (1590000001, "corners", 0, "total", "9.5")
    assert market_id_parts("pn:1:2:spread:-0.25") == (1, "", 2, "spread", "-0.25")
    assert market_id_parts("bf:1.23") is None
    assert market_id_parts("pn:x:0:moneyline") is None


def test_updates_round_trip_through_msgspec() -> None:
    _, book, _ = run_scenario("soccer_match.expected.json")
    for m in book.markets.values():
        assert msgspec.json.decode(msgspec.json.encode(m), type=Market) == m


def test_a_body_of_the_wrong_endpoint_or_sport_is_rejected() -> None:
    n = PinnacleNormaliser()
    with pytest.raises(FeedDecodeError) as info:
        n.feed(load("02_odds_snapshot.json"), 1, pinnacle_channel("fixtures", 29, snapshot=False))  # an odds body answering a fixtures call
    assert info.value.reason == "invalid_schema"
    with pytest.raises(FeedDecodeError) as info:
        n.feed(load("02_odds_snapshot.json"), 1, pinnacle_channel("odds", 4, snapshot=True))  # soccer odds answering a basketball call
    assert info.value.reason == "invalid_schema"
    assert n.cursor() == '{"fixtures":{},"odds":{}}'  # no cursor moved


def test_a_snapshot_older_than_the_cursor_is_dropped_unless_the_provider_keeps_sending_them() -> None:
    """A replayed or cached answer to a snapshot call (its ``last`` below the cursor) would put old
    prices back and let the poller confirm them as of the call; it is dropped as stale. Three in a
    row mean the provider's counter went back: the third is taken."""
    from feed.normalise.pinnacle import OLD_SNAPSHOTS_TO_RESET

    n = PinnacleNormaliser()
    n.feed(load("01_fixtures_snapshot.json"), 1755349190000, pinnacle_channel("fixtures", None, snapshot=True))
    n.feed(load("02_odds_snapshot.json"), 1755349200000, pinnacle_channel("odds", None, snapshot=True))
    body = json.loads(load("02_odds_snapshot.json"))
    body["last"] = 5000  # a newer snapshot moves the cursor on
    assert not n.feed(json.dumps(body).encode(), 1755349300000, pinnacle_channel("odds", None, snapshot=True)).stale
    assert n.since("odds", 29) == 5000
    old = load("02_odds_snapshot.json")  # last 2000: the older answer served again
    for i in range(OLD_SNAPSHOTS_TO_RESET - 1):
        batch = n.feed(old, 1755349400000 + i, pinnacle_channel("odds", None, snapshot=True))
        assert batch.stale and batch.updates == [] and n.since("odds", 29) == 5000
    assert n.dropped["stale_response"] == OLD_SNAPSHOTS_TO_RESET - 1
    batch = n.feed(old, 1755349500000, pinnacle_channel("odds", None, snapshot=True))
    assert not batch.stale and n.since("odds", 29) == 2000  # the provider's counter went back: taken
    # a snapshot at or above the cursor starts the count over
    body["last"] = 6000
    assert not n.feed(json.dumps(body).encode(), 1755349600000, pinnacle_channel("odds", None, snapshot=True)).stale
    assert n.feed(old, 1755349700000, pinnacle_channel("odds", None, snapshot=True)).stale


# --- cutoffs and live events (the auditor's findings f2, f3, f8) ---------------------------------

T0 = 1755349200000  # 2025-08-16T13:00:00Z


def _iso(ms: int) -> str:
    from datetime import datetime, timezone
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _fixture(rid: int, live: int, parent: int | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = {"id": rid, "starts": _iso(T0 + 60_000), "home": "Arsenal", "away": "Chelsea",
                          "liveStatus": live}
    if parent is not None:
        ev["parentId"] = parent
    return ev


def _period(number: int, ts: int, cutoff: int, status: int = 1, ml: dict[str, float] | None = None,
            totals: list[tuple[float, float, float]] | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"number": number, "lineId": 10 + number, "status": status, "cutoff": _iso(cutoff)}
    if ml is not None:
        p.update(moneylineUpdatedAt=_iso(ts), moneyline=ml)
    if totals is not None:
        p.update(totalUpdatedAt=_iso(ts), totals=[{"points": pts, "over": o, "under": u} for pts, o, u in totals])
    return p


class _Feed:
    """A normaliser and the book its updates go to, fed dict bodies."""

    def __init__(self, sport: int = 29) -> None:
        self.n, self.book, self.sport, self.last = PinnacleNormaliser(), Book(), sport, 100

    def send(self, endpoint: str, events: list[dict[str, Any]], recv_ms: int, *, snapshot: bool = False,
             sport: int | None = None) -> list[MarketUpdate]:
        sport = self.sport if sport is None else sport
        self.last += 1
        key = "league" if endpoint == "fixtures" else "leagues"
        league: dict[str, Any] = {"id": 1980, "events": events}
        if endpoint == "fixtures":
            league["name"] = "EPL"
        body = {"sportId": sport, "last": self.last, key: [league] if events else []}
        batch = self.n.feed(json.dumps(body).encode(), recv_ms, pinnacle_channel(endpoint, sport, snapshot=snapshot))  # type: ignore[arg-type]
        assert batch.rejected == []
        for u in batch.updates:
            assert self.book.apply(u, stored_at=recv_ms) is not None, u.market_id
        return batch.updates

    def market(self, mid: str) -> Market:
        return self.book.markets[mid]

    def prices(self, mid: str) -> dict[str, float | None]:
        return {s.selection_id: s.price for s in self.market(mid).selections}


def test_a_period_past_its_cutoff_is_suspended_by_any_later_answer_that_does_not_mention_it() -> None:
    """f2: a delta carries only changed periods, so a period OPEN before its cutoff was never
    re-rendered after it, and every odds poll confirmed it: OPEN and fresh at a price Pinnacle no
    longer offers (its FAQ: open only while the cutoff is ahead)."""
    cutoff = T0 + 60_000
    f = _Feed()
    f.send("fixtures", [_fixture(1, 0)], T0, snapshot=True)
    f.send("odds", [{"id": 1, "periods": [_period(0, T0 - 1000, cutoff, ml={"home": 2.1, "draw": 3.4, "away": 3.6})]}],
           T0, snapshot=True)
    mid = "pn:1:0:moneyline"
    assert f.market(mid).status == "OPEN"
    assert f.send("odds", [], cutoff - 1) == []  # before the cutoff: nothing to say
    ups = f.send("odds", [], cutoff + 600_000)  # a delta that does not mention the event
    assert [(u.market_id, u.header.status, u.header.suspend_reason) for u in ups if u.header] == [
        (mid, "SUSPENDED", "past_cutoff")]
    assert ups[0].source_ts == cutoff  # the provider's time of the change: the cutoff
    m = f.market(mid)
    assert (m.status, m.suspend_reason, f.prices(mid)) == ("SUSPENDED", "past_cutoff",
                                                           {"home": 2.1, "away": 3.6, "draw": 3.4})
    assert f.send("odds", [], cutoff + 900_000) == []  # said once
    # the same period sent again unchanged (still status 1, same cutoff) does not reopen it
    f.send("odds", [{"id": 1, "periods": [_period(0, T0, cutoff, ml={"home": 2.0, "draw": 3.4, "away": 3.6})]}],
           cutoff + 960_000)
    assert f.market(mid).status == "SUSPENDED" and f.market(mid).suspend_reason == "past_cutoff"


def test_any_answer_of_any_sport_expires_cutoffs() -> None:
    """Each sport's odds poll confirms the source's markets (feed.sources.poller: odds_confirmed),
    so another sport's answer, a fixtures answer or a stale one must expire them too."""
    cutoff = T0 + 60_000
    for answer in ("other_sport", "fixtures", "stale"):
        f = _Feed()
        f.send("fixtures", [_fixture(1, 0)], T0, snapshot=True)
        f.send("odds", [{"id": 1, "periods": [_period(0, T0 - 1000, cutoff, ml={"home": 2.1, "away": 1.8})]}],
               T0, snapshot=True)
        recv = cutoff + 5_000
        if answer == "other_sport":
            f.send("odds", [], recv, sport=33)
        elif answer == "fixtures":
            f.send("fixtures", [], recv)
        else:
            f.last -= 5  # an old answer replayed: dropped as stale, but an answer as of its receipt
            body = {"sportId": 29, "last": f.last, "leagues": []}
            batch = f.n.feed(json.dumps(body).encode(), recv, pinnacle_channel("odds", 29, snapshot=False))
            assert batch.stale
            for u in batch.updates:
                f.book.apply(u, stored_at=recv)
        assert f.market("pn:1:0:moneyline").suspend_reason == "past_cutoff", answer


def test_a_pre_match_period_going_offline_is_honoured_while_a_live_event_is_listed() -> None:
    """f3: once a live event was listed for a parent, every line of the parent was ignored, its
    ``status: 2`` (offline) too, so a period the live event does not offer kept its pre-match price
    OPEN, in play False, after kick-off. Now each period is served from the events that hold it:
    a live event's when one does, else the pre-match event's own status (offline → SUSPENDED)."""
    P, L = 100, 200
    cut = T0 + 6 * 3_600_000  # far ahead: the cutoff plays no part
    f = _Feed()
    f.send("fixtures", [_fixture(P, 2)], T0, snapshot=True)
    f.send("odds", [{"id": P, "periods": [_period(0, T0, cut, ml={"home": 2.1, "draw": 3.4, "away": 3.6}),
                                          _period(1, T0, cut, ml={"home": 2.9, "draw": 2.1, "away": 4.2})]}],
           T0, snapshot=True)
    t1 = T0 + 90_000
    f.send("fixtures", [_fixture(L, 1, P)], t1)  # kick-off: the live event is listed, no odds yet
    # until the live event offers a period, the pre-match event's word on it still counts
    f.send("odds", [{"id": P, "periods": [_period(1, t1, cut, ml={"home": 3.0, "draw": 2.0, "away": 4.2})]}], t1)
    assert f.prices("pn:100:1:moneyline")["home"] == 3.0
    t2 = t1 + 5_000
    f.send("odds", [
        {"id": P, "periods": [_period(0, t2, cut, 2, ml={"home": 2.1, "draw": 3.4, "away": 3.6}),
                              _period(1, t2, cut, 2, ml={"home": 3.0, "draw": 2.0, "away": 4.2})]},
        {"id": L, "periods": [_period(0, t2, cut, ml={"home": 1.8, "draw": 3.9, "away": 4.8})]}], t2)
    live, pre = f.market("pn:100:0:moneyline"), f.market("pn:100:1:moneyline")
    assert (live.status, live.in_play, f.prices("pn:100:0:moneyline")) == (
        "OPEN", True, {"home": 1.8, "away": 4.8, "draw": 3.9})
    assert (pre.status, pre.suspend_reason, pre.in_play) == ("SUSPENDED", "offline", False)
    # the pre-match event online again for a period the live event offers changes nothing of it
    t3 = t2 + 5_000
    f.send("odds", [{"id": P, "periods": [_period(0, t3, cut, ml={"home": 2.5, "draw": 3.0, "away": 3.0})]}], t3)
    assert f.market("pn:100:0:moneyline").in_play and f.prices("pn:100:0:moneyline")["home"] == 1.8
    # the live event going offline suspends what it supplied
    t4 = t3 + 5_000
    f.send("odds", [{"id": L, "periods": [_period(0, t4, cut, 2, ml={"home": 1.8, "draw": 3.9, "away": 4.8})]}], t4)
    assert f.market("pn:100:0:moneyline").suspend_reason == "offline"


def _two_live_events(l2_period: int) -> _Feed:
    P, L1, L2 = 100, 200, 201
    cut = T0 + 4 * 3_600_000
    f = _Feed(sport=3)
    f.send("fixtures", [_fixture(P, 2)], T0, snapshot=True)
    f.send("odds", [{"id": P, "periods": [_period(0, T0, cut, ml={"home": 1.7, "away": 2.25},
                                                  totals=[(8.5, 1.95, 1.9)])]}], T0, snapshot=True)
    t1 = T0 + 600_000
    f.send("fixtures", [_fixture(L1, 1, P), _fixture(L2, 1, P)], t1)
    f.send("odds", [
        {"id": L1, "periods": [_period(0, t1, cut, ml={"home": 1.3, "away": 3.6}, totals=[(9.5, 1.91, 1.93)])]},
        {"id": L2, "periods": [_period(l2_period, t1, cut, totals=[(10.5, 2.4, 1.58)])]},
        {"id": P, "periods": [_period(0, t1, cut, 2, ml={"home": 1.7, "away": 2.25})]}], t1)
    return f


@pytest.mark.parametrize("l2_period", [0, 1])
def test_two_live_events_of_one_parent_each_serve_what_they_offer(l2_period: int) -> None:
    """f8: Pinnacle's FAQ — more than one live event for the same actual event, never the same
    market on both at once. Only the higher live id was rendered: the other's live moneyline was
    never served (SUSPENDED), or the parent's pre-match lines stayed OPEN, in play False."""
    f = _two_live_events(l2_period)
    want = {"pn:100:0:moneyline": {"home": 1.3, "away": 3.6}, "pn:100:0:total:9.5": {"over": 1.91, "under": 1.93},
            f"pn:100:{l2_period}:total:10.5": {"over": 2.4, "under": 1.58}}
    for mid, prices in want.items():
        m = f.market(mid)
        assert (m.status, m.in_play, f.prices(mid)) == ("OPEN", True, prices), mid
    pre = f.market("pn:100:0:total:8.5")  # the pre-match total no live event offers
    assert (pre.status, pre.suspend_reason) == ("SUSPENDED", "not_offered")
    assert {mid for mid, m in f.book.markets.items() if m.status == "OPEN"} == set(want)


def test_two_live_events_pricing_one_market_the_later_change_wins() -> None:
    """Should two live events price the same market (a leftover of one: Pinnacle never offers it on
    both), the one whose period changed last is served — whichever id is higher."""
    f = _two_live_events(0)
    cut = T0 + 4 * 3_600_000
    t2 = T0 + 700_000
    f.send("odds", [{"id": 200, "periods": [_period(0, t2, cut, ml={"home": 1.3, "away": 3.6},
                                                    totals=[(9.5, 1.91, 1.93), (10.5, 2.2, 1.7)])]}], t2)
    assert f.prices("pn:100:0:total:10.5") == {"over": 2.2, "under": 1.7}  # 200 changed last
    t3 = t2 + 10_000
    f.send("odds", [{"id": 201, "periods": [_period(0, t3, cut, totals=[(10.5, 2.5, 1.55)])]}], t3)
    assert f.prices("pn:100:0:total:10.5") == {"over": 2.5, "under": 1.55}  # now 201 did
    # 201 going offline suspends what it supplies; 200's markets stay as 200 says
    t4 = t3 + 10_000
    f.send("odds", [{"id": 201, "periods": [_period(0, t4, cut, 2, totals=[(10.5, 2.5, 1.55)])]}], t4)
    assert f.market("pn:100:0:total:10.5").suspend_reason == "offline"
    assert f.market("pn:100:0:moneyline").status == "OPEN"


# --- events a fixtures snapshot no longer lists ------------------------------------------------------


def _settle(f: _Feed, rid: int, number: int, recv_ms: int) -> None:
    """Settle period ``number`` of raw event ``rid`` 1-0 (``/v1/fixtures/settled``)."""
    f.last += 1
    body = {"sportId": f.sport, "last": f.last, "leagues": [{"id": 1980, "events": [{"id": rid, "periods": [
        {"number": number, "status": 1, "settlementId": f.last, "settledAt": _iso(recv_ms - 1000),
         "team1Score": 1, "team2Score": 0}]}]}]}
    batch = f.n.feed(json.dumps(body).encode(), recv_ms, pinnacle_channel("settled", f.sport, snapshot=False))
    for u in batch.updates:
        assert f.book.apply(u, stored_at=recv_ms) is not None


def _statuses(f: _Feed) -> dict[str, tuple[str, str | None]]:
    return {mid: (m.status, m.suspend_reason) for mid, m in sorted(f.book.markets.items())}


def test_an_event_a_fixtures_snapshot_no_longer_lists_has_its_markets_suspended() -> None:
    """Gap: an event dropped from a fixtures snapshot (Pinnacle's full list: no longer offered) had
    its fixture and odds forgotten but its markets kept their last state, OPEN, confirmed fresh by
    every odds delta poll until the next odds snapshot (up to an hour). They are now SUSPENDED
    (``not_offered``, prices kept); a settled period keeps its result; the other event is untouched."""
    cut = T0 + 6 * 3_600_000
    f = _Feed()
    f.send("fixtures", [_fixture(1, 0), _fixture(2, 0)], T0, snapshot=True)
    f.send("odds", [{"id": 1, "periods": [_period(0, T0, cut, ml={"home": 2.1, "draw": 3.4, "away": 3.6}),
                                          _period(1, T0, cut, ml={"home": 2.9, "draw": 2.1, "away": 4.2})]},
                    {"id": 2, "periods": [_period(0, T0, cut, ml={"home": 1.5, "draw": 4.0, "away": 6.0})]}],
           T0, snapshot=True)
    _settle(f, 1, 1, T0 + 30_000)
    t1 = T0 + 60_000
    ups = f.send("fixtures", [_fixture(2, 0)], t1, snapshot=True)
    assert [(u.market_id, u.header.status, u.header.suspend_reason) for u in ups if u.header] == [
        ("pn:1:0:moneyline", "SUSPENDED", "not_offered")]
    assert _statuses(f) == {"pn:1:0:moneyline": ("SUSPENDED", "not_offered"),
                            "pn:1:1:moneyline": ("SETTLED", None),
                            "pn:2:0:moneyline": ("OPEN", None)}
    assert f.prices("pn:1:0:moneyline") == {"home": 2.1, "away": 3.6, "draw": 3.4}
    assert f.send("odds", [], t1 + 5_000) == []  # a later delta poll changes nothing of it
    assert f.send("fixtures", [_fixture(2, 0)], t1 + 10_000, snapshot=True) == []  # said once


@pytest.mark.parametrize("l2_period", [0, 1])
def test_a_live_event_no_longer_listed_suspends_what_only_it_supplied(l2_period: int) -> None:
    """A live event dropped from the fixtures snapshot while its group stays listed: a period only
    it held lines for is SUSPENDED (``not_offered``); a period another event of the group holds is
    served from that event (its markets stay as it says, OPEN)."""
    f = _two_live_events(l2_period)  # 200 prices period 0; 201 period ``l2_period`` (total 10.5)
    t2 = T0 + 700_000
    f.send("fixtures", [_fixture(100, 2), _fixture(200, 1, 100)], t2, snapshot=True)
    assert f.market(f"pn:100:{l2_period}:total:10.5").suspend_reason == "not_offered"
    assert f.prices(f"pn:100:{l2_period}:total:10.5") == {"over": 2.4, "under": 1.58}
    for mid in ("pn:100:0:moneyline", "pn:100:0:total:9.5"):
        assert (f.market(mid).status, f.market(mid).in_play) == ("OPEN", True), mid


def test_a_fixtures_snapshot_after_a_restart_suspends_restored_markets_of_unlisted_events() -> None:
    """After a restart the normaliser knows no fixture: a restored market whose event the first
    fixtures snapshot does not list is no longer offered (SUSPENDED ``not_offered``); one whose
    event is listed is left as restored (its odds are not known yet), and so is one of an event
    the snapshot rejects (we cannot tell what it lists)."""
    cut = T0 + 6 * 3_600_000
    f = _Feed()
    f.send("fixtures", [_fixture(1, 0), _fixture(2, 0), _fixture(3, 0)], T0, snapshot=True)
    f.send("odds", [{"id": r, "periods": [_period(0, T0, cut, ml={"home": 2.1, "away": 1.8})]} for r in (1, 2, 3)],
           T0, snapshot=True)
    n2 = PinnacleNormaliser()
    n2.restore(f.book.markets.values(), f.n.cursor())
    bad = _fixture(3, 0)
    bad["resultingUnit"] = "Corners!"  # rejected alone (invalid_schema)
    body = {"sportId": 29, "last": 500, "league": [{"id": 1980, "name": "EPL", "events": [_fixture(2, 0), bad]}]}
    batch = n2.feed(json.dumps(body).encode(), T0 + 60_000, pinnacle_channel("fixtures", 29, snapshot=True))
    assert [r.market_id for r in batch.rejected] == [None]
    assert [(u.market_id, u.header.status, u.header.suspend_reason) for u in batch.updates if u.header] == [
        ("pn:1:0:moneyline", "SUSPENDED", "not_offered")]
    # another sport's snapshot leaves this sport's markets alone
    other = {"sportId": 33, "last": 501, "league": []}
    assert n2.feed(json.dumps(other).encode(), T0 + 61_000, pinnacle_channel("fixtures", 33, snapshot=True)).updates == []


def test_a_snapshot_answer_counts_as_received_a_cache_period_before_its_request() -> None:
    """Pinnacle serves snapshot calls from a 60 s cache: what a snapshot answer images or changes
    (markets and event states, fixtures and odds alike) is stamped received as of its request (the
    channel: asked 250 ms before the receipt) − SNAPSHOT_CACHE_MS — stamped as received, it read up
    to a minute fresher than it may be. Provider times are still checked against the receipt: a
    change 10 s before it is applied (a receipt moved back would refuse it as clock_skew). A delta
    is stamped with its receipt."""
    from feed.normalise.pinnacle import SNAPSHOT_CACHE_MS
    from feed.validate import validate_update

    recv = T0 + 5_000
    as_of = recv - 250 - SNAPSHOT_CACHE_MS
    n = PinnacleNormaliser()
    fx = {"sportId": 29, "last": 10, "league": [{"id": 1980, "name": "EPL", "events": [_fixture(1, 0),
                                                                                      _fixture(2, 1, parent=1)]}]}
    n.feed(json.dumps(fx).encode(), T0, pinnacle_channel("fixtures", 29, snapshot=True))
    cut = T0 + 3_600_000
    odds = {"sportId": 29, "last": 20, "leagues": [{"id": 1980, "events": [
        {"id": 2, "homeScore": 1.0, "awayScore": 0.0,
         "periods": [_period(0, recv - 10_000, cut, ml={"home": 2.1, "draw": 3.4, "away": 3.6})]}]}]}
    batch = n.feed(json.dumps(odds).encode(), recv, pinnacle_channel("odds", 29, snapshot=True, asked_before_ms=250))
    assert batch.rejected == [] and [u.market_id for u in batch.updates] == ["pn:1:0:moneyline"]
    (u,) = batch.updates
    assert u.image and u.source_ts == recv - 10_000 and u.received_at == as_of
    validate_update(u, recv)  # (the ingest checks provider times against the payload's receipt)
    assert [(es.event_id, es.received_at) for es in batch.event_states] == [("pn:1", as_of)]
    # a fixtures snapshot's changes too (the live event gone: the market it supplied suspended)
    fx2 = {"sportId": 29, "last": 11, "league": [{"id": 1980, "name": "EPL", "events": [_fixture(1, 0)]}]}
    batch = n.feed(json.dumps(fx2).encode(), recv + 1_000, pinnacle_channel("fixtures", 29, snapshot=True))
    assert [(u.market_id, u.received_at) for u in batch.updates] == [
        ("pn:1:0:moneyline", recv + 1_000 - SNAPSHOT_CACHE_MS)]
    # a delta (now the pre-match event's period): as of its receipt
    delta = {"sportId": 29, "last": 21, "leagues": [{"id": 1980, "events": [
        {"id": 1, "periods": [_period(0, recv + 1_500, cut, ml={"home": 2.0, "draw": 3.4, "away": 3.6})]}]}]}
    batch = n.feed(json.dumps(delta).encode(), recv + 2_000, pinnacle_channel("odds", 29, snapshot=False))
    assert batch.updates and all(u.received_at == recv + 2_000 for u in batch.updates)


def test_the_channel_carries_how_long_before_its_receipt_a_snapshot_was_asked() -> None:
    assert pinnacle_channel("odds", 29, snapshot=True, asked_before_ms=0) == "odds:29:snapshot"
    assert pinnacle_channel("odds", 29, snapshot=True, asked_before_ms=180) == "odds:29:snapshot:180"
    with pytest.raises(ValueError):
        pinnacle_channel("odds", 29, snapshot=False, asked_before_ms=180)  # a delta is not cached
    n = PinnacleNormaliser()
    for bad in ("odds:29:since:180", "odds:29:snapshot:", "odds:29:snapshot:-5", "odds:29:snapshot:1e3"):
        with pytest.raises(FeedDecodeError) as err:
            n.feed(b'{"sportId": 29, "last": 5, "leagues": []}', T0, bad)
        assert err.value.reason == "invalid_schema", bad
