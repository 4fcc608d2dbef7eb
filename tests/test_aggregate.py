"""Best and fair price across books, checked against hand-computed
examples: two-way, three-way, a stale book, a suspended book, an exchange's
lay side, a Betfair-style market with every handicap line (pure, on
NodeState)."""

from __future__ import annotations

import math

import pytest

from feed.models import Market, Selection, SourceHealth
from feed.settings import Settings
from feed.store import StoredLink
from streaming.aggregate import devig, event_view, market_views
from streaming.pricecheck import PriceCheckRequest
from streaming.state import NodeState

NOW = 1_700_000_000_000


def sel(outcome: str, price: float | None, *, lay: float | None = None, status: str = "ACTIVE",
        sid: str | None = None, handicap: float = 0.0) -> Selection:
    return Selection(selection_id=sid or outcome, outcome=outcome, price=price, status=status,  # type: ignore[arg-type]
                     handicap=handicap, back=[(price, 50.0)] if lay is not None and price is not None else [],
                     lay=[(lay, 40.0)] if lay is not None else [])


def mkt(mid: str, book: str, sels: list[Selection], *, mtype: str = "match_result", specs: dict | None = None,
        event: str = "e1", source: str | None = None, status: str = "OPEN", received_at: int = NOW) -> Market:
    return Market(market_id=mid, source=source or book, bookmaker=book, event_id=event, sport="soccer",
                  market_type=mtype, specifiers=specs, status=status, received_at=received_at,  # type: ignore[arg-type]
                  source_ts=received_at, seq=1, selections=sels)


def state(*markets: Market) -> NodeState:
    st = NodeState(Settings(stale_in_play_ms=10_000, stale_pre_match_ms=60_000), 1)
    for m in markets:
        st._put(m, None)
    st.set_health([SourceHealth(source=m.source, state="UP", last_message_at=NOW) for m in markets])
    st.loaded = True
    return st


def test_devig_methods_by_hand() -> None:
    # 1.9 / 1.9: implied 0.5263 each, overround 1.0526 → fair 2.00 each
    assert devig([1.9, 1.9]) == pytest.approx([0.5, 0.5])
    # 3-way 2.0 / 3.5 / 4.0: implied .5 + .285714 + .25 = 1.035714
    p = devig([2.0, 3.5, 4.0])
    assert p == pytest.approx([0.5 / 1.035714, 0.285714 / 1.035714, 0.25 / 1.035714], rel=1e-5)
    # power: Σ q_i^k = 1 and the favourite keeps more of its probability than multiplicatively
    q = devig([1.5, 3.0], "power")
    assert sum(q) == pytest.approx(1.0)
    k = math.log(q[0]) / math.log(1 / 1.5)
    assert (1 / 3.0) ** k == pytest.approx(q[1], rel=1e-6)
    assert q[0] > devig([1.5, 3.0])[0]
    with pytest.raises(ValueError, match="unknown fair-price method"):
        devig([2.0, 2.0], "shin-ish")


def test_two_way_best_and_fair() -> None:
    st = state(mkt("a:1", "book_a", [sel("over", 1.90), sel("under", 1.95)], mtype="total", specs={"line": "2.5"}),
               mkt("b:1", "book_b", [sel("over", 2.00), sel("under", 1.80)], mtype="total", specs={"line": "2.5"}))
    (v,) = market_views(st, st.markets.values(), NOW)
    assert v.market == "total:line=2.5" and [o.outcome for o in v.outcomes] == ["over", "under"]
    over, under = v.outcomes
    assert (over.best.price, over.best.bookmaker) == (2.00, "book_b")   # type: ignore[union-attr]
    assert (under.best.price, under.best.bookmaker) == (1.95, "book_a")  # type: ignore[union-attr]
    # book_a: 1/1.9=.526316, 1/1.95=.512821 (Σ 1.039137) → over .506494; book_b: .5, .555556 (Σ 1.055556) → .473684
    p_over = (0.526316 / 1.039137 + 0.5 / 1.055556) / 2
    assert over.fair == pytest.approx(1 / p_over, abs=0.001)
    assert v.margins == {"book_a": pytest.approx(0.0391, abs=1e-4), "book_b": pytest.approx(0.0556, abs=1e-4)}


def test_three_way_with_a_stale_and_a_suspended_book() -> None:
    old = NOW - 120_000  # older than the 60 s pre-match limit
    st = state(
        mkt("a:1", "book_a", [sel("home", 2.10), sel("draw", 3.40), sel("away", 3.60)]),
        mkt("b:1", "book_b", [sel("home", 2.40), sel("draw", 3.50), sel("away", 3.30)], received_at=old),
        mkt("c:1", "book_c", [sel("home", 2.30), sel("draw", 3.60), sel("away", 3.20)], status="SUSPENDED"),
        mkt("d:1", "book_d", [sel("home", 2.05), sel("draw", 3.30), sel("away", 3.90)]),
    )
    (v,) = market_views(st, st.markets.values(), NOW)
    home, draw, away = v.outcomes
    # the stale 2.40 and the suspended 2.30 are better but excluded: best home is book_a's 2.10
    assert (home.best.price, home.best.bookmaker) == (2.10, "book_a")  # type: ignore[union-attr]
    assert (away.best.price, away.best.bookmaker) == (3.90, "book_d")  # type: ignore[union-attr]
    assert draw.best.price == 3.40  # type: ignore[union-attr]
    assert v.excluded_books == {"book_b": "stale", "book_c": "suspended"}
    why = {b.bookmaker: b.excluded for b in home.books}
    assert why == {"book_a": None, "book_b": "stale", "book_c": "suspended", "book_d": None}
    # fair from book_a and book_d only
    pa = [1 / 2.10, 1 / 3.40, 1 / 3.60]
    pd = [1 / 2.05, 1 / 3.30, 1 / 3.90]
    fair_home = 2 / (pa[0] / sum(pa) + pd[0] / sum(pd))
    assert home.fair == pytest.approx(fair_home, abs=0.001) and v.fair_books == ["book_a", "book_d"]


def test_exchange_lay_side_and_a_book_missing_an_outcome() -> None:
    st = state(
        mkt("bf:1", "betfair_exchange", [sel("home", 2.10, lay=2.12), sel("draw", 3.45, lay=3.5),
                                         sel("away", 3.70, lay=3.75)]),
        mkt("x:1", "book_x", [sel("home", 2.15), sel("away", 3.50)]),  # no draw price: not a complete book
    )
    (v,) = market_views(st, st.markets.values(), NOW)
    home = v.outcomes[0]
    assert home.best.bookmaker == "book_x" and home.best_lay.price == 2.12  # type: ignore[union-attr]
    assert home.best_lay.bookmaker == "betfair_exchange"  # type: ignore[union-attr]
    assert v.fair_books == ["betfair_exchange"]


def test_per_selection_lines_join_the_groups_of_their_lines() -> None:
    # one Betfair Asian handicap market with two lines; a bookmaker's -0.25 line market
    bf = mkt("bf:ah", "betfair_exchange", [
        sel("home", 1.95, lay=1.97, sid="1:-0.25", handicap=-0.25), sel("away", 1.97, lay=2.0, sid="2:0.25", handicap=0.25),
        sel("home", 2.30, lay=2.34, sid="1:-0.75", handicap=-0.75), sel("away", 1.70, lay=1.72, sid="2:0.75", handicap=0.75),
    ], mtype="handicap")
    bk = mkt("pn:ah", "pinnacle", [sel("home", 1.99, handicap=-0.25), sel("away", 1.91, handicap=0.25)],
             mtype="handicap", specs={"line": "-0.25"})
    st = state(bf, bk)
    views = {v.market: v for v in market_views(st, st.markets.values(), NOW)}
    assert set(views) == {"handicap:line=-0.25", "handicap:line=-0.75"}
    q = views["handicap:line=-0.25"]
    assert q.outcomes[0].best.bookmaker == "pinnacle" and q.outcomes[1].best.price == 1.97  # type: ignore[union-attr]
    assert len(views["handicap:line=-0.75"].outcomes[0].books) == 1


def test_event_view_joins_linked_provider_events() -> None:
    st = state(mkt("a:1", "book_a", [sel("home", 2.1), sel("draw", 3.4), sel("away", 3.6)], event="a:e"),
               mkt("b:1", "book_b", [sel("home", 2.2), sel("draw", 3.3), sel("away", 3.5)], event="b:e"))
    assert event_view(st, "ev:a:e", NOW) is not None and len(event_view(st, "ev:a:e", NOW).bookmakers) == 1  # type: ignore[union-attr]
    st.set_links(1, {"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:a:e", 0.93, "fuzzy")}, {})
    ev = event_view(st, "ev:a:e", NOW)
    assert ev is not None and ev.bookmakers == ["book_a", "book_b"]
    assert [m["method"] for m in ev.members] == ["self", "fuzzy"]
    assert ev.markets[0].outcomes[0].best.bookmaker == "book_b"  # type: ignore[union-attr]
    assert event_view(st, "ev:b:e", NOW) is None


# -- price check on the best price ----------------------------------------------------------


def _best_req(price: float, outcome: str = "home", side: str = "back", **kw: object) -> PriceCheckRequest:
    return PriceCheckRequest(event="ev:a:e", market="match_result", outcome=outcome, side=side,  # type: ignore[arg-type]
                             price=price, **kw)  # type: ignore[arg-type]


def _linked_state() -> NodeState:
    old = NOW - 120_000
    st = state(
        mkt("a:1", "book_a", [sel("home", 2.10), sel("draw", 3.40), sel("away", 3.60)], event="a:e"),
        mkt("b:1", "book_b", [sel("home", 2.40), sel("draw", 3.50), sel("away", 3.30)], event="b:e", received_at=old),
        mkt("c:1", "book_c", [sel("home", 2.30), sel("draw", 3.60), sel("away", 3.20)], event="c:e",
            status="SUSPENDED"),
        mkt("d:1", "book_d", [sel("home", 2.05), sel("draw", 3.30), sel("away", 3.90)], event="d:e"),
    )
    st.set_links(1, {e: StoredLink("ev:a:e", 0.95, "fuzzy") for e in ("a:e", "b:e", "c:e", "d:e")}, {})
    return st


def test_price_check_on_the_best_price_names_the_book_and_skips_stale_and_suspended() -> None:
    from streaming.pricecheck import check

    st = _linked_state()
    r = check(st, _best_req(2.10), NOW)
    assert (r.accepted, r.reason, r.bookmaker, r.market_id, r.current_price) == (True, "OK", "book_a", "a:1", 2.10)
    assert {b.bookmaker: b.reason for b in r.books or []} == {
        "book_a": "OK", "book_d": "PRICE_CHANGED", "book_b": "STALE", "book_c": "SUSPENDED"}
    assert "book_b (stale)" in r.message and "book_c (suspended)" in r.message
    # 2.30 is only on offer from the stale and the suspended book: not current, so PRICE_CHANGED at 2.10
    r = check(st, _best_req(2.30), NOW)
    assert (r.accepted, r.reason, r.bookmaker, r.current_price) == (False, "PRICE_CHANGED", "book_a", 2.10)
    # away: book_d's 3.90 is the best current price
    r = check(st, _best_req(3.80, "away"), NOW)
    assert (r.accepted, r.bookmaker, r.current_price) == (True, "book_d", 3.90)


def test_price_check_on_the_best_price_when_nothing_is_current() -> None:
    from streaming.pricecheck import check

    st = state(mkt("b:1", "book_b", [sel("home", 2.40), sel("draw", 3.5), sel("away", 3.3)], event="b:e",
                   received_at=NOW - 120_000))
    r = check(st, _best_req(2.0).__class__(event="ev:b:e", market="match_result", outcome="home", side="back",
                                           price=2.0), NOW)
    assert (r.accepted, r.reason, r.bookmaker) == (False, "STALE", "book_b")
    r = check(st, _best_req(2.0).__class__(event="ev:b:e", market="total:line=2.5", outcome="over", side="back",
                                           price=2.0), NOW)
    assert r.reason == "UNKNOWN_MARKET" and "total:line=2.5" in r.message
    r = check(st, _best_req(2.0).__class__(event="ev:b:e", market="match_result", outcome="yes", side="back",
                                           price=2.0), NOW)
    assert r.reason == "UNKNOWN_SELECTION"
    r = check(st, _best_req(2.0).__class__(event="ev:nope", market="match_result", outcome="home", side="back",
                                           price=2.0), NOW)
    assert r.reason == "UNKNOWN_MARKET"


def test_a_book_naming_the_sides_the_other_way_round_is_turned_round() -> None:
    """Book b lists "Chelsea v Arsenal": its "home" is the canonical away side.
    Without turning it round its Chelsea price would pass for Arsenal's."""
    a = mkt("a:1", "book_a", [sel("home", 2.10), sel("draw", 3.40), sel("away", 3.60)], event="a:e")
    b = mkt("b:1", "book_b", [sel("home", 3.90, sid="chelsea"), sel("draw", 3.30), sel("away", 2.05, sid="arsenal")],
            event="b:e")
    ah_a = mkt("a:2", "book_a", [sel("home", 1.95, handicap=-0.5), sel("away", 1.95, handicap=0.5)],
               event="a:e", mtype="handicap", specs={"line": "-0.5"})
    ah_b = mkt("b:2", "book_b", [sel("home", 2.00, sid="chelsea+0.5", handicap=0.5),
                                 sel("away", 1.90, sid="arsenal-0.5", handicap=-0.5)],
               event="b:e", mtype="handicap", specs={"line": "0.5"})  # Chelsea +0.5 = Arsenal -0.5
    st = state(a, b, ah_a, ah_b)
    st.set_links(1, {"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:a:e", 0.94, "fuzzy", True)}, {})
    views = {v.market: v for v in market_views(st, st.markets.values(), NOW)}
    assert set(views) == {"match_result", "handicap:line=-0.5"}
    home, _, away = views["match_result"].outcomes
    assert (home.best.price, home.best.bookmaker) == (2.10, "book_a")  # type: ignore[union-attr]
    assert [(b.bookmaker, b.selection_id, b.price) for b in home.books] == [("book_a", "home", 2.1),
                                                                            ("book_b", "arsenal", 2.05)]
    assert (away.best.price, away.best.bookmaker, away.best.selection_id) == (3.90, "book_b", "chelsea")  # type: ignore[union-attr]
    ah_home = views["handicap:line=-0.5"].outcomes[0]
    assert [(b.bookmaker, b.selection_id) for b in ah_home.books] == [("book_a", "home"), ("book_b", "arsenal-0.5")]


def test_a_linked_book_starting_far_from_the_event_lends_no_price() -> None:
    """A fixture linked to an event it is not (the return match, months later; a rescheduled one):
    its price was the best view's and a best-price check's answer — another match's price, fresh
    (linker audit, architecture §66). A book whose market starts more than the match tolerance
    from the canonical event's start is excluded (``start_time``) and never a check's answer."""
    import json

    from streaming.pricecheck import check

    start = NOW + 3_600_000
    a = mkt("a:1", "book_a", [sel("home", 2.10), sel("draw", 3.40), sel("away", 3.60)], event="a:e")
    b = mkt("b:1", "book_b", [sel("home", 2.60), sel("draw", 3.50), sel("away", 3.10)], event="b:e")
    st = state(a, b)
    st._put(_with_start(a, start), st.markets["a:1"])
    st._put(_with_start(b, start + 120 * 86_400_000), st.markets["b:1"])
    canon = {"ev:a:e": json.dumps({"event_id": "ev:a:e", "sport": "soccer", "name": "A v B", "home": "A",
                                   "away": "B", "members": ["a:e", "b:e"], "start_time": start}).encode()}
    st.set_links(1, {"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:a:e", 0.87, "fuzzy")}, canon)
    ev = event_view(st, "ev:a:e", NOW)
    assert ev is not None
    home = ev.markets[0].outcomes[0]
    assert home.best is not None and home.best.bookmaker == "book_a" and home.best.price == 2.10
    assert {bp.bookmaker: bp.excluded for bp in home.books} == {"book_a": None, "book_b": "start_time"}
    r = check(st, _best_req(2.60), NOW)
    assert not r.accepted and r.bookmaker == "book_a" and r.reason == "PRICE_CHANGED", r
    assert {bc.bookmaker for bc in r.books or []} == {"book_a"}
    # within the tolerance it counts (a kick-off moved by an hour)
    st._put(_with_start(b, start + 3_600_000), st.markets["b:1"])
    assert check(st, _best_req(2.60), NOW).accepted


def _with_start(m: Market, start: int) -> Market:
    import msgspec

    return msgspec.structs.replace(m, start_time=start)


# -- one canonical key, one market (audit F2, F5, F6) --------------------------------------------


def _in(m: Market, sport: str) -> Market:
    import msgspec

    return msgspec.structs.replace(m, sport=sport)


def _check(st: NodeState, market: str, outcome: str, price: float) -> object:
    from streaming.pricecheck import check

    return check(st, PriceCheckRequest(event="ev:a:e", market=market, outcome=outcome, side="back",  # type: ignore[arg-type]
                                       price=price), NOW)


def test_an_each_way_price_is_never_the_best_place_price() -> None:
    """Betfair's EACH_WAY market (numberOfWinners 2) had the PLACE market's key:
    its 3.1 (a win price with a place part) was the best "to be placed" price,
    and a place bet at 3.0 passed the best-price check against a real 1.55."""
    from feed.taxonomy import betfair_market

    runners = [("14766968", 3.0, 1.55, 3.1), ("38218050", 4.5, 1.9, 4.6)]
    ms = []
    for raw, col in (("WIN", 1), ("PLACE", 2), ("EACH_WAY", 3)):
        mtype, specs = betfair_market(raw, "horse_racing", places=1 if raw == "WIN" else 2)
        ms.append(_in(mkt(f"bf:1.{col}", "betfair", [sel(r[0], r[col]) for r in runners], mtype=mtype, specs=specs,
                          event="a:e"), "horse_racing"))
    st = state(*ms)
    views = {v.market: v for v in market_views(st, st.markets.values(), NOW)}
    assert set(views) == {"win", "place:places=2", "each_way:places=2"}
    assert [o.best.price for o in views["place:places=2"].outcomes if o.best] == [1.55, 1.9]
    assert {b.market_id for o in views["place:places=2"].outcomes for b in o.books} == {"bf:1.2"}
    assert views["each_way:places=2"].fair_books == []  # a win price with a place part: no fair price
    r = _check(st, "place:places=2", "14766968", 3.0)
    assert (r.accepted, r.reason, r.market_id, r.current_price) == (False, "PRICE_CHANGED", "bf:1.2", 1.55)  # type: ignore[attr-defined]


def test_a_regular_time_total_is_never_the_best_price_of_the_games_total() -> None:
    """UOF 18 "Total" (regular play) in the NHL next to Pinnacle's period-0
    total (incl. overtime): one group served UOF's 2.35 as the game's best over
    5.5 (Pinnacle 1.95). The UOF normaliser maps without the sport: the scope
    is kept, and the view still puts a soccer regular-time total with the others."""
    from feed.taxonomy import period_of, uof_market

    t, uof_specs = uof_market("18", {"total": "5.5"})
    pn_specs = {"line": "5.5", **({"period": p} if (p := period_of("ice_hockey", 0)) else {})}
    st = state(_in(mkt("uof:1", "uof", [sel("over", 2.35, sid="12"), sel("under", 1.60, sid="13")], mtype=t,
                       specs=uof_specs, event="a:e"), "ice_hockey"),
               _in(mkt("pn:1", "pinnacle", [sel("over", 1.95), sel("under", 1.87)], mtype="total", specs=pn_specs,
                       event="b:e"), "ice_hockey"))
    st.set_links(1, {"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:a:e", 1.0, "pinned")}, {})
    views = {v.market: v for v in market_views(st, st.markets.values(), NOW)}
    assert set(views) == {"total:line=5.5", "total:period=rt|line=5.5"}
    assert views["total:period=rt|line=5.5"].specifiers == {"period": "rt", "line": "5.5"}
    assert [b.bookmaker for o in views["total:line=5.5"].outcomes for b in o.books] == ["pinnacle", "pinnacle"]
    r = _check(st, "total:line=5.5", "over", 2.30)
    assert (r.accepted, r.bookmaker, r.current_price) == (False, "pinnacle", 1.95)  # type: ignore[attr-defined]
    # soccer's result is regular time: UOF 18 (mapped without the sport) is the other books' total
    t, uof_specs = uof_market("18", {"total": "2.5"})
    st = state(mkt("uof:2", "uof", [sel("over", 2.05, sid="12"), sel("under", 1.80, sid="13")], mtype=t,
                   specs=uof_specs, event="a:e"),
               mkt("bf:2", "betfair", [sel("over", 1.98), sel("under", 1.90)], mtype="total", specs={"line": "2.5"},
                   event="b:e"))
    st.set_links(1, {"a:e": StoredLink("ev:a:e", 1.0, "self"), "b:e": StoredLink("ev:a:e", 1.0, "pinned")}, {})
    (view,) = market_views(st, st.markets.values(), NOW)
    assert view.market == "total:line=2.5" and view.specifiers == {"line": "2.5"}
    assert view.outcomes[0].best is not None and view.outcomes[0].best.bookmaker == "uof"


def test_each_line_of_an_unmapped_market_is_its_own_group() -> None:
    """UOF 412 (unmapped) at 5.5 and 6.5 were one ``raw:uof_412`` group: the
    6.5 line's over 2.90 was the best "over" and a bet at 2.5 on the 5.5 line
    passed the check."""
    from feed.taxonomy import uof_market

    ms = []
    for i, (line, over, under) in enumerate((("5.5", 1.90, 1.90), ("6.5", 2.90, 1.40))):
        t, specs = uof_market("412", {"total": line})
        ms.append(_in(mkt(f"uof:412:{i}", "uof", [sel("12", over), sel("13", under)], mtype=t, specs=specs,
                          event="a:e"), "ice_hockey"))
    st = state(*ms)
    views = {v.market: v for v in market_views(st, st.markets.values(), NOW)}
    assert set(views) == {"raw:uof_412:total=5.5", "raw:uof_412:total=6.5"}
    v = views["raw:uof_412:total=5.5"]
    assert (v.market_type, v.specifiers) == ("raw:uof_412", {"total": "5.5"})
    assert [o.best.price for o in v.outcomes if o.best] == [1.90, 1.90]
    assert len(market_views(st, st.markets.values(), NOW, keys={"raw:uof_412"})) == 2  # the type still selects both
    r = _check(st, "raw:uof_412:total=5.5", "12", 2.5)
    assert (r.accepted, r.market_id, r.current_price) == (False, "uof:412:0", 1.90)  # type: ignore[attr-defined]
    assert _check(st, "raw:uof_412", "12", 2.5).reason == "UNKNOWN_MARKET"  # type: ignore[attr-defined]
