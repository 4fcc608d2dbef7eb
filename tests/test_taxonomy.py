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
    key_type,
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
    assert uof_market("18", {"total": "2.5"}, sport="soccer") == ("total", {"line": "2.5"})
    assert uof_market("16", {"hcp": "-0.25"}, sport="soccer") == ("handicap", {"line": "-0.25"})
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


# -- each-way is not a place bet (audit F2) ------------------------------------------------------


def test_betfair_each_way_never_takes_the_place_key() -> None:
    """An EACH_WAY price is a win price with a place part (Catterick: 3.1 each
    way next to 1.55 to be placed): under the PLACE market's key it was served
    as the best place price."""
    place = betfair_market("PLACE", "horse_racing", places=2)
    each_way = betfair_market("EACH_WAY", "horse_racing", places=2)
    assert place == ("place", {"places": "2"})
    assert each_way == ("each_way", {"places": "2"})
    assert market_key(*each_way) == "each_way:places=2" != market_key(*place)
    # the each-way terms make the key where they are known: other terms are another bet
    with_terms = betfair_market("EACH_WAY", "horse_racing", places=3, divisor=4.0)
    assert with_terms == ("each_way", {"places": "3", "ew_fraction": "1/4"})
    assert market_key(*with_terms) == "each_way:places=3|ew_fraction=1/4"
    assert parse_market_key("each_way:places=3|ew_fraction=1/4") == with_terms
    assert market_key(*betfair_market("EACH_WAY", "horse_racing", places=3, divisor=5.0)) != market_key(*with_terms)
    assert betfair_market("EACH_WAY", "horse_racing", places=3, divisor=float("nan")) == ("each_way", {"places": "3"})
    assert betfair_market("EACH_WAY", "horse_racing", places=3, divisor=1e308) == ("each_way", {"places": "3"})  # (a 300-digit key)
    # runners are the selection ids, as in WIN and PLACE
    assert betfair_outcome("each_way", "14766968", "Militia", 1, None) == "14766968"


# -- regular time vs overtime (audit F5) --------------------------------------------------------

#: (UOF id, specifiers, sport, key): every id of the UOF table, checked against its Sportradar
#: market description's group (regular_play, incl_ot, incl_ei, incl_so, incl_ot_and_pen, 1st_half)
UOF_KEYS: list[tuple[str, dict[str, str] | None, str | None, str]] = [
    # regular_play: the result in soccer; regular time (rt) where the result includes overtime
    ("18", {"total": "2.5"}, "soccer", "total:line=2.5"),
    ("18", {"total": "5.5"}, "ice_hockey", "total:period=rt|line=5.5"),
    ("18", {"total": "210.5"}, "basketball", "total:period=rt|line=210.5"),
    ("18", {"total": "5.5"}, None, "total:period=rt|line=5.5"),  # no sport: the scope is kept
    ("16", {"hcp": "-1.5"}, "soccer", "handicap:line=-1.5"),
    ("16", {"hcp": "-1.5"}, "ice_hockey", "handicap:period=rt|line=-1.5"),
    ("19", {"total": "2.5"}, "ice_hockey", "team_total:period=rt|team=home|line=2.5"),
    ("20", {"total": "2.5"}, "soccer", "team_total:team=away|line=2.5"),
    ("29", None, "ice_hockey", "btts:period=rt"),
    ("29", None, "soccer", "btts"),
    ("186", None, "tennis", "moneyline"),
    ("186", None, "ice_hockey", "moneyline:period=rt"),
    ("186", None, "cricket", "moneyline:period=rt"),
    # a draw type is regular time by its draw, in every sport: no period
    ("1", None, "ice_hockey", "match_result"),
    ("1", None, None, "match_result"),
    ("10", None, "basketball", "double_chance"),
    ("11", None, "ice_hockey", "draw_no_bet"),
    ("14", {"hcp": "0:1"}, "ice_hockey", "handicap_3way:line=-1"),
    # 1st half
    ("60", None, "soccer", "match_result:period=1h"),
    ("66", {"hcp": "-0.5"}, "basketball", "handicap:period=1h|line=-0.5"),
    ("68", {"total": "1.5"}, "soccer", "total:period=1h|line=1.5"),
    # incl_ot / incl_ei / incl_so: the result in basketball, American football, baseball, cricket
    ("219", None, "basketball", "moneyline"),
    ("223", {"hcp": "-4.5"}, "basketball", "handicap:line=-4.5"),
    ("225", {"total": "210.5"}, "basketball", "total:line=210.5"),
    ("225", {"total": "47.5"}, "american_football", "total:line=47.5"),
    ("251", None, "baseball", "moneyline"),
    ("340", None, "cricket", "moneyline"),
    ("225", {"total": "210.5"}, None, "total:period=ot|line=210.5"),
    ("225", {"total": "2.5"}, "soccer", "total:period=ot|line=2.5"),  # extra time is not soccer's result
    ("219", None, "ice_hockey", "moneyline:period=ot"),  # no shoot-out: not ice hockey's result
    # incl_ot_and_pen: ice hockey's result
    ("406", None, "ice_hockey", "moneyline"),
    ("406", None, "soccer", "moneyline:period=ot_pen"),
    ("406", None, None, "moneyline:period=ot_pen"),
]


@pytest.mark.parametrize(("mid", "specs", "sport", "key"), UOF_KEYS,
                         ids=[f"{m}-{s}-{(sp or {}).get('total') or (sp or {}).get('hcp') or ''}"
                              for m, sp, s, _ in UOF_KEYS])
def test_every_uof_market_keys_the_time_it_covers(mid: str, specs: dict[str, str] | None, sport: str | None,
                                                  key: str) -> None:
    assert market_key(*uof_market(mid, specs, sport=sport)) == key


def test_regular_time_never_shares_the_full_time_key() -> None:
    """UOF 18 "Total" is regular play; Pinnacle's period 0 (NHL) and UOF 225
    "Total (incl. overtime)" include overtime: one key put the regular-time
    over 5.5 at 2.35 up as the best price of the game's over 5.5."""
    pinnacle = market_key("total", {"line": "5.5"})  # period_of(sport, 0) is None: the game incl. overtime
    assert period_of("ice_hockey", 0) is None
    assert market_key(*uof_market("18", {"total": "5.5"}, sport="ice_hockey")) != pinnacle
    assert market_key(*uof_market("18", {"total": "5.5"})) != pinnacle  # the sport not known: still apart
    assert (market_key(*uof_market("18", {"total": "210.5"}, sport="basketball"))
            != market_key(*uof_market("225", {"total": "210.5"}, sport="basketball")))
    assert (market_key(*uof_market("16", {"hcp": "-4.5"}))
            != market_key(*uof_market("223", {"hcp": "-4.5"})))
    # Pinnacle's and The Odds API's hockey moneyline (incl. overtime and shoot-out) = UOF 406 = Betfair MONEY_LINE
    assert market_key(*uof_market("406", None, sport="ice_hockey")) == "moneyline"
    assert market_key(*betfair_market("MONEY_LINE", "ice_hockey")) == "moneyline"
    assert market_key(*generic_market("h2h", has_draw=False, sport="ice_hockey")) == "moneyline"
    # Betfair MATCH_ODDS in ice hockey is the three-way regular-time result: UOF 1's key, never a moneyline
    assert betfair_market("MATCH_ODDS", "ice_hockey") == ("match_result", None)
    assert market_key(*betfair_market("MATCH_ODDS", "ice_hockey")) == market_key(*uof_market("1", None))
    # … in basketball it includes overtime: UOF 219's key
    assert market_key(*betfair_market("MATCH_ODDS", "basketball")) == market_key(
        *uof_market("219", None, sport="basketball"))


def test_a_scope_that_is_the_sports_full_time_leaves_the_key() -> None:
    """A market mapped without its sport keeps its scope; with the sport, the
    key is the one a provider that knew the sport gives."""
    rt = {"period": "rt", "line": "2.5"}
    assert market_key("total", rt, "soccer") == "total:line=2.5"
    assert market_key("total", rt, "ice_hockey") == market_key("total", rt) == "total:period=rt|line=2.5"
    assert market_key("total", {"period": "ot", "line": "210.5"}, "basketball") == "total:line=210.5"
    assert market_key("total", {"period": "ot", "line": "2.5"}, "soccer") == "total:period=ot|line=2.5"
    assert market_key("moneyline", {"period": "ot_pen"}, "ice_hockey") == "moneyline"
    assert market_key("moneyline", {"period": "ot_pen"}, "curling") == "moneyline:period=ot_pen"
    assert market_key("match_result", {"period": "rt"}) == "match_result"  # a draw type: regular time anyway
    assert market_key("total", {"period": "1h", "line": "1.5"}, "soccer") == "total:period=1h|line=1.5"


# -- unmapped markets keep their specifiers in the key (audit F6) -------------------------------


def test_an_unmapped_markets_key_carries_every_specifier() -> None:
    """UOF 412 at 5.5 and at 6.5 (and UOF 8 goalnr=1 / goalnr=6) were one
    ``raw:uof_412`` group: the 6.5 line's over price was served as the best
    price of a market with no line."""
    t, s55 = uof_market("412", {"total": "5.5"})
    assert (t, s55) == ("raw:uof_412", {"total": "5.5"})
    k55, k65 = market_key(t, s55), market_key(*uof_market("412", {"total": "6.5"}))
    assert (k55, k65) == ("raw:uof_412:total=5.5", "raw:uof_412:total=6.5")
    assert market_key(*uof_market("8", {"goalnr": "1"})) != market_key(*uof_market("8", {"goalnr": "6"}))
    # every specifier, by name: the same market whatever order the provider wrote them in
    many = market_key("raw:uof_1048", {"variant": "sr:exact_goals:5+", "hcp": "0:1"})
    assert many == "raw:uof_1048:hcp=0:1|variant=sr:exact_goals:5+"
    assert many == market_key("raw:uof_1048", {"hcp": "0:1", "variant": "sr:exact_goals:5+"})
    assert parse_market_key(many) == ("raw:uof_1048", {"hcp": "0:1", "variant": "sr:exact_goals:5+"})
    assert key_type(many) == "raw:uof_1048" and key_type("total:line=2.5") == "total"
    assert market_key("raw:corner_odds", None) == "raw:corner_odds" == key_type("raw:corner_odds")
    # private specifiers never make a key, mapped or not
    assert market_key("total", {"sport_key": "soccer_epl", "line": "2.5"}) == "total:line=2.5"
    assert market_key("raw:h2h_1st_3_innings", {"sport_key": "baseball_mlb"}) == "raw:h2h_1st_3_innings"
    # a provider type holding a key separator cannot bleed into the specifiers
    assert betfair_market("ODD:TYPE|X=1")[0] == "raw:odd_type_x_1"
    with pytest.raises(ValueError, match="specifiers"):
        parse_market_key("raw:uof_8:goalnr")


# -- a draw runner is a three-way result; "Away @ Home" names the away side first (audit) -----------


@pytest.mark.parametrize(("raw", "sport", "runners", "want"), [
    # a 3-way market in a sport without draws: never the two-way moneyline key
    ("HALF_TIME", "basketball", ["Cleveland Cavaliers", "Minnesota Timberwolves", "The Draw"],
     ("match_result", {"period": "1h"})),
    ("MATCH_ODDS", "boxing", ["Fury", "Usyk", "Draw"], ("match_result", None)),
    ("MATCH_ODDS", "darts", [None, None, None], ("match_result", None)),  # live stream: no names, 3 runners
    # one that includes overtime keeps its scope: the draw after overtime is not the regular-time draw
    ("MATCH_ODDS", "american_football", ["Chiefs", "Bills", "The Draw"], ("match_result", {"period": "ot"})),
    ("MONEY_LINE", "american_football", [None, None, None], ("match_result", {"period": "ot"})),
    # two runners: two-way, as before
    ("MATCH_ODDS", "boxing", ["Fury", "Usyk"], ("moneyline", None)),
    ("MATCH_ODDS", "basketball", [None, None], ("moneyline", None)),
    ("MATCH_ODDS", "soccer", ["Arsenal", "Chelsea", "The Draw"], ("match_result", None)),
    ("MATCH_ODDS", "ice_hockey", [None, None, None], ("match_result", None)),
])
def test_betfair_a_draw_runner_makes_a_three_way_result_in_any_sport(
        raw: str, sport: str, runners: list[str | None], want: tuple) -> None:
    assert betfair_market(raw, sport, runners=runners) == want


def test_betfair_a_three_way_market_never_shares_a_moneylines_key() -> None:
    """A basketball half-time market with The Draw was ``moneyline:period=1h``:
    its home 1.95 (a 3-way price) was the best 2-way first-half moneyline."""
    three_way = betfair_market("HALF_TIME", "basketball", runners=["A", "B", "The Draw"])
    assert market_key(*three_way, sport="basketball") == "match_result:period=1h"
    assert market_key("moneyline", {"period": "1h"}, "basketball") != market_key(*three_way, sport="basketball")
    assert market_key(*betfair_market("MONEY_LINE", "american_football", runners=["A", "B", "The Draw"]),
                      sport="american_football") == "match_result:period=ot"


@pytest.mark.parametrize(("event", "sport", "want_a", "want_b"), [
    ("Arsenal v Chelsea", "soccer", "home", "away"),
    ("Boston Bruins @ New York Rangers", "ice_hockey", "away", "home"),  # Team A = first named = away
    ("LA Galaxy @ Seattle Sounders", "soccer", "away", "home"),
    (None, "soccer", "home", "away"),
])
def test_betfair_team_a_is_the_first_named_side(event: str | None, sport: str, want_a: str, want_b: str) -> None:
    assert betfair_market("TEAM_A_OVER_UNDER_25", sport, event_name=event) == (
        "team_total", {"team": want_a, "line": "2.5"})
    assert betfair_market("TEAM_B_OVER_UNDER_15", sport, event_name=event) == (
        "team_total", {"team": want_b, "line": "1.5"})


def test_betfair_team_a_without_the_event_name_where_it_may_be_away_is_no_sides_key() -> None:
    """Basketball, American football, baseball and ice hockey may be named
    "Away @ Home": without the name Team A's side is unknown, so the market
    passes through (never grouped) rather than claim a side."""
    assert betfair_market("TEAM_A_OVER_UNDER_25", "ice_hockey") == ("raw:team_a_over_under_25", None)
    assert betfair_market("TEAM_B_OVER_UNDER_25", "basketball") == ("raw:team_b_over_under_25", None)


def test_betfair_runner_order_names_no_side_in_an_away_at_home_event() -> None:
    """The NBA recording (1-166811431, "Cleveland Cavaliers @ Minnesota
    Timberwolves") lists the away side first (sortPriority 1): the "home,
    away, draw" order would serve the away side's price as home's."""
    at = "Boston Bruins @ New York Rangers"
    assert [betfair_outcome("match_result", str(i), None, i, at, sport="ice_hockey") for i in (1, 2, 3)] == [None] * 3
    # no event name in a sport that may be named so: no guess either
    assert [betfair_outcome("match_result", str(i), None, i, None, sport="ice_hockey") for i in (1, 2, 3)] == [None] * 3
    assert betfair_outcome("match_result", "1", None, 1, None, sport="basketball") is None
    # names decide in either naming
    assert betfair_outcome("match_result", "1", "Boston Bruins", 1, at, sport="ice_hockey") == "away"
    assert betfair_outcome("match_result", "2", "New York Rangers", 2, at, sport="ice_hockey") == "home"
    # "Home v Away" and soccer's live stream keep the fixed order; over/under needs no sides
    assert betfair_outcome("match_result", "1", None, 1, "Arsenal v Chelsea", sport="soccer") == "home"
    assert [betfair_outcome("match_result", str(i), None, i, None, sport="soccer") for i in (1, 2, 3)] == [
        "home", "away", "draw"]
    assert betfair_outcome("total", "1", None, 1, at, sport="ice_hockey") == "under"


# -- a result market with no draw runner is two-way in any sport (audit: cricket) -----------------


@pytest.mark.parametrize(("raw", "sport", "runners", "want"), [
    # a limited-overs cricket match: two runners (ids alone on the live stream, or names)
    ("MATCH_ODDS", "cricket", [None, None], ("moneyline", None)),
    ("MATCH_ODDS", "cricket", ["Netherlands", "Papua New Guinea"], ("moneyline", None)),
    # a sport with draws whose market has none
    ("MATCH_ODDS", "soccer", [None, None], ("moneyline", None)),
    ("MATCH_ODDS", "ice_hockey", ["Boston Bruins", "New York Rangers"], ("moneyline", None)),
    ("HALF_TIME", "rugby_union", [None, None], ("moneyline", {"period": "1h"})),
    # a draw among them (a test match), or a third runner: three-way as before
    ("MATCH_ODDS", "cricket", ["England", "India", "The Draw"], ("match_result", None)),
    ("MATCH_ODDS", "cricket", [None, None, None], ("match_result", None)),
    ("MATCH_ODDS", "cricket", ["England", "The Draw"], ("match_result", None)),
    # runners unknown: the sport decides
    ("MATCH_ODDS", "cricket", None, ("match_result", None)),
    ("MATCH_ODDS", "cricket", [], ("match_result", None)),
    # not a result type: untouched
    ("CORNER_MATCH_BET", "soccer", [None, None], ("match_result", {"unit": "corners"})),
])
def test_betfair_a_result_market_without_a_draw_runner_is_two_way_in_any_sport(
        raw: str, sport: str, runners: list[str | None] | None, want: tuple) -> None:
    """A cricket MATCH_ODDS of a limited-overs match (no draw runner: the recording
    1.200806927 lists two) was ``match_result``, the three-way key: its two-way price
    stood beside other books' 1X2 prices as the same market's."""
    assert betfair_market(raw, sport, runners=runners) == want


def test_betfair_a_two_runner_cricket_match_shares_the_two_way_key() -> None:
    two_way = betfair_market("MATCH_ODDS", "cricket", runners=[None, None])
    assert market_key(*two_way, sport="cricket") == market_key(*uof_market("340", None, sport="cricket")) == "moneyline"
    assert market_key(*two_way, sport="cricket") != market_key(*uof_market("1", None, sport="cricket"))
