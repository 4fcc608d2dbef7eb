"""Event matching: link each provider's event to one canonical event (pure
code, no I/O; :mod:`feed.linker` runs it against Redis).

A provider event is described by an :class:`EventRecord` (sport, start
time, name, participants, competition, venue). Two records are the same
real-world event when (:func:`match_score`):

- their sports agree and both start times are given (``Soccer`` = ``soccer``
  = ``football``; a record lacking either is linked only by a pin — without
  them the reverse fixture, next season's, a double-header's other game or
  the same names in another sport look the same);
- **team events**: both participants match — names are folded (case,
  accents, punctuation), club-form noise is dropped (FC, CF, AFC, SC …),
  ``Utd`` reads ``United``, ``St`` ``Saint``; the sides are read from
  "Home v Away", "Home vs Away", "Home - Away" or US-style "Away @ Home";
  a name matches when it is the same, an abbreviation of the other
  (``Man Utd`` / ``Manchester United``, ``WS Wanderers`` / ``Western Sydney
  Wanderers``, ``Djokovic N`` / ``Novak Djokovic``: every word a prefix or
  the initials of the other's words, nothing left over), or close by
  rapidfuzz's ``token_sort_ratio`` (typos, transliterations); a women's
  (Women, W, (F), (V), Femeni, Feminines, Dam, Vrouwen …), youth (U21, U21s,
  Under-23s, Sub-20, Primavera, Olympic …) or reserve (II, B, Reserves,
  Castilla, Atletic, Jong …, Next Gen) side never matches the first team, nor
  does a name with any other bracket ("(Ivan)": an e-soccer player; "(N)",
  "(ESP)", "(1)" are ignored); reversed home/away spelling matches at a small discount; start
  times within ``tolerance_ms`` (default 90 min; the score falls with the
  gap); the competition is a hint (± a few points), never decisive;
- **racing** (horse / greyhound): the same venue and race time within
  ``race_tolerance_ms`` (default 6 min: bookmakers list the scheduled off, races
  start late). A Betfair racing event is a
  meeting; its records are per race (``<event id>/<race start ms>``, see
  :func:`record_id`).

:class:`Matcher` links records one by one (first seen, first anchored): a
record joins the best-scoring canonical event at or above
:data:`LINK_THRESHOLD` that has no member from the same source — unless
another one scores within :data:`AMBIGUITY_MARGIN` of it (a tie, for racing)
— else it becomes its own canonical event ``ev:<its record id>`` (a record
whose description changes is scored again: see :meth:`Matcher.link`) — so an unmatched
event keeps a stable canonical id, and so does a matched one (the id of
its first member). :class:`Overrides` (``mappings.yaml``) pin records
together or forbid a link, and add team aliases.

Confidence: the link's score (0–1); ``method`` says how it was made:
``self`` (own event), ``fuzzy`` (teams / names), ``venue_time`` (racing),
``pinned`` (an override).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from rapidfuzz import fuzz

from feed.errors import ConfigError

__all__ = [
    "AMBIGUITY_MARGIN", "CANONICAL_PREFIX", "LINK_THRESHOLD", "CanonicalEvent", "EventRecord", "Link", "Matcher",
    "Overrides", "TeamName", "canonical_sport", "match_detail", "match_score", "participants", "record_id", "team_name",
]

#: a link is made at or above this confidence
LINK_THRESHOLD = 0.8
#: no link when the second-best canonical event scores within this of the best (which one is meant is a guess)
AMBIGUITY_MARGIN = 0.05
CANONICAL_PREFIX = "ev:"
TOLERANCE_MS = 90 * 60_000
RACE_TOLERANCE_MS = 6 * 60_000
RACING = frozenset({"horse_racing", "greyhound_racing"})


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One provider event as the matcher sees it.

    event_id: the record id (the provider's namespaced event id, e.g.
    ``bf:33623427``; per race for racing: see :func:`record_id`); source:
    the source name; sport: canonical sport key; start_time: scheduled
    start, integer ms since the Unix epoch (UTC), None when unknown; name:
    the event name as the provider shows it; home / away: the participants
    when the provider gives them apart (else read from ``name``).
    """

    event_id: str
    source: str
    sport: str | None
    start_time: int | None
    name: str | None
    home: str | None = None
    away: str | None = None
    competition: str | None = None
    venue: str | None = None
    country: str | None = None


@dataclass(frozen=True, slots=True)
class Link:
    """Where one record belongs: ``canonical_id``, ``confidence`` 0–1,
    ``method`` (self / fuzzy / venue_time / pinned); ``reversed``: the
    record names the sides the other way round from the canonical event
    ("Chelsea v Arsenal" for "Arsenal v Chelsea") — its home outcome is the
    canonical away (the aggregated view turns its markets round)."""

    canonical_id: str
    confidence: float
    method: str
    reversed: bool = False


@dataclass(slots=True)
class CanonicalEvent:
    """One real-world event: its id, the record it was anchored on, and
    its member record ids (first seen first)."""

    canonical_id: str
    anchor: EventRecord
    members: list[str] = field(default_factory=list)


def record_id(event_id: str, sport: str | None, start_time: int | None) -> str:
    """The matcher's record id of a market's event: the event id, or for
    racing (a Betfair event is the whole meeting) ``<event id>/<race start ms>``."""
    if sport in RACING and start_time is not None:
        return f"{event_id}/{start_time}"
    return event_id


# -- names ----------------------------------------------------------------------------------------

_SPORTS = {"football": "soccer", "association_football": "soccer", "horse_racing": "horse_racing",
           "horseracing": "horse_racing", "greyhounds": "greyhound_racing", "greyhound_racing": "greyhound_racing",
           "american_football": "american_football", "ice_hockey": "ice_hockey", "icehockey": "ice_hockey"}


def canonical_sport(sport: str | None) -> str | None:
    """``Soccer`` / ``football`` → ``soccer``; ``Horse Racing`` → ``horse_racing``."""
    if not sport:
        return None
    k = re.sub(r"[^a-z0-9]+", "_", sport.lower()).strip("_")
    return _SPORTS.get(k, k)


def _fold(text: str) -> str:
    t = unicodedata.normalize("NFKD", text)
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    t = t.replace("&", " and ").replace("'", "")
    return re.sub(r"[^a-z0-9]+", " ", t).strip()


#: club-form words that carry no identity
_NOISE = frozenset({"fc", "cf", "afc", "sc", "cfc", "ac", "fk", "sk", "bk", "club", "the", "calcio", "sv", "ssc",
                    "cd", "ud", "sd", "rc", "ca", "futbol", "football", "soccer", "de", "and"})
_EXPAND = {"utd": "united", "st": "saint", "intl": "international", "ath": "athletic", "atl": "atletico",
           "wand": "wanderers", "mgr": "manager"}
_WOMEN = frozenset({"w", "women", "womens", "ladies", "fem", "femenino", "feminino", "feminin", "wfc", "frauen",
                    "damen", "femeni", "femenil", "feminine", "feminines", "femminile", "dam", "dames", "damer",
                    "vrouwen", "kvinner", "kvinnor", "kvinder", "naiset", "kobiety"})
_RESERVE = frozenset({"ii", "b", "reserves", "reserve", "res", "2", "castilla", "atletic", "nextgen"})
#: in brackets only: "(F)" femenino / feminin, "(V)" vrouwen, "(W)"
_WOMEN_MARK = frozenset({"f", "v"})
#: a bracket that says nothing of the side ("(N)" neutral ground, "(ENG)" a country, "(1)" a seed): ignored;
#: any other bracket ("(Ivan)": an e-soccer player) is part of the name — it must agree
_IGNORED_BRACKET = re.compile(r"^([a-z]{1,3}|\d+|neutral|neutral venue|nv)$")
#: words that alone never name a club (a name cut down to one of them identifies nothing)
_GENERIC = frozenset({"united", "city", "town", "county", "athletic", "rovers", "wanderers", "albion", "rangers",
                      "real", "sporting", "racing", "olympic", "club", "fc", "sc", "saint", "new", "north", "south",
                      "east", "west", "western", "eastern", "northern", "southern", "central", "royal"})
#: sports of individuals: a player is often shown by surname alone ("Norrie" for "Cameron Norrie")
_INDIVIDUAL = frozenset({"tennis", "mma", "boxing", "darts", "snooker", "table_tennis", "badminton", "golf",
                         "squash"})
_YOUTH = re.compile(r"^(u\d{2}|under\d{2}|youth|academy|juniors?|jnr|primavera|juvenil|olympic)$")
#: "U-21s", "Under 21", "Under-23s", "Sub-20", "U 19" → "U21" …
_AGE = re.compile(r"\b(?:u|under|sub)[\s-]?(\d{2})s?\b", re.IGNORECASE)
#: words that, left over beside a name, make it another side (see :func:`_part_of`)
_QUALIFIER_WORDS = (_WOMEN | _RESERVE | {"jong", "next", "gen", "youth", "academy", "juniors", "junior", "jnr",
                                         "primavera", "juvenil", "olympic", "under", "sub"}) - {"w", "b", "2"}
#: a club's number ("1. FSV Mainz 05", "Bayer 04 Leverkusen", "Hannover 96"): no identity; a year (1860) stays
_CLUB_NUMBER = re.compile(r"^\d{1,2}$")
#: nicknames a bookmaker uses that no spelling rule can derive (folded → folded)
_ALIASES: dict[str, str] = {
    "spurs": "tottenham hotspur", "wolves": "wolverhampton wanderers", "man city": "manchester city",
    "man utd": "manchester united", "psg": "paris saint germain", "inter": "internazionale",
    "inter milan": "internazionale", "gladbach": "borussia monchengladbach", "bayern": "bayern munich",
    "bayern munchen": "bayern munich", "atletico": "atletico madrid", "barca": "barcelona",
    "sheff utd": "sheffield united", "sheff wed": "sheffield wednesday", "qpr": "queens park rangers",
    "wba": "west bromwich albion", "west brom": "west bromwich albion", "nottm forest": "nottingham forest",
    "brighton": "brighton hove albion", "brighton and hove albion": "brighton hove albion",
}


@dataclass(frozen=True, slots=True)
class TeamName:
    """A participant's name folded for comparison: ``tokens`` (noise
    dropped, abbreviations expanded) and ``qualifiers`` (``women``,
    ``youth:u21``, ``reserve``) that must agree."""

    tokens: tuple[str, ...]
    qualifiers: frozenset[str]

    @property
    def core(self) -> str:
        return " ".join(self.tokens)


def team_name(name: str, aliases: Mapping[str, str] | None = None) -> TeamName:
    """Fold one participant's name (see the module docstring)."""
    return _team_name(name, tuple(sorted((aliases or {}).items())))


@lru_cache(maxsize=65536)
def _team_name(name: str, aliases: tuple[tuple[str, str], ...]) -> TeamName:
    raw = _AGE.sub(r"U\1", name)
    quals: set[str] = set()
    # "(W)", "(F)", "(Women)", "(Res)", "(U21)" in brackets; "(Ivan)" (an e-soccer player) kept as a tag
    for inner in re.findall(r"\(([^)]*)\)", raw):
        f = _fold(inner)
        if f in _WOMEN or f in _WOMEN_MARK:
            quals.add("women")
        elif f in _RESERVE or f == "r":
            quals.add("reserve")
        elif _YOUTH.match(f.replace(" ", "")):
            quals.add("youth:" + f.replace(" ", ""))
        elif f and not _IGNORED_BRACKET.match(f):
            quals.add("tag:" + f)
    raw = re.sub(r"\([^)]*\)", " ", raw)
    if raw.count(",") == 1:  # "Norrie, Cameron": surname first
        last, first = raw.split(",")
        raw = f"{first} {last}"
    tokens = _fold(raw).split()
    # the last word that is not club noise ("Arsenal W FC": the W is last)
    end = max((i for i, t in enumerate(tokens) if t not in _NOISE), default=len(tokens) - 1)
    out: list[str] = []
    for i, t in enumerate(tokens):
        if t in _WOMEN and (t != "w" or i == end) and i > 0:
            quals.add("women")
            continue
        if t in _RESERVE and i > 0 and (t != "b" and t != "2" or i == end):
            quals.add("reserve")
            continue
        if i == 0 and t == "jong" and len(tokens) > 1:  # "Jong Ajax": Ajax's reserves
            quals.add("reserve")
            continue
        if t == "next" and i > 0 and i + 1 < len(tokens) and tokens[i + 1] == "gen":  # "Juventus Next Gen"
            quals.add("reserve")
            continue
        if t == "gen" and i > 0 and tokens[i - 1] == "next":
            continue
        if _YOUTH.match(t) and i > 0:
            quals.add("youth:" + t.replace("under", "u"))
            continue
        if (t in _NOISE or _CLUB_NUMBER.match(t)) and len(tokens) > 1:
            continue
        out.append(_EXPAND.get(t, t))
    core = " ".join(out)
    extra = dict(aliases)
    whole = " ".join(tokens)
    alias = extra.get(core) or extra.get(whole) or _ALIASES.get(core) or _ALIASES.get(whole)
    if alias is not None:
        out = alias.split()
    return TeamName(tuple(out) or tuple(tokens), frozenset(quals))


_SIDES = re.compile(r"\s+(?:v|vs\.?|versus|-|–|—|@|/)\s+", re.IGNORECASE)


def participants(rec: EventRecord) -> tuple[str, str] | None:
    """(home, away) of a team event: the record's own fields, else read
    from its name ("Home v Away", "Home vs Away", "Home - Away", US-style
    "Away @ Home"); None when it has no two sides (an outright, a race)."""
    if rec.home and rec.away:
        return rec.home, rec.away
    if not rec.name:
        return None
    m = _SIDES.search(rec.name)
    if m is None:
        return None
    a, b = rec.name[: m.start()].strip(), rec.name[m.end():].strip()
    if not a or not b:
        return None
    if m.group(0).strip() == "@":
        return b, a
    return a, b


#: longest name (words) read as an abbreviation of another, and most steps of that search
ABBREVIATION_MAX_WORDS = 12
ABBREVIATION_MAX_STEPS = 5_000


def _abbreviates(short: tuple[str, ...], long: tuple[str, ...]) -> bool:
    """Every word of ``short`` is a word of ``long``, a prefix of one, or the
    initials of consecutive ones, one word at least is whole or a prefix of
    three letters or more, and nothing of ``long`` is left over. Every way of
    reading the words is tried ("la" in ``LA Lakers`` / ``Los Angeles Lakers``
    is a prefix of "lakers" but the initials of "los angeles").

    Bounded: names of more than ``ABBREVIATION_MAX_WORDS`` words are not read as
    abbreviations, and the search gives up (False) after ``ABBREVIATION_MAX_STEPS``
    steps — the ways of reading grow exponentially with the words, and a
    provider's name ("Ab Ab Ab …") must not hold the ingest's event loop."""
    if not short or len(short) > len(long) or len(long) > ABBREVIATION_MAX_WORDS:
        return False
    used = [False] * len(long)
    budget = [ABBREVIATION_MAX_STEPS]

    def fit(i: int, strong: bool) -> bool:
        if i == len(short):
            return strong and all(used)
        budget[0] -= 1
        if budget[0] < 0:
            return False
        s = short[i]
        for j, w in enumerate(long):  # the same word or a prefix
            if not used[j] and w.startswith(s):
                used[j] = True
                if fit(i + 1, strong or w == s or len(s) >= 3):
                    return True
                used[j] = False
        if len(s) >= 2:  # initials of consecutive words: "ws" = western sydney
            for j in range(len(long) - len(s) + 1):
                if not any(used[j:j + len(s)]) and all(long[j + k][0] == s[k] for k in range(len(s))):
                    used[j:j + len(s)] = [True] * len(s)
                    if fit(i + 1, strong or len(s) >= 3):  # "png" = papua new guinea
                        return True
                    used[j:j + len(s)] = [False] * len(s)
        return False

    return fit(0, False)


def _part_of(short: tuple[str, ...], long: tuple[str, ...], individual: bool) -> bool:
    """``short`` names the first words of ``long`` ("Central Coast" for
    "Central Coast Mariners", "Perth" for "Perth Glory") or its last words
    ("Cavaliers" for "Cleveland Cavaliers", a player's surname) — never a
    word that alone names nothing (``United``, ``City``), and never when a
    word left over makes ``long`` another side (``Women``, ``Castilla``,
    ``Jong``, ``U21`` …: :data:`_QUALIFIER_WORDS`)."""
    k = len(short)
    if k >= len(long) or all(t in _GENERIC for t in short) or sum(map(len, short)) < 3:
        return False

    def other_side(rest: tuple[str, ...]) -> bool:
        return any(t in _QUALIFIER_WORDS or _YOUTH.match(t) for t in rest)

    if not individual and not other_side(long[k:]) and _abbreviates(short, long[:k]):
        return True
    if individual and all(len(t) == 1 for t in long[k:]) and _abbreviates(short, long[:k]):
        return True  # "Ruud C." (surname, initials) for "Ruud"
    return not other_side(long[:-k]) and _abbreviates(short, long[-k:])


def name_similarity(a: TeamName, b: TeamName, sport: str | None = None) -> float:
    """How alike two participants' names are, 0–1 (0 when their qualifiers
    differ: a women's or reserve side is another team): 1 the same, 0.95 an
    abbreviation, 0.85 a part of the name (city alone, nickname alone, a
    player's surname), else rapidfuzz's ``token_sort_ratio``."""
    if a.qualifiers != b.qualifiers:
        return 0.0
    if a.tokens == b.tokens:
        return 1.0
    short, long = (a.tokens, b.tokens) if len(a.tokens) <= len(b.tokens) else (b.tokens, a.tokens)
    if _abbreviates(short, long):
        return 0.95
    if len(short) == len(long) and _abbreviates(long, short):
        return 0.95
    fuzzy = fuzz.token_sort_ratio(a.core, b.core) / 100.0
    if _part_of(short, long, sport in _INDIVIDUAL):
        return max(0.85, fuzzy)
    return fuzzy


def _time_factor(a: int, b: int, tolerance_ms: int) -> float | None:
    gap = abs(a - b)
    if gap > tolerance_ms:
        return None
    return 1.0 - 0.1 * gap / tolerance_ms


def match_score(a: EventRecord, b: EventRecord, *, tolerance_ms: int = TOLERANCE_MS,
                race_tolerance_ms: int = RACE_TOLERANCE_MS, aliases: Mapping[str, str] | None = None) -> float | None:
    """Confidence 0–1 that ``a`` and ``b`` are the same event; None when they
    cannot be (other sport, start times too far apart, different venue of
    a race) or cannot be told apart from another event: either record lacks
    its sport or its start time (the reverse fixture, next season's, a
    double-header's other game, the same names in another sport all look
    alike without them). Compare with :data:`LINK_THRESHOLD`."""
    got = match_detail(a, b, tolerance_ms=tolerance_ms, race_tolerance_ms=race_tolerance_ms, aliases=aliases)
    return got[0] if got is not None else None


def match_detail(a: EventRecord, b: EventRecord, *, tolerance_ms: int = TOLERANCE_MS,
                 race_tolerance_ms: int = RACE_TOLERANCE_MS, aliases: Mapping[str, str] | None = None
                 ) -> tuple[float, bool] | None:
    """(:func:`match_score`, reversed): reversed when ``b`` names the sides
    the other way round from ``a``."""
    sa, sb = canonical_sport(a.sport), canonical_sport(b.sport)
    if sa is None or sb is None or sa != sb or a.start_time is None or b.start_time is None:
        return None
    if sa in RACING:
        race = _race_score(a, b, race_tolerance_ms)
        return (race, False) if race is not None else None
    tf = _time_factor(a.start_time, b.start_time, tolerance_ms)
    if tf is None:
        return None
    names = _names_detail(a, b, sa, aliases)
    if names is None:
        return None
    score, rev = names[0] * tf, names[1]
    if participants(a) is None:  # outrights: the whole name, no competition hint
        return score, False
    ca, cb = _fold(a.competition or ""), _fold(b.competition or "")
    if len(ca) >= 4 and len(cb) >= 4:  # a country code ("IT") says nothing either way
        c = fuzz.token_set_ratio(ca, cb) / 100.0
        if c >= 0.6:
            score += 0.02
        elif c < 0.3:
            score -= 0.05
    return max(0.0, min(1.0, score)), rev


def _names_detail(a: EventRecord, b: EventRecord, sport: str | None, aliases: Mapping[str, str] | None
                  ) -> tuple[float, bool] | None:
    """How alike the names are (0–1, a reversed reading at a small discount)
    and whether ``b`` names the sides the other way round from ``a``; None
    when one has two sides and the other not. Neither time nor sport looked at."""
    pa, pb = participants(a), participants(b)
    if pa is None or pb is None:
        if pa is not None or pb is not None or not a.name or not b.name:
            return None
        na, nb = team_name(a.name, aliases), team_name(b.name, aliases)  # outrights: the whole name
        return name_similarity(na, nb), False
    ha, aa = team_name(pa[0], aliases), team_name(pa[1], aliases)
    hb, ab = team_name(pb[0], aliases), team_name(pb[1], aliases)
    direct = min(name_similarity(ha, hb, sport), name_similarity(aa, ab, sport))
    swapped = min(name_similarity(ha, ab, sport), name_similarity(aa, hb, sport)) * 0.97
    return max(direct, swapped), swapped > direct


def _venue(rec: EventRecord) -> str | None:
    v = rec.venue
    if not v and rec.name:  # "Bendigo (AUS) 1st Jul", "Bendigo R1"
        v = re.split(r"\s*\(|\s+R(?:ace)?\s*\d+\b|\s+\d", rec.name, maxsplit=1)[0]
    return _fold(v) if v else None


def _race_score(a: EventRecord, b: EventRecord, tolerance_ms: int) -> float | None:
    if a.start_time is None or b.start_time is None:
        return None
    gap = abs(a.start_time - b.start_time)
    if gap > tolerance_ms:
        return None
    va, vb = _venue(a), _venue(b)
    if not va or not vb:
        return None
    if va == vb:
        sim = 1.0
    else:
        ta, tb = tuple(va.split()), tuple(vb.split())
        short, long = (ta, tb) if len(ta) <= len(tb) else (tb, ta)
        if _abbreviates(short, long) or (short and long[: len(short)] == short):  # "Kembla" = Kembla Grange
            sim = 0.95
        else:
            sim = fuzz.ratio(va, vb) / 100.0
    if sim < 0.9:
        return None
    return sim * (1.0 - 0.05 * gap / tolerance_ms)


# -- overrides ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Overrides:
    """Manual links (``mappings.yaml``)::

        pin:                      # these provider events are one event
          - [bf:33623427, pn:1590000001, toa:8492e37d…]
          - {id: ev:derby, events: [bf:1, px:f1]}     # … under this canonical id
        forbid:                   # never link these two
          - [bf:33623427, toa:0c1d2e3f…]
        aliases:                  # extra team spellings (folded) → the name they mean
          gunners: arsenal

    Raises ConfigError (saying what to fix) for a malformed file.
    """

    pins: tuple[tuple[str | None, frozenset[str]], ...] = ()
    forbids: frozenset[frozenset[str]] = frozenset()
    aliases: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_data(cls, data: Any, where: str = "mappings") -> "Overrides":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with pin / forbid / aliases, got {type(data).__name__}")
        unknown = set(data) - {"pin", "forbid", "aliases"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; valid: pin, forbid, aliases")
        pins: list[tuple[str | None, frozenset[str]]] = []
        for i, item in enumerate(data.get("pin") or []):
            cid = None
            if isinstance(item, dict):
                cid, item = item.get("id"), item.get("events")
                if cid is not None and (not isinstance(cid, str) or not cid.startswith(CANONICAL_PREFIX)):
                    raise ConfigError(f"{where}: pin[{i}].id must be a string starting with {CANONICAL_PREFIX!r}")
            if not isinstance(item, list) or len(item) < 2 or not all(isinstance(x, str) and x for x in item):
                raise ConfigError(f"{where}: pin[{i}] must list two or more event ids")
            pins.append((cid, frozenset(item)))
        forbids = set()
        for i, item in enumerate(data.get("forbid") or []):
            if not isinstance(item, list) or len(item) != 2 or not all(isinstance(x, str) and x for x in item):
                raise ConfigError(f"{where}: forbid[{i}] must be a pair of event ids")
            forbids.add(frozenset(item))
        aliases = data.get("aliases") or {}
        if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in aliases.items()):
            raise ConfigError(f"{where}: aliases must map a spelling to the name it means")
        return cls(tuple(pins), frozenset(forbids), {_fold(k): _fold(v) for k, v in aliases.items()})

    def fingerprint(self) -> str:
        """A digest of the overrides (links are rebuilt when it changes)."""
        text = repr((sorted((c or "", sorted(p)) for c, p in self.pins), sorted(sorted(f) for f in self.forbids),
                     sorted(self.aliases.items())))
        return hashlib.sha1(text.encode()).hexdigest()[:12]


# -- the matcher ----------------------------------------------------------------------------------

_DAY_MS = 86_400_000


class Matcher:
    """Links records to canonical events (see the module docstring).

    tolerance_ms: largest start-time gap of one team event across
    providers; threshold: the least confidence of a link.
    """

    def __init__(self, overrides: Overrides | None = None, *, tolerance_ms: int = TOLERANCE_MS,
                 race_tolerance_ms: int = RACE_TOLERANCE_MS, threshold: float = LINK_THRESHOLD) -> None:
        self.overrides = overrides or Overrides()
        self.tolerance_ms = tolerance_ms
        self.race_tolerance_ms = race_tolerance_ms
        self.threshold = threshold
        self.records: dict[str, EventRecord] = {}
        self.links: dict[str, Link] = {}
        self.events: dict[str, CanonicalEvent] = {}
        self._buckets: dict[tuple[str | None, int], set[str]] = {}
        self._pin_of: dict[str, tuple[str | None, frozenset[str]]] = {}
        for pin in self.overrides.pins:
            for eid in pin[1]:
                self._pin_of[eid] = pin

    def link_all(self, records: Iterable[EventRecord]) -> None:
        """Link records in the order given (first seen first), then look again
        at records left alone (:meth:`relink_alone`)."""
        for rec in records:
            self.link(rec)
        self.relink_alone()

    def relink_alone(self) -> int:
        """A record linked to nothing (its own canonical event, nobody joined)
        may have arrived before the records it matches had their names: try
        it again against every other event. Returns how many moved. Events
        with several records are never merged (their ids stay stable)."""
        moved = 0
        order = {cid: i for i, cid in enumerate(self.events)}
        for cid, ev in list(self.events.items()):
            if cid not in self.events or len(ev.members) != 1:
                continue
            rid = ev.members[0]
            if self.links[rid].method != "self":
                continue
            rec = self.records[rid]
            found = self._best(rec, exclude=cid)
            if found is None:
                continue
            target = self.events[found.canonical_id]
            if len(target.members) == 1 and order.get(found.canonical_id, 0) > order[cid]:
                continue  # two lone records: the later one joins the earlier (its id stays)
            self._remove(rid)
            self.records[rid] = rec
            self.events[found.canonical_id].members.append(rid)
            self.links[rid] = found
            moved += 1
        return moved

    def link(self, rec: EventRecord) -> Link:
        """Link (or re-link, when its description changed) one record; returns its link.

        A changed record linked with others is scored again against its
        canonical event (:meth:`_rescore`): it stays, its ``reversed`` flag
        recomputed, or leaves and is linked afresh; when it is the event's
        anchor (whose sides are the canonical sides) every other member is
        scored again. A changed record alone is linked afresh; a pinned one
        keeps its pin."""
        old = self.records.get(rec.event_id)
        if old is None:
            return self._link_new(rec)
        if old == rec:
            return self.links[rec.event_id]
        ev = self.events[self.links[rec.event_id].canonical_id]
        self.records[rec.event_id] = rec
        if ev.anchor.event_id == rec.event_id:
            ev.anchor = rec
            self._reindex(ev)
        return self._changed(rec.event_id)

    def _changed(self, event_id: str) -> Link:
        """The record ``self.records[event_id]`` (already in place, and the
        anchor when it is one) is not the one its link was scored on: score it
        again as :meth:`link` says (shared by a live change and :meth:`restore`)."""
        link = self.links[event_id]
        ev = self.events[link.canonical_id]
        if len(ev.members) > 1:
            self._rescore(ev, event_id)
            return self.links[event_id]
        if link.method == "pinned":
            return link
        rec = self.records[event_id]
        self._remove(event_id)  # alone: look again with the new description (names arrived)
        return self._link_new(rec)

    def _link_new(self, rec: EventRecord) -> Link:
        """Link a record the matcher does not hold (a pin, the best event, else its own)."""
        self.records[rec.event_id] = rec
        found = self._pinned(rec) or self._best(rec)
        if found is None:
            cid = CANONICAL_PREFIX + rec.event_id
            self.events[cid] = CanonicalEvent(cid, rec, [])
            self._index(cid, rec)
            found = Link(cid, 1.0, "self")
        link = found
        ev = self.events[link.canonical_id]
        ev.members.append(rec.event_id)
        self.links[rec.event_id] = link
        return link

    def restore(self, records: Iterable[EventRecord], links: Mapping[str, Link],
                changed: Collection[str] = frozenset()) -> list[str]:
        """Put records back into the canonical events ``links`` (record id →
        link, as stored) gives them, first seen first — a new linker keeps
        the canonical ids; records without a link wait for :meth:`link`.

        ``changed``: record ids whose record is not the one their stored link
        was scored on (it changed while no linker ran, or the link was stored
        without saying which record it was scored on). Once every record is
        back (and each event anchored: :meth:`_restore_anchor`), each of
        them that was restored is scored again, first seen first, as
        :meth:`link` scores a changed record — its ``reversed`` flag
        recomputed, or it leaves and is linked afresh; a changed anchor has
        every member of its event scored again. Returns the ids scored again."""
        order: list[str] = []
        for rec in records:
            link = links.get(rec.event_id)
            if link is None or rec.event_id in self.records:
                continue
            self.records[rec.event_id] = rec
            order.append(rec.event_id)
            ev = self.events.get(link.canonical_id)
            if ev is None:
                ev = self.events[link.canonical_id] = CanonicalEvent(link.canonical_id, rec, [])
                self._index(link.canonical_id, rec)
            ev.members.append(rec.event_id)
            self.links[rec.event_id] = link
        for ev in self.events.values():
            self._restore_anchor(ev)
        again = [rid for rid in order if rid in changed]
        for rid in again:
            if rid in self.links:
                self._changed(rid)
        return again

    def _restore_anchor(self, ev: CanonicalEvent) -> None:
        """The anchor (whose sides are the canonical sides the stored
        ``reversed`` flags refer to) is the record the canonical id is named
        after, else the first member not reversed — not whichever record was
        loaded first."""
        ids = ev.members
        named = [m for m in ids if CANONICAL_PREFIX + m == ev.canonical_id]
        pick = named or [m for m in ids if not self.links[m].reversed] or ids[:1]
        if pick and pick[0] != ev.anchor.event_id:
            ev.anchor = self.records[pick[0]]
            ids.remove(pick[0])
            ids.insert(0, pick[0])
            self._reindex(ev)

    def event_of(self, event_id: str) -> str | None:
        """The canonical id of a record (None when not linked)."""
        link = self.links.get(event_id)
        return link.canonical_id if link is not None else None

    # -- internals --------------------------------------------------------------------------------

    def _remove(self, event_id: str) -> None:
        link = self.links.pop(event_id)
        ev = self.events[link.canonical_id]
        ev.members.remove(event_id)
        if not ev.members:
            del self.events[link.canonical_id]
            for ids in self._buckets.values():
                ids.discard(link.canonical_id)
        del self.records[event_id]

    def _reindex(self, ev: CanonicalEvent) -> None:
        for ids in self._buckets.values():
            ids.discard(ev.canonical_id)
        self._index(ev.canonical_id, ev.anchor)

    def _rescore(self, ev: CanonicalEvent, changed: str) -> None:
        """Score again the members of ``ev`` from ``changed`` on (all of them
        when it is the anchor), each against the anchor and the members kept
        before it, as :meth:`_best` scored them when they joined: a member
        that still reaches the threshold stays, its confidence and
        ``reversed`` flag recomputed; one that no longer does (or whose new
        sport / start time rules it out) leaves and is linked afresh. A pinned
        member stays; only its flag is recomputed."""
        anchor = ev.anchor.event_id
        order = [anchor] + [m for m in ev.members if m != anchor]
        start = 1 if changed == anchor else order.index(changed)
        kept, dropped = order[:start], []
        aliases = self.overrides.aliases
        for rid in order[start:]:
            rec, link = self.records[rid], self.links[rid]
            if link.method == "pinned":
                self.links[rid] = Link(link.canonical_id, link.confidence, link.method, self._orientation(rec, anchor))
                kept.append(rid)
                continue
            top: tuple[float, bool] | None = None
            for m in kept:
                got = match_detail(self.records[m], rec, tolerance_ms=self.tolerance_ms,
                                   race_tolerance_ms=self.race_tolerance_ms, aliases=aliases)
                if got is not None and (top is None or got[0] > top[0]):
                    top = (got[0], got[1] != self.links[m].reversed)
            if top is None or top[0] < self.threshold:
                dropped.append(rid)
                continue
            method = "venue_time" if canonical_sport(rec.sport) in RACING else "fuzzy"
            self.links[rid] = Link(ev.canonical_id, round(top[0], 3), method, top[1])
            kept.append(rid)
        for rid in dropped:
            rec = self.records[rid]
            self._remove(rid)
            self.link(rec)

    def _index(self, cid: str, rec: EventRecord) -> None:
        day = rec.start_time // _DAY_MS if rec.start_time is not None else -1
        self._buckets.setdefault((canonical_sport(rec.sport), day), set()).add(cid)

    def _candidates(self, rec: EventRecord) -> set[str]:
        sport = canonical_sport(rec.sport)
        if rec.start_time is None:
            return {c for (s, _), ids in self._buckets.items() if s == sport or s is None or sport is None
                    for c in ids}
        day = rec.start_time // _DAY_MS
        out: set[str] = set()
        for (s, d), ids in self._buckets.items():
            if (s == sport or s is None or sport is None) and (d == -1 or abs(d - day) <= 1):
                out |= ids
        return out

    def _forbidden(self, rec: EventRecord, ev: CanonicalEvent) -> bool:
        forbids = self.overrides.forbids
        return bool(forbids) and any(frozenset((rec.event_id, m)) in forbids for m in ev.members)

    def _orientation(self, rec: EventRecord, member: str) -> bool:
        """Whether ``rec`` names the sides the other way round from the
        canonical event that ``member`` (a linked record) belongs to (by the
        names alone: a pinned record may lack its time or sport)."""
        other = self.records[member]
        sport = canonical_sport(other.sport) or canonical_sport(rec.sport)
        got = None if sport in RACING else _names_detail(other, rec, sport, self.overrides.aliases)
        rev = got is not None and got[1]
        return rev != self.links[member].reversed

    def _pinned(self, rec: EventRecord) -> Link | None:
        pin = self._pin_of.get(rec.event_id)
        if pin is None:
            return None
        cid, group = pin
        for other in group:
            link = self.links.get(other)
            if link is not None and other != rec.event_id:
                return Link(link.canonical_id, 1.0, "pinned", self._orientation(rec, other))
        cid = cid or CANONICAL_PREFIX + rec.event_id
        if cid not in self.events:
            self.events[cid] = CanonicalEvent(cid, rec, [])
            self._index(cid, rec)
        return Link(cid, 1.0, "pinned")

    def _best(self, rec: EventRecord, exclude: str | None = None) -> Link | None:
        """The canonical event ``rec`` joins: the best-scoring one at or above
        the threshold — None when ``rec`` lacks its sport or start time, or
        when another event scores within :data:`AMBIGUITY_MARGIN` of the best
        (a double-header's two games: which one is meant is a guess). Racing:
        the race time is the race, the nearer race wins; only a tie is
        ambiguous."""
        if rec.start_time is None or canonical_sport(rec.sport) is None:
            return None
        scored: list[tuple[float, str, bool]] = []
        racing = canonical_sport(rec.sport) in RACING
        aliases = self.overrides.aliases
        for cid in self._candidates(rec):
            if cid == exclude:
                continue
            ev = self.events[cid]
            if any(self.records[m].source == rec.source for m in ev.members):
                continue  # one source lists one real event once
            if self._forbidden(rec, ev):
                continue
            top: tuple[float, bool] | None = None
            for m in ev.members:
                got = match_detail(self.records[m], rec, tolerance_ms=self.tolerance_ms,
                                   race_tolerance_ms=self.race_tolerance_ms, aliases=aliases)
                if got is not None and (top is None or got[0] > top[0]):
                    top = (got[0], got[1] != self.links[m].reversed)  # relative to the canonical sides
            if top is not None:
                scored.append((top[0], cid, top[1]))
        if not scored:
            return None
        scored.sort(reverse=True)
        best = scored[0]
        if best[0] < self.threshold:
            return None
        margin = 0.0 if racing else AMBIGUITY_MARGIN
        if len(scored) > 1 and best[0] - scored[1][0] < margin + 1e-9:
            return None
        return Link(best[1], round(best[0], 3), "venue_time" if racing else "fuzzy", best[2])
