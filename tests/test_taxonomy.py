"""The shared market taxonomy: every provider's markets map onto the same
canonical types, specifiers and outcomes (feed/taxonomy.py, docs/taxonomy.md)."""

from __future__ import annotations

import pytest

from feed.normalise.betfair import BetfairNormaliser
from feed.taxonomy import (
    betfair_market,
    betfair_outcome,
    generic_market,
    is_unmapped,
    market_key,
    outcome_from_name,
    parse_market_key,
    period_of,
    uof_market,
    uof_outcome,
)


@pytest.mark.parametrize(("raw", "sport", "want"), [
    ("MATCH_ODDS", "soccer", ("match_result", None)),
    ("MATCH_ODDS", "tennis", ("moneyline", None)),
    ("OVER_UNDER_25", "soccer", ("total", {"line": "2.5"})),
    ("OVER_UNDER_05", "soccer", ("total", {"line": "0.5"})),
    ("FIRST_HALF_GOALS_15", "soccer", ("total", {"period": "1h", "line": "1.5"})),
    ("HALF_TIME", "soccer", ("match_result", {"period": "1h"})),
    ("ASIAN_HANDICAP", "soccer", ("handicap", None)),
    ("BOTH_TEAMS_TO_SCORE", "soccer", ("btts", None)),
    ("WIN", "horse_racing", ("win", None)),
    ("CORNER_ODDS", "soccer", ("raw:corner_odds", None)),
])
def test_betfair_market_types(raw: str, sport: str, want: tuple) -> None:
    assert betfair_market(raw, sport) == want


def test_betfair_place_keeps_the_number_of_places() -> None:
    assert betfair_market("PLACE", "horse_racing", places=3) == ("place", {"places": "3"})


def test_betfair_outcomes_from_names_then_sort_priority() -> None:
    # names known (historic files, the catalogue): matched against "Home v Away"
    assert betfair_outcome("match_result", "1", "Arsenal", 1, "Arsenal v Chelsea") == "home"
    assert betfair_outcome("match_result", "2", "Chelsea", 2, "Arsenal v Chelsea") == "away"
    assert betfair_outcome("match_result", "3", "The Draw", 3, "Arsenal v Chelsea") == "draw"
    assert betfair_outcome("total", "4", "Over 2.5 Goals", 2, None) == "over"
    # a live stream has no names: Betfair's runner order says home, away, draw / under, over
    assert betfair_outcome("match_result", "9", None, 3, None) == "draw"
    assert betfair_outcome("total", "9", None, 1, None) == "under"
    # … but no guess where the order is not fixed: a wrong side is worse than none
    assert betfair_outcome("handicap", "7:-0.25", None, 1, None) is None
    assert betfair_outcome("moneyline", "7", None, 1, None) is None
    # US style "Away @ Home"
    assert betfair_outcome("moneyline", "7", "Boston Celtics", 1, "Boston Celtics @ Miami Heat") == "away"
    assert betfair_outcome("moneyline", "8", "Miami Heat", 2, "Boston Celtics @ Miami Heat") == "home"
    # racing: the runner id; nothing to go on: None
    assert betfair_outcome("win", "4711", "Winx", 1, None) == "4711"
    assert betfair_outcome("match_result", "9", None, None, None) is None


def test_names_fold_case_and_accents() -> None:
    assert outcome_from_name("match_result", "ATLETICO MADRID", "Atlético Madrid", "Sevilla") == "home"
    assert outcome_from_name("match_result", "Draw", "A", "B") == "draw"
    assert outcome_from_name("double_chance", "Arsenal or Draw", "Arsenal", "Chelsea") == "home_draw"
    assert outcome_from_name("double_chance", "X2", "Arsenal", "Chelsea") == "draw_away"
    assert outcome_from_name("correct_score", "2 - 1") == "2-1"
    assert outcome_from_name("match_result", "Liverpool", "Arsenal", "Chelsea") is None


@pytest.mark.parametrize(("raw", "has_draw", "want"), [
    ("h2h", True, ("match_result", {})),
    ("h2h", False, ("moneyline", {})),
    ("1X2", None, ("match_result", {})),
    ("totals", None, ("total", {})),
    ("spreads", None, ("handicap", {})),
    ("over_under_25", None, ("total", {"line": "2.5"})),
    ("totals_h1", None, ("total", {"period": "1h"})),
    ("btts", None, ("btts", {})),
    ("player_points", None, ("player_points", {})),
    ("corners_odd_even", None, ("raw:corners_odd_even", {})),
])
def test_generic_market_names(raw: str, has_draw: bool | None, want: tuple) -> None:
    assert generic_market(raw, has_draw=has_draw) == want


def test_uof_markets_and_outcomes() -> None:
    assert uof_market("1", None) == ("match_result", None)
    assert uof_market("18", {"total": "2.5"}) == ("total", {"line": "2.5"})
    assert uof_market("16", {"hcp": "-0.25"}) == ("handicap", {"line": "-0.25"})
    assert uof_market("14", {"hcp": "0:1"}) == ("handicap_3way", {"line": "-1"})
    assert uof_market("68", {"total": "1.5"}) == ("total", {"period": "1h", "line": "1.5"})
    assert uof_market("999", {"x": "1"}) == ("raw:uof_999", {"x": "1"})
    assert [uof_outcome("1", o) for o in ("1", "2", "3")] == ["home", "draw", "away"]
    assert uof_outcome("18", "13") == "under" and uof_outcome("999", "1") is None


def test_market_keys_round_trip_and_ignore_private_specifiers() -> None:
    assert market_key("total", {"sport_key": "soccer_epl", "line": "2.5"}) == "total:line=2.5"
    assert market_key("handicap", {"line": "-0.25", "period": "1h"}) == "handicap:period=1h|line=-0.25"
    assert market_key("match_result", None) == "match_result"
    assert parse_market_key("handicap:period=1h|line=-0.25") == ("handicap", {"period": "1h", "line": "-0.25"})
    with pytest.raises(ValueError, match="specifiers"):
        parse_market_key("total:points=2.5")
    assert is_unmapped("raw:x") and not is_unmapped("total")
    assert period_of("basketball", 3) == "q1" and period_of("soccer", 0) is None and period_of("curling", 2) == "p2"


def test_a_live_betfair_stream_gets_outcomes_by_runner_order() -> None:
    """ESA live messages carry no names: the canonical outcomes still come out."""
    n = BetfairNormaliser()
    line = (b'{"op":"mcm","pt":1700000000000,"ct":"SUB_IMAGE","mc":[{"id":"1.5","img":true,"marketDefinition":'
            b'{"eventId":"77","eventTypeId":"1","marketType":"MATCH_ODDS","status":"OPEN","inPlay":false,'
            b'"marketTime":"2023-11-14T22:00:00.000Z","runners":['
            b'{"id":11,"sortPriority":1,"status":"ACTIVE"},{"id":22,"sortPriority":2,"status":"ACTIVE"},'
            b'{"id":58805,"sortPriority":3,"status":"ACTIVE"}]},'
            b'"rc":[{"id":11,"batb":[[0,2.0,10]]},{"id":22,"batb":[[0,4.0,10]]},{"id":58805,"batb":[[0,3.5,10]]}]}]}')
    batch = n.feed(line, 1700000000050)
    (u,) = batch.updates
    assert u.header is not None and u.header.market_type == "match_result"
    assert {s.selection_id: s.outcome for s in u.selections} == {"11": "home", "22": "away", "58805": "draw"}
