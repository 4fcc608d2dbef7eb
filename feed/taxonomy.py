"""One market taxonomy for every provider: canonical market types,
specifiers and outcome keys (pure code, no I/O).

Every normaliser maps its provider's market into a **canonical market
type** (``MarketHeader.market_type``) with **canonical specifiers**
(``MarketHeader.specifiers``) and each selection into a **canonical
outcome** (``Selection.outcome``); the provider's own type stays in
``market_type_raw``. Two books' markets are the same market of one event
when their canonical market keys (:func:`market_key`) are equal; their
selections are the same bet when their outcomes are equal. The full table
per provider is in ``docs/taxonomy.md``.

=================  =========================================  ===========================
market_type        meaning                                    outcomes
=================  =========================================  ===========================
match_result       three-way result (1X2), draw a result      home, draw, away
moneyline          two-way result, no draw (incl. overtime)   home, away
total              total goals / points, ``line``             over, under
handicap           Asian handicap / spread, ``line`` = the    home, away
                   home side's handicap (quarter lines kept:
                   ``-0.25``)
handicap_3way      European handicap, ``line`` (home side)     home, draw, away
btts               both teams to score                        yes, no
double_chance      double chance                              home_draw, home_away, draw_away
draw_no_bet        draw no bet                                home, away
correct_score      correct score                              ``<home>-<away>`` (``2-1``), other
team_total         one team's total, ``team``, ``line``       over, under
win                outright / race winner                     the provider's runner id
place              to be placed, ``places`` when known        the provider's runner id
each_way           each-way bet (win part at the price, a     the provider's runner id
                   place part at a fraction of it):
                   ``places``, ``ew_fraction`` (``1/4``)
                   when known; never the ``place`` key, and
                   no fair price (not in :data:`MARKET_TYPES`)
player_<stat>      player prop (``player_points`` …),         over, under (``<player>:over``
                   ``line``                                   when one market lists players)
raw:<provider>     a type not in this table: passed through,  the provider's selection id
                   never dropped, counted per source
=================  =========================================  ===========================

Specifiers (canonical names; values are strings): ``line`` (``2.5``,
``-0.25``), ``period`` (absent = full time, see below; ``1h``, ``2h``,
``q1``…``q4``, ``p1``…``p3``, ``set1``…``set5``, ``f5`` = baseball's first
five innings, ``p<n>`` for a provider period with no canonical name, and the
time scopes ``rt`` / ``ot`` / ``ot_pen``), ``team`` (``home``/``away``),
``unit`` (``corners``, ``bookings``: the counted thing when it is not
goals/points), ``places``, ``ew_fraction``. Providers' private specifiers
(``sport_key``) may ride along and never make a key; only
:data:`KEY_SPECIFIERS` make the key of a mapped market, while a ``raw:``
market's key carries every other specifier the provider gave
(``raw:uof_412:total=5.5``: each line of an unmapped market is its own
market).

**Full time and overtime.** No ``period`` means full time: for a market with
a draw (``match_result``, ``handicap_3way``, ``double_chance``,
``draw_no_bet``, ``correct_score``) that is regular time in every sport (a
draw exists only then); for the others it is the sport's result — regular
time in soccer, handball, rugby, tennis …; incl. overtime in basketball,
American football, baseball (extra innings) and cricket (super over); incl.
overtime and the shoot-out in ice hockey. A market covering another time
than that carries a scope ``period``: ``rt`` (regular time only: UOF's
"Total" 18 in ice hockey), ``ot`` (incl. overtime / extra innings / super
over but no penalty decider: UOF 219/223/225 in ice hockey or soccer),
``ot_pen`` (incl. overtime and penalties: UOF 406 in soccer). A scope that
is the sport's full time is left out (:func:`market_key` with ``sport``
does this for a market mapped without its sport); a sport not listed has no
full-time scope, so its scoped markets keep the scope. Per provider:

- UOF: the time each mapped id covers is its Sportradar market description's
  group — ``regular_play`` (1, 10, 11, 14, 16, 18, 19, 20, 29, 186),
  ``incl_ot`` (219, 223, 225), ``incl_ei`` (251), ``incl_so`` (340),
  ``incl_ot_and_pen`` (406); 60/66/68 are ``1st_half`` (``period=1h``).
  Without the event's sport (:func:`uof_market` ``sport=None``) a scope is
  kept: never a key it may not have.
- Pinnacle: period 0 is the game incl. overtime (and the shoot-out): full
  time, no ``period``.
- The Odds API: ``h2h`` in NHL / NBA / NFL includes overtime (``moneyline``,
  full time); ``h2h_3_way`` is regulation (``match_result``: regular time
  by its draw).
- Betfair: ``MATCH_ODDS`` in ice hockey is the three-way regular-time result
  (``match_result``, the UOF 1 key); ``MONEY_LINE`` / ``MATCH_ODDS_INC_OT``
  include overtime (``moneyline``); in basketball, American football and
  baseball ``MATCH_ODDS`` includes overtime (``moneyline``). A result market
  whose runners include a draw is three-way in every sport
  (``match_result``; ``period=ot`` for those that include overtime: the draw
  left after it is not the regular-time draw); one whose runners are known
  and include none (a limited-overs cricket match's two runners) is
  two-way in every sport (``moneyline``).

**Home and away on Betfair.** Betfair names most events "Home v Away" and
North American ones "Away @ Home" (the NBA recording ``1-166811431``:
"Cleveland Cavaliers @ Minnesota Timberwolves", runners listed in that
order), so the first-named side — sortPriority 1, Team A of
``TEAM_A_OVER_UNDER_nn`` — is home in one and away in the other. Outcomes
come from runner names against the event name; the runner order and Team A
are used only where the event name says which side is first, or, without
it, in a sport other than those Betfair may name "Away @ Home" (basketball,
American football, baseball, ice hockey).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence

__all__ = [
    "KEY_SPECIFIERS", "LINE_TYPES", "MARKET_TYPES", "OUTCOMES", "betfair_market", "betfair_outcome",
    "generic_market", "is_unmapped", "key_type", "line_text", "market_key", "outcome_from_name",
    "parse_market_key", "period_of", "raw_type", "uof_market", "uof_outcome",
]

#: canonical market types and their outcome keys (None: runner ids / free keys); ``each_way`` is
#: canonical too but left out: its prices are win prices with a place part, not one event's outcome
#: set, so it gets no fair price (streaming.aggregate prices only the types listed here)
MARKET_TYPES: dict[str, tuple[str, ...] | None] = {
    "match_result": ("home", "draw", "away"),
    "moneyline": ("home", "away"),
    "total": ("over", "under"),
    "handicap": ("home", "away"),
    "handicap_3way": ("home", "draw", "away"),
    "btts": ("yes", "no"),
    "double_chance": ("home_draw", "home_away", "draw_away"),
    "draw_no_bet": ("home", "away"),
    "correct_score": None,
    "team_total": ("over", "under"),
    "win": None,
    "place": None,
}
#: every canonical outcome key with a fixed meaning
OUTCOMES: frozenset[str] = frozenset(o for v in MARKET_TYPES.values() if v for o in v)
#: market types whose markets are per line (``line`` specifier)
LINE_TYPES: frozenset[str] = frozenset({"total", "handicap", "handicap_3way", "team_total"})
#: the specifiers that identify a mapped market of an event across books (a ``raw:`` market's key
#: carries all of its specifiers)
KEY_SPECIFIERS: tuple[str, ...] = ("period", "unit", "team", "line", "places", "ew_fraction")

_RAW = "raw:"
#: specifiers a normaliser adds for itself (The Odds API's sport key of the call): never in a key
_PRIVATE = frozenset({"sport_key"})

#: market types with a draw (or void on one): full time is regular time in every sport
_DRAW_TYPES = frozenset({"match_result", "handicap_3way", "double_chance", "draw_no_bet", "correct_score"})
#: the time scopes a ``period`` may name (see the module docstring)
_SCOPES = frozenset({"rt", "ot", "ot_pen"})
#: sport → the scope its result (a market with no ``period``) covers; a sport not listed has none
_FULL_TIME: dict[str, str] = {
    **dict.fromkeys(("soccer", "futsal", "handball", "rugby", "rugby_union", "rugby_league", "tennis",
                     "table_tennis", "volleyball", "badminton", "darts", "snooker", "mma", "boxing"), "rt"),
    **dict.fromkeys(("basketball", "american_football", "baseball", "cricket"), "ot"),
    "ice_hockey": "ot_pen",
}


def _full_time(market_type: str, sport: str | None) -> str | None:
    """The scope a market of this type and sport covers with no ``period`` (None: unknown)."""
    if market_type in _DRAW_TYPES:
        return "rt"
    return _FULL_TIME.get(sport or "")


def raw_type(provider_type: str | None) -> str:
    """The pass-through key of a type the taxonomy does not know: ``raw:<type lower-cased>``, with
    ``:``, ``|`` and ``=`` (the market key's separators) written ``_``."""
    t = (provider_type or "unknown").strip().lower()
    return _RAW + t.replace(":", "_").replace("|", "_").replace("=", "_")


def is_unmapped(market_type: str | None) -> bool:
    """True for a ``raw:`` (pass-through) market type."""
    return market_type is None or market_type.startswith(_RAW)


def line_text(value: float) -> str:
    """A line as text: ``2.5``, ``-0.25``, ``0`` (no trailing zeros, no ``-0``)."""
    if value == 0:
        return "0"
    return f"{value:.4f}".rstrip("0").rstrip(".")


def market_key(market_type: str | None, specifiers: Mapping[str, str] | None, sport: str | None = None) -> str:
    """The canonical market key of a market (a str): its type plus its key
    specifiers in a fixed order (:data:`KEY_SPECIFIERS`): ``match_result``,
    ``total:line=2.5``, ``handicap:period=1h|line=-0.25``; a ``raw:`` type
    plus every specifier it has but the private ones, by name
    (``raw:uof_8:goalnr=1``). Equal keys = the same market of an event
    across books. ``sport``: the market's sport; a scope ``period`` that is
    the sport's full time is left out (``total`` ``period=rt`` in soccer →
    ``total:line=2.5``), as for a draw type's ``rt`` in any sport. A mapped
    market's empty specifiers are left out."""
    t = market_type or "raw:unknown"
    if not specifiers:
        return t
    if is_unmapped(t):
        parts = [f"{k}={v}" for k, v in sorted(specifiers.items()) if k not in _PRIVATE]
    else:
        period = specifiers.get("period")
        drop = period in _SCOPES and period == _full_time(t, sport)
        parts = [f"{k}={specifiers[k]}" for k in KEY_SPECIFIERS if specifiers.get(k) and not (drop and k == "period")]
    return f"{t}:{'|'.join(parts)}" if parts else t


def key_type(key: str) -> str:
    """The market type of a market key: ``total:line=2.5`` → ``total``,
    ``raw:uof_8:goalnr=1`` → ``raw:uof_8``."""
    if key.startswith(_RAW):
        return _RAW + key[len(_RAW):].partition(":")[0]
    return key.partition(":")[0]


def parse_market_key(key: str) -> tuple[str, dict[str, str]]:
    """Inverse of :func:`market_key`: ``total:line=2.5`` → (``total``,
    ``{"line": "2.5"}``), ``raw:uof_412:total=5.5`` → (``raw:uof_412``,
    ``{"total": "5.5"}``). Raises ValueError for a malformed key (a
    specifier without ``=``; for a mapped type, one not in
    :data:`KEY_SPECIFIERS` or empty)."""
    t = key_type(key)
    rest = key[len(t) + 1:]
    raw = t.startswith(_RAW)
    specs: dict[str, str] = {}
    if rest:
        for part in rest.split("|"):
            k, eq, v = part.partition("=")
            if raw and eq and k:
                specs[k] = v
                continue
            if raw or not eq or k not in KEY_SPECIFIERS or not v:
                raise ValueError(f"bad market key {key!r}: specifiers are {'|'.join(KEY_SPECIFIERS)} as name=value")
            specs[k] = v
    if not t or t == _RAW:
        raise ValueError(f"bad market key {key!r}: no market type")
    return t, specs


# -- periods ---------------------------------------------------------------------------------

_PERIODS_BY_SPORT: dict[str, dict[int, str]] = {
    "soccer": {1: "1h", 2: "2h"},
    "basketball": {1: "1h", 2: "2h", 3: "q1", 4: "q2", 5: "q3", 6: "q4"},
    "american_football": {1: "1h", 2: "2h", 3: "q1", 4: "q2", 5: "q3", 6: "q4"},
    "ice_hockey": {1: "p1", 2: "p2", 3: "p3"},
    "tennis": {1: "set1", 2: "set2", 3: "set3", 4: "set4", 5: "set5"},
    "baseball": {1: "f5"},
}


def period_of(sport: str | None, number: int) -> str | None:
    """A provider period number (Pinnacle's: 0 = the whole match) → the
    canonical ``period`` specifier (None = full time)."""
    if number == 0:
        return None
    return _PERIODS_BY_SPORT.get(sport or "", {}).get(number, f"p{number}")


# -- names → outcomes ------------------------------------------------------------------------

_SPACE = re.compile(r"[^a-z0-9]+")


def _fold(text: str) -> str:
    t = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return _SPACE.sub(" ", t).strip()


_DRAW = {"draw", "the draw", "x", "tie"}
_SCORE = re.compile(r"^\s*(\d{1,2})\s*[-:]\s*(\d{1,2})\s*$")


def outcome_from_name(market_type: str | None, name: str | None, home: str | None = None,
                      away: str | None = None) -> str | None:
    """The canonical outcome of a selection known only by its name, given
    the event's home and away names: ``"The Draw"`` → ``draw``, ``"Over
    2.5 Goals"`` → ``over``, a name equal to the home team (case and
    accents folded) → ``home``. None when the name says nothing."""
    if not name:
        return None
    n = _fold(name)
    if market_type == "correct_score":
        m = _SCORE.match(name)
        return f"{int(m.group(1))}-{int(m.group(2))}" if m else None
    if market_type in ("total", "team_total") or (market_type or "").startswith("player_"):
        if n.startswith("over"):
            return "over"
        if n.startswith("under"):
            return "under"
        return None
    if market_type == "btts":
        return n if n in ("yes", "no") else None
    h = _fold(home) if home else None
    a = _fold(away) if away else None
    if market_type == "double_chance":
        parts = re.split(r"\s+or\s+|\s*/\s*", n)
        keys = set()
        for p in parts:
            if p in _DRAW:
                keys.add("draw")
            elif h and p == h or p in ("home", "1"):
                keys.add("home")
            elif a and p == a or p in ("away", "2"):
                keys.add("away")
        code = {"1x": {"home", "draw"}, "x2": {"draw", "away"}, "12": {"home", "away"}}.get(n.replace(" ", ""))
        if code:
            keys = code
        if keys == {"home", "draw"}:
            return "home_draw"
        if keys == {"draw", "away"}:
            return "draw_away"
        if keys == {"home", "away"}:
            return "home_away"
        return None
    if n in _DRAW:
        return "draw"
    if h and n == h or n in ("home", "1"):
        return "home"
    if a and n == a or n in ("away", "2"):
        return "away"
    # a name with a handicap appended ("Arsenal -0.5", "Arsenal +1")
    stripped = re.sub(r"\s*[+-]?\d+(\.\d+)?\s*$", "", n)
    if stripped != n:
        return outcome_from_name(market_type, stripped, home, away)
    return None


# -- Betfair ---------------------------------------------------------------------------------

#: Betfair ``marketType`` → (canonical type, extra specifiers); OVER_UNDER_nn and
#: FIRST_HALF_GOALS_nn are parsed (see :func:`betfair_market`)
_BETFAIR: dict[str, tuple[str, dict[str, str]]] = {
    "MATCH_ODDS": ("match_result", {}),
    "HALF_TIME": ("match_result", {"period": "1h"}),
    "BOTH_TEAMS_TO_SCORE": ("btts", {}),
    "DOUBLE_CHANCE": ("double_chance", {}),
    "DRAW_NO_BET": ("draw_no_bet", {}),
    "CORRECT_SCORE": ("correct_score", {}),
    "HALF_TIME_SCORE": ("correct_score", {"period": "1h"}),
    "ASIAN_HANDICAP": ("handicap", {}),
    "WIN": ("win", {}),
    "PLACE": ("place", {}),
    "OTHER_PLACE": ("place", {}),
    "EACH_WAY": ("each_way", {}),  # a win price with a place part: never the PLACE market's key
    "MONEY_LINE": ("moneyline", {}),
    "MATCH_ODDS_INC_OT": ("moneyline", {}),
    "TOTAL_POINTS": ("total", {}),
    "SET_WINNER": ("moneyline", {"period": "set1"}),
    "CORNER_MATCH_BET": ("match_result", {"unit": "corners"}),
}
_NO_DRAW_SPORTS = frozenset({"tennis", "basketball", "american_football", "baseball", "mma", "boxing",
                             "darts", "snooker", "esports", "table_tennis", "volleyball", "badminton"})
_RACING = frozenset({"horse_racing", "greyhound_racing"})
#: Betfair types that are a two-sided result: a draw runner makes one three-way (``match_result``)
_BETFAIR_RESULT = frozenset({"MATCH_ODDS", "HALF_TIME", "MONEY_LINE", "MATCH_ODDS_INC_OT", "SET_WINNER"})
#: Betfair result types that include overtime: with a draw runner, the draw left after overtime
_BETFAIR_INC_OT = frozenset({"MONEY_LINE", "MATCH_ODDS_INC_OT"})
#: sports whose Betfair ``MATCH_ODDS`` includes overtime / extra innings (module docstring)
_MATCH_ODDS_INC_OT = frozenset({"basketball", "american_football", "baseball"})
#: sports where Betfair may name an event US-style, "Away @ Home", and list its runners in that
#: order (the NBA recording ``1-166811431``: sortPriority 1 is the away side): without the event's
#: name, neither the runner order nor TEAM_A / TEAM_B tells home from away
_AT_SPORTS = frozenset({"basketball", "american_football", "baseball", "ice_hockey"})
_SIDES = re.compile(r"\s+(v|vs\.?|@)\s+")


def _tenths(digits: str) -> str:
    return line_text(int(digits) / 10)


def _event_sides(event_name: str | None) -> tuple[str, str, bool] | None:
    """An event name → (home, away, US-style): "Home v Away" / "Home vs Away" → (Home, Away,
    False), "Away @ Home" → (Home, Away, True); None when it names no two sides."""
    if not event_name:
        return None
    m = _SIDES.search(event_name)
    if m is None:
        return None
    a, b = event_name[: m.start()], event_name[m.end():]
    return (b, a, True) if m.group(1) == "@" else (a, b, False)


def _first_named_is_home(event_name: str | None, sport: str | None) -> bool | None:
    """Whether a Betfair event's first-named side (its runner order, TEAM_A) is the home side:
    True for "Home v Away", False for "Away @ Home"; unknown name: True, but None (cannot tell)
    in a sport Betfair may name "Away @ Home" (:data:`_AT_SPORTS`)."""
    sides = _event_sides(event_name)
    if sides is not None:
        return not sides[2]
    return None if sport in _AT_SPORTS else True


def _has_draw(runners: Sequence[str | None] | None) -> bool | None:
    """Whether a result market's runners include a draw: a runner named as one ("The Draw",
    "Draw", "X", "Tie"), or a third runner (a two-sided result's third runner is the draw; the
    live stream has no runner names). None: runners unknown."""
    if not runners:
        return None
    return len(runners) >= 3 or any(n is not None and _fold(n) in _DRAW for n in runners)


def betfair_market(raw: str | None, sport: str | None = None, *, places: int | None = None,
                   divisor: float | None = None, runners: Sequence[str | None] | None = None,
                   event_name: str | None = None) -> tuple[str, dict[str, str] | None]:
    """Betfair ``marketType`` → (canonical type, specifiers or None).

    ``MATCH_ODDS`` → ``match_result`` (``moneyline`` in sports without a
    draw: tennis, basketball …, and in any sport when its runners are known
    and include no draw — a limited-overs cricket match's two runners; in
    ice hockey the three-way regular-time result stays ``match_result``); a
    result type (``MATCH_ODDS``,
    ``HALF_TIME``, ``MONEY_LINE``, ``MATCH_ODDS_INC_OT``, ``SET_WINNER``)
    whose runners include a draw is ``match_result`` in every sport, with
    ``period=ot`` where it includes overtime (``MONEY_LINE``,
    ``MATCH_ODDS_INC_OT``; ``MATCH_ODDS`` in basketball, American football,
    baseball) — never a two-way ``moneyline`` key; ``OVER_UNDER_25`` →
    ``total`` with ``line=2.5``; ``FIRST_HALF_GOALS_15`` → ``total``
    ``period=1h`` ``line=1.5``; ``TEAM_A_OVER_UNDER_15`` → ``team_total``
    ``team`` = Team A's side: Team A is the event's first-named side,
    ``home`` in "Home v Away", ``away`` in "Away @ Home" (``TEAM_B_…`` the
    other); without the event's name in a sport Betfair may name "Away @
    Home" (basketball, American football, baseball, ice hockey) the side is
    unknown and the market passes as ``raw:team_a_over_under_15``; ``PLACE``
    → ``place``; ``EACH_WAY`` → ``each_way`` (never the place market's
    key); ``CORNER_ODDS`` style and other unknown types → ``raw:<type>``.

    places: the market's ``numberOfWinners`` (kept as ``places`` for PLACE
    and EACH_WAY markets); divisor: an EACH_WAY market's ``eachWayDivisor``
    (``4.0`` → ``ew_fraction=1/4``; one not in (1, 100] is left
    out); runners: the market's runners' names in definition order, None
    for a name not known (the live stream has none: three or more runners
    of a result market count as a draw, two with no draw among their known
    names make it two-way, ``moneyline``, in every sport); None or empty:
    runners unknown (the sport decides); event_name: the Betfair event's name ("Home v Away" or
    "Away @ Home"), None when not known."""
    if not raw:
        return raw_type(None), None
    for prefix, extra in (("OVER_UNDER_", {}), ("FIRST_HALF_GOALS_", {"period": "1h"}),
                          ("TEAM_A_OVER_UNDER_", {"team": "a"}), ("TEAM_B_OVER_UNDER_", {"team": "b"})):
        if raw.startswith(prefix) and raw[len(prefix):].isdigit():
            if "team" not in extra:
                return "total", {**extra, "line": _tenths(raw[len(prefix):])}
            first_home = _first_named_is_home(event_name, sport)
            if first_home is None:  # which side Team A is cannot be told: never a side's key
                return raw_type(raw), None
            team = "home" if (extra["team"] == "a") == first_home else "away"
            return "team_total", {"team": team, "line": _tenths(raw[len(prefix):])}
    hit = _BETFAIR.get(raw)
    if hit is None:
        return raw_type(raw), None
    kind, extra = hit
    specs = dict(extra)
    draw = _has_draw(runners) if raw in _BETFAIR_RESULT else None
    if draw:
        kind = "match_result"  # three-way whatever the sport: never a two-way moneyline's key
        if "period" not in specs and (raw in _BETFAIR_INC_OT or (raw == "MATCH_ODDS" and sport in _MATCH_ODDS_INC_OT)):
            specs["period"] = "ot"
    elif kind == "match_result" and (draw is False or sport in _NO_DRAW_SPORTS):
        # no draw runner (a limited-overs cricket match: two runners) or a sport without draws: two-way,
        # never the three-way key (a two-way price is no 1X2 price)
        kind = "moneyline"
    if kind in ("place", "each_way") and places:
        specs["places"] = str(places)
    if kind == "each_way" and divisor is not None and 1 < divisor <= 100:  # (places pay 1/2 … 1/10; absurd: left out)
        specs["ew_fraction"] = f"1/{line_text(divisor)}"
    return kind, specs or None


#: outcome by Betfair sortPriority where the runner order is fixed whatever the sport: a
#: match result lists home, away, then The Draw ("Home v Away"); over/under lists Under first;
#: BTTS Yes first. Nothing else is guessed from the order (handicap and double chance orders
#: vary), and a match result's only where the first-named side is known to be home: an "Away @
#: Home" event lists the away side first. A wrong outcome would put one side's price under the
#: other's.
_BETFAIR_ORDER: dict[str, tuple[str, ...]] = {
    "match_result": ("home", "away", "draw"),
    "btts": ("yes", "no"),
    "total": ("under", "over"),
}
#: orders that name sides: used only where the first-named side is home
_SIDED_ORDER = frozenset({"match_result"})


def betfair_outcome(market_type: str, selection_id: str, name: str | None, sort_priority: int | None,
                    event_name: str | None, handicap: float = 0.0, *, sport: str | None = None) -> str | None:
    """A Betfair runner → canonical outcome (a str, or None). Racing
    (``win`` / ``place`` / ``each_way``) and unmapped types: the selection
    id. Otherwise the runner name against the event name ("Home v Away";
    US-style "Away @ Home": the second-named side is home) when names are
    known (historic files, the catalogue of a live connection), else — only
    for match result, over/under and BTTS, whose runner order Betfair fixes
    — the runner's ``sortPriority`` (1-based); a match result's order only
    where the event's first-named side is home: a "Home v Away" name, or no
    name in a ``sport`` other than those Betfair may name "Away @ Home"
    (basketball, American football, baseball, ice hockey; None: not known,
    taken as such another). None when
    nothing tells: the runner then takes no part in best or fair prices
    until its name arrives."""
    if market_type in ("win", "place", "each_way") or is_unmapped(market_type):
        return selection_id
    sides = _event_sides(event_name)
    home, away = (sides[0], sides[1]) if sides is not None else (None, None)
    by_name = outcome_from_name(market_type, name, home, away)
    if by_name is not None:
        return by_name
    if name:  # a name that says nothing we know: never guess from the order
        return None
    order = _BETFAIR_ORDER.get(market_type)
    if order is None or sort_priority is None or not 1 <= sort_priority <= len(order):
        return None
    if market_type in _SIDED_ORDER and not _first_named_is_home(event_name, sport):
        return None  # "Away @ Home", or a sport that may name it so: the order does not say home
    return order[sort_priority - 1]


# -- names used by bookmakers and push providers ----------------------------------------------

_GENERIC: dict[str, str] = {
    "1x2": "match_result", "match_odds": "match_result", "match_result": "match_result", "h2h_3_way": "match_result",
    "fulltime_result": "match_result", "three_way": "match_result", "result": "match_result",
    "moneyline": "moneyline", "ml": "moneyline", "money_line": "moneyline", "h2h": "moneyline",
    "match_winner": "moneyline", "winner_2way": "moneyline",
    "total": "total", "totals": "total", "over_under": "total", "ou": "total", "alternate_totals": "total",
    "total_goals": "total", "total_points": "total",
    "handicap": "handicap", "spread": "handicap", "spreads": "handicap", "asian_handicap": "handicap",
    "ah": "handicap", "alternate_spreads": "handicap", "point_spread": "handicap",
    "european_handicap": "handicap_3way", "handicap_3way": "handicap_3way",
    "btts": "btts", "both_teams_to_score": "btts", "gg_ng": "btts",
    "double_chance": "double_chance", "dc": "double_chance",
    "draw_no_bet": "draw_no_bet", "dnb": "draw_no_bet",
    "correct_score": "correct_score", "team_totals": "team_total", "team_total": "team_total",
    "win": "win", "winner": "win", "outright": "win", "outrights": "win", "place": "place",
}


def generic_market(raw: str | None, *, has_draw: bool | None = None, sport: str | None = None
                   ) -> tuple[str, dict[str, str]]:
    """A bookmaker's or push provider's market key (``1x2``, ``h2h``,
    ``totals``, ``spreads``, ``over_under_25`` …) → (canonical type,
    specifiers found in the key). A two-way name with a draw outcome
    (``has_draw``) is ``match_result``; a three-way name in a sport without
    draws stays ``match_result`` only when it really has a draw. Unknown
    keys → ``raw:<key>``; ``player_*`` keys pass as they are (a player
    prop)."""
    if not raw:
        return raw_type(None), {}
    k = raw.strip().lower().replace(" ", "_").replace("-", "_")
    specs: dict[str, str] = {}
    for suffix, period in (("_h1", "1h"), ("_1st_half", "1h"), ("_h2", "2h"), ("_2nd_half", "2h"),
                           ("_q1", "q1"), ("_q2", "q2"), ("_q3", "q3"), ("_q4", "q4"),
                           ("_p1", "p1"), ("_p2", "p2"), ("_p3", "p3")):
        if k.endswith(suffix) and k[: -len(suffix)] in _GENERIC:
            k, specs["period"] = k[: -len(suffix)], period
            break
    for prefix in ("over_under_", "first_half_goals_"):
        if k.startswith(prefix) and k[len(prefix):].isdigit():
            if prefix == "first_half_goals_":
                specs["period"] = "1h"
            specs["line"] = _tenths(k[len(prefix):])
            return "total", specs
    if k.startswith("player_") and _SPACE.sub("", k) == k.replace("_", ""):
        return k, specs
    kind = _GENERIC.get(k)
    if kind is None:
        return raw_type(raw), {}
    if kind in ("match_result", "moneyline") and has_draw is not None:
        kind = "match_result" if has_draw else "moneyline"
    elif kind == "match_result" and sport in _NO_DRAW_SPORTS and has_draw is None:
        kind = "moneyline"
    return kind, specs


# -- Sportradar UOF ----------------------------------------------------------------------------

#: UOF market id → (canonical type, {UOF outcome id: outcome}), from Sportradar's
#: market descriptions (https://docs.sportradar.com/uof/ — "markets" endpoint)
_UOF: dict[str, tuple[str, dict[str, str]]] = {
    "1": ("match_result", {"1": "home", "2": "draw", "3": "away"}),
    "10": ("double_chance", {"9": "home_draw", "10": "home_away", "11": "draw_away"}),
    "11": ("draw_no_bet", {"4": "home", "5": "away"}),
    "14": ("handicap_3way", {"1711": "home", "1712": "draw", "1713": "away"}),
    "16": ("handicap", {"1714": "home", "1715": "away"}),
    "18": ("total", {"12": "over", "13": "under"}),
    "19": ("team_total", {"12": "over", "13": "under"}),
    "20": ("team_total", {"12": "over", "13": "under"}),
    "29": ("btts", {"74": "yes", "76": "no"}),
    "60": ("match_result", {"1": "home", "2": "draw", "3": "away"}),
    "66": ("handicap", {"1714": "home", "1715": "away"}),
    "68": ("total", {"12": "over", "13": "under"}),
    "186": ("moneyline", {"4": "home", "5": "away"}),
    "219": ("moneyline", {"4": "home", "5": "away"}),
    "223": ("handicap", {"1714": "home", "1715": "away"}),
    "225": ("total", {"12": "over", "13": "under"}),
    "251": ("moneyline", {"4": "home", "5": "away"}),
    "340": ("moneyline", {"4": "home", "5": "away"}),
    "406": ("moneyline", {"4": "home", "5": "away"}),
}
_UOF_PERIOD = {"60": "1h", "66": "1h", "68": "1h"}
#: the time a full-match UOF market covers: its market description's group (regular_play → rt;
#: incl_ot, incl_ei = extra innings, incl_so = super over → ot; incl_ot_and_pen → ot_pen)
_UOF_SCOPE: dict[str, str] = {
    **dict.fromkeys(("1", "10", "11", "14", "16", "18", "19", "20", "29", "186"), "rt"),
    **dict.fromkeys(("219", "223", "225", "251", "340"), "ot"),
    "406": "ot_pen",
}
_UOF_TEAM = {"19": "home", "20": "away"}


def uof_market(market_id: str, specifiers: Mapping[str, str] | None, *, sport: str | None = None
               ) -> tuple[str, dict[str, str] | None]:
    """A UOF market (id + specifiers such as ``total=2.5``, ``hcp=-1``) →
    (canonical type, canonical specifiers or None); unknown ids (and a
    mapped id whose ``total`` / ``hcp`` is not a number) →
    ``raw:uof_<id>`` with the UOF specifiers as they are. ``sport``: the
    event's canonical sport (``ice_hockey``); a market covering another time
    than the sport's result gets its scope as ``period`` (UOF 18 "Total",
    regular time: ``period=rt`` in ice hockey, none in soccer), and without
    the sport every scope is kept (module docstring)."""
    hit = _UOF.get(market_id)
    if hit is None:
        return raw_type(f"uof_{market_id}"), dict(specifiers) if specifiers else None
    kind = hit[0]
    specs: dict[str, str] = {}
    if market_id in _UOF_PERIOD:
        specs["period"] = _UOF_PERIOD[market_id]
    scope = _UOF_SCOPE.get(market_id)
    if scope is not None and scope != _full_time(kind, sport):
        specs["period"] = scope
    if market_id in _UOF_TEAM:
        specs["team"] = _UOF_TEAM[market_id]
    if specifiers:
        for k in ("total", "hcp"):
            v = specifiers.get(k)
            if v is not None:
                try:
                    if ":" in v:  # European handicap "0:1": the home side's goals minus the away side's
                        a, b = v.split(":", 1)
                        specs["line"] = line_text(float(a) - float(b))
                    else:
                        specs["line"] = line_text(float(v))
                except ValueError:
                    return raw_type(f"uof_{market_id}"), dict(specifiers)
    return kind, specs or None


def uof_outcome(market_id: str, outcome_id: str) -> str | None:
    """A UOF outcome id of a mapped market → canonical outcome (None: unknown)."""
    hit = _UOF.get(market_id)
    return hit[1].get(outcome_id) if hit is not None else None


def race_event_id(event_id: str | None, sport: str | None, start_time: int | None) -> str | None:
    """The race event id a Betfair racing market belongs to: its event (the
    meeting, ``bf:28587288``) and the HHMM of its scheduled start in UTC
    (``bf:28587288.1650``), as Betfair's race ids are formed; None for a
    market that is not a Betfair horse or greyhound race. ``start_time``:
    int ms since the epoch."""
    if (sport not in ("horse_racing", "greyhound_racing") or start_time is None or event_id is None
            or not event_id.startswith("bf:")):
        return None
    minute = (start_time // 60_000) % 1440
    return f"{event_id}.{minute // 60:02d}{minute % 60:02d}"
