"""The Odds API v4 (``/v4/sports/{sport}/odds``) → canonical market updates.

Pure: response bodies in, :class:`~feed.normalise.base.MarketUpdate` objects
out; no I/O, no clock reads (``recv_ms`` comes in). The API has no cursor
and no status (``research/upstream.md`` §4): every call returns the full
current snapshot — events → bookmakers → markets → outcomes, with
``last_update`` per bookmaker and per market — and suspension is implicit:
a bookmaker or market that is not offered is simply absent. So this
normaliser is **snapshot-diff**:

- it keeps what it emitted for every market and emits only what changed
  (an image the first time a market is seen, then deltas);
- a market it emitted that is absent from a later snapshot *of the same
  scope* (the sport key the call was for, told with :meth:`expect`;
  otherwise the sport keys present in the body) becomes SUSPENDED
  (``not_offered``, prices kept) and is forgotten, so a return is a fresh
  image;
- a market whose ``last_update`` is older than what was emitted (a lagging
  replica) is left alone (counted in ``dropped["stale_market"]``).

Canonical ids, one market per (event, bookmaker, market key, line)::

    toa:<eventId>:<bookmaker>:h2h                      (no points: h2h_h1, btts …)
    toa:<eventId>:<bookmaker>:spreads:<home point>     (the spreads family)
    toa:<eventId>:<bookmaker>:totals:<points>          (the totals family, props)

**Market key families.** A key is ``[alternate_]<base>[_<part>]``: base
``h2h``, ``h2h_3_way``, ``spreads``, ``totals``, ``team_totals`` …; part a
game period (``h1``, ``h2``, ``q1``…``q4``, ``p1``…``p3``,
``1st_<n>_innings``) or a soccer special (``corners``, ``cards``).

- The **spreads family** (``spreads``, ``alternate_spreads`` and every
  ``[alternate_]spreads_<part>``: ``spreads_h1``, ``alternate_spreads_q3``,
  ``spreads_p1``, ``spreads_1st_5_innings``, ``alternate_spreads_corners``
  …): each outcome carries its own side's point (Celtics −1.5 / Heat +1.5
  are one line), so both outcomes file under the **home** point: the home
  outcome's point, the away outcome's point negated. ``line`` (id and
  specifier) = the home point; each selection's ``handicap`` = its own
  point. So Celtics +1.5 / Heat −1.5 is the line ``1.5`` and never the
  "away" side of ``-1.5``.
- The **totals family** (``[alternate_][team_]totals[_<part>]``): Over and
  Under share one point, the ``line``; ``handicap`` 0, names ``Over 2.5``.
  ``team_totals`` outcomes name the team in ``description``: selection ids
  ``<team>:over`` (no ``team`` specifier).
- Other keys with points (``player_*`` props …): ``line`` = the outcome's
  point, which is also its ``handicap``.

market_type: the canonical type of :mod:`feed.taxonomy` (``h2h`` →
``match_result`` when a Draw is offered, else ``moneyline``;
``h2h_3_way`` → ``match_result`` always; the spreads family →
``handicap``; totals → ``total``; ``[alternate_]team_totals`` →
``team_total``; ``btts``, ``draw_no_bet``, ``player_*`` props; unknown
keys → ``raw:<key>``) with ``period`` from the
key's period part (``h1`` → ``1h``, ``h2`` → ``2h``, ``q1``…``q4``,
``p1``…``p3`` as they are, ``1st_5_innings`` → ``f5``); a key whose part
has no canonical name (``1st_3_innings``, ``corners``, ``cards``) stays
``raw:<key>``, its outcomes still paired by its family's rule.
``specifiers`` carry the canonical ``line`` and ``sport_key`` (the scope,
needed to resume after a restart). Selection ids (and their ``outcome``):
``home`` / ``away`` / ``draw`` (matched on the event's team names),
``over`` / ``under``, else the outcome name lower-cased; an outcome with a
``description`` (a player, a team) → ``<description slug>:<id>``.
``in_play`` = ``commence_time <= recv_ms``. Prices: decimal, or American with
``odds_format="american"``, converted and validated by :mod:`feed.odds`
(rounded against the bettor: down, these are prices offered to back).

**Lay markets are not carried.** An exchange's ``h2h_lay`` (any market key
ending ``_lay``) holds *lay* odds. ``Selection.price`` is the best price to
*back* (a price check on the back side reads it), so a lay price must never
sit there; and the lay side of the model is a ladder of ``[price, size]``
levels, where the API gives no size (size 0 means "nothing offered", so no
level can be written honestly — the rule ``feed.normalise.betfair_csv``
follows for the CSV's sizeless lay). Such a market is therefore left out
(counted in ``dropped["lay_market"]`` per bookmaker market per body); one
emitted before (by an older version, restored from the store) is absent
from the next snapshot and so SUSPENDED (``not_offered``) like any market
that vanished. The exchange's back prices come in its ``h2h`` market as
usual.

Scores (``/v4/sports/{sport}/scores``, channel ``scores:<sport key>``):
every event that has started (``scores`` not null) or is ``completed``
becomes an :class:`~feed.models.EventState` of ``toa:<id>`` (the id its
markets carry): LIVE and in play while not completed, ENDED once it is;
the score = the ``score`` of the outcome named like ``home_team`` /
``away_team`` (text holding a whole number; cricket's ``"163/7"`` gives the
runs); ``source_ts`` = ``last_update`` (else the receive time). Events not
started yet say nothing and are skipped. An event whose scores do not
read is rejected alone (``event_id`` set). The batch asks the source for
more scores of the sport (``requests=["scores:<key>"]``) while an event is
in play; an odds answer asks for them for every sport key with an event
that has started.

Rejections: a body that is not a JSON array of events, or that carries
events of another sport than the one asked for, raises
:class:`FeedDecodeError` and applies nothing. Otherwise a bad part is
rejected alone and the rest applies:

- an *event* (unreadable, bad id / sport key / bookmaker or market key,
  ``commence_time`` outside 1970..2100 — ``invalid_time``);
- a *bookmaker market* (an invalid price — ``invalid_price``; a point
  beyond ±1000 — ``invalid_number``; duplicate outcomes or a market listed
  twice — ``invalid_schema``; a ``last_update`` outside 1970..2100 —
  ``invalid_time`` — or more than ``max_future_skew_ms`` after receipt —
  ``clock_skew``).

Each known canonical market of a rejected part is reported in
``batch.rejected`` (one entry with ``market_id`` None when none is known);
nothing of the part is applied and its markets are not suspended as vanished
(when an event cannot even be identified, nothing is suspended as vanished
by that body).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import msgspec

from feed.errors import FeedDecodeError
from feed.models import EventState, Market, MarketHeader, Score, Selection
from feed.normalise.base import NormalisedBatch, odds_format_of, remember
from feed.normalise.rendered import (
    MarketDiffer,
    Rendered,
    display_name,
    fmt_line,
    iso_to_ms,
    make_selection,
    price_to_decimal,
)
from feed.taxonomy import generic_market, is_unmapped
from feed.validate import MAX_FUTURE_SKEW_MS, MAX_HANDICAP, check_event_state, check_market, check_provider_time

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec

__all__ = ["TheOddsApiNormaliser", "market_family", "market_type_of", "sport_of"]

SOURCE_PREFIX = "toa:"

_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
#: the spreads family: ``spreads``, ``alternate_spreads``, ``spreads_h1``,
#: ``alternate_spreads_q3``, ``spreads_1st_5_innings``, ``alternate_spreads_corners`` …
#: (each outcome at its own side's point: filed under the home point)
_SPREADS = re.compile(r"^(?:alternate_)?spreads(?:_[a-z0-9_]+)?$")
#: the totals family: ``totals``, ``alternate_totals_q1``, ``team_totals_h1``,
#: ``alternate_team_totals`` … (Over and Under at one shared point)
_TOTALS = re.compile(r"^(?:alternate_)?(?:team_)?totals(?:_[a-z0-9_]+)?$")
#: a key of the first five innings (``spreads_1st_5_innings``): canonical period ``f5``
_FIRST_FIVE = "_1st_5_innings"
#: a market key ending so holds lay odds (``h2h_lay``, ``outrights_lay``): not carried
_LAY_SUFFIX = "_lay"

#: sport-key group prefix → canonical sport (``soccer_epl`` → ``soccer``)
_SPORT_GROUPS = {"americanfootball": "american_football", "icehockey": "ice_hockey", "mma": "mma",
                 "aussierules": "australian_rules", "rugbyleague": "rugby_league", "rugbyunion": "rugby_union"}


def market_family(key: str) -> Literal["spreads", "totals", None]:
    """The pairing family of an Odds API market key (see the module
    docstring): ``"spreads"`` (``spreads``, ``spreads_h1``,
    ``alternate_spreads_p2`` …: outcomes filed under the home point),
    ``"totals"`` (``totals_q1``, ``alternate_team_totals`` …: one shared
    point), else None (a point is the outcome's own line). Case-insensitive."""
    k = key.lower()
    if _SPREADS.match(k):
        return "spreads"
    if _TOTALS.match(k):
        return "totals"
    return None


def market_type_of(key: str, *, has_draw: bool | None = None, sport: str | None = None
                   ) -> tuple[str, dict[str, str]]:
    """An Odds API market key → (canonical type, specifiers found in the
    key: ``period``): :func:`feed.taxonomy.generic_market` (``spreads_h1`` →
    ``handicap`` ``period=1h``, ``h2h_3_way_p1`` → ``match_result``
    ``period=p1``) plus the Odds API's own forms: ``alternate_team_totals``
    (any period) → ``team_total``; ``<key>_1st_5_innings`` → the key's type
    with ``period=f5``; ``h2h_3_way`` (any period) is always
    ``match_result``: a three-way price (the draw loses) must never be read
    as a two-way moneyline's, even in a snapshot whose Draw outcome is
    missing. Anything else unknown → ``raw:<key>``. has_draw / sport: as for
    ``generic_market``."""
    k = key.lower()
    base, period = k, None
    if base.startswith("h2h_3_way"):
        has_draw = True
    if base.startswith("alternate_team_totals"):
        base = base[len("alternate_"):]
    if base.endswith(_FIRST_FIVE):
        base, period = base[: -len(_FIRST_FIVE)], "f5"
    mtype, spec = generic_market(base, has_draw=has_draw, sport=sport)
    if is_unmapped(mtype) or (period is not None and "period" in spec):
        return generic_market(key, has_draw=has_draw, sport=sport)
    if period is not None:
        spec["period"] = period
    return mtype, spec


def sport_of(sport_key: str) -> str:
    """``soccer_epl`` → ``soccer``, ``americanfootball_nfl`` → ``american_football``."""
    group = sport_key.split("_", 1)[0]
    return _SPORT_GROUPS.get(group, group)


# --- wire Structs ------------------------------------------------------------

Time = str | int | float  # ISO-8601 (dateFormat=iso) or unix seconds (dateFormat=unix)


class Outcome(msgspec.Struct, kw_only=True, gc=False):
    name: str
    price: float
    point: float | None = None
    description: str | None = None


class OddsMarket(msgspec.Struct, kw_only=True, gc=False):
    key: str
    last_update: Time | None = None
    outcomes: list[Outcome] = []


class Bookmaker(msgspec.Struct, kw_only=True, gc=False):
    key: str
    title: str | None = None
    last_update: Time | None = None
    markets: list[OddsMarket] = []


class Event(msgspec.Struct, kw_only=True, gc=False):
    id: str
    sport_key: str
    sport_title: str | None = None
    commence_time: Time | None = None
    home_team: str | None = None
    away_team: str | None = None
    bookmakers: list[Bookmaker] = []


class TeamScore(msgspec.Struct, kw_only=True, gc=False):
    name: str
    score: str | int | None = None


class ScoreEvent(msgspec.Struct, kw_only=True, gc=False):
    """One item of ``/scores``: ``scores`` null until the event starts."""

    id: str
    sport_key: str
    commence_time: Time | None = None
    completed: bool = False
    home_team: str | None = None
    away_team: str | None = None
    scores: list[TeamScore] | None = None
    last_update: Time | None = None


_DECODER = msgspec.json.Decoder(list[Event])
_SCORES_DECODER = msgspec.json.Decoder(list[ScoreEvent])
_SCORE_EVENT_DECODER = msgspec.json.Decoder(ScoreEvent)
_RUNS = re.compile(r"^\s*(\d{1,6})(?:\s*/\s*\d{1,2})?\s*$")
_RAW_LIST_DECODER = msgspec.json.Decoder(list[msgspec.Raw])
_EVENT_DECODER = msgspec.json.Decoder(Event)
_JSON_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError)


class _EventId(msgspec.Struct, gc=False):
    id: str


_EVENT_ID_DECODER = msgspec.json.Decoder(_EventId)


class _Rejected(Exception):
    """A part of the body (``prefix``: ``toa:<event>``, ``toa:<event>:<bookmaker>``
    or ``toa:<event>:<bookmaker>:<market key>``; None: unidentifiable) is rejected."""

    def __init__(self, prefix: str | None, error: FeedDecodeError) -> None:
        self.prefix = prefix
        self.error = error


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:64] or "x"


class TheOddsApiNormaliser:
    """Odds API snapshots → canonical market updates (see the module docstring).

    source: the source name; odds_format: ``decimal`` or ``american`` (the
    ``oddsFormat`` the poller asked for). ``dropped`` counts what was left
    out: ``stale_market`` (a lagging replica's older market), ``lay_market``
    (a ``*_lay`` market: lay odds are not carried, see the module docstring).
    """

    #: no live provider times (see Normaliser.live_provider_times)
    live_provider_times = False

    def __init__(self, source: str = "theoddsapi", *, odds_format: Literal["decimal", "american"] = "decimal",
                 max_future_skew_ms: int = MAX_FUTURE_SKEW_MS) -> None:
        self.source = source
        self.max_future_skew_ms = max_future_skew_ms
        self.odds_format = odds_format
        self.differ = MarketDiffer(source)
        self.scope_of: dict[str, str] = {}  # market id -> sport key
        self.dropped: Counter[str] = Counter()
        self.live_events: dict[str, set[str]] = {}  # sport key -> ids of events in play in the last snapshot
        #: the last event state emitted per event id
        self.states: dict[str, EventState] = {}

    def restore(self, markets: Iterable[Market], cursor: str | None = None) -> None:
        """Resume after a restart: remember the stored open markets of this
        source as emitted, so a market gone meanwhile is suspended (the
        source has no cursor: every poll is a full snapshot)."""
        mine = [m for m in markets if m.source == self.source and m.market_id.startswith(SOURCE_PREFIX)
                and m.status != "SUSPENDED" and m.specifiers and "sport_key" in m.specifiers]
        self.differ.seed(mine)
        for m in mine:
            assert m.specifiers is not None  # kept above only with a sport_key
            self.scope_of[m.market_id] = m.specifiers["sport_key"]

    def feed(self, raw: bytes, recv_ms: int, channel: str = "") -> NormalisedBatch:
        """Decode one odds response (a JSON array of events) and diff it
        against the previous snapshot. channel: the sport key the body
        answers (its scope for vanished markets; ``upcoming`` = every sport;
        empty: the sports the body holds). Raises :class:`FeedDecodeError`
        (``invalid_json``, ``invalid_schema``) for a body rejected whole, and
        then has applied nothing; parts rejected alone are in
        ``batch.rejected`` (see the module docstring)."""
        if channel.startswith("scores:") or (not channel and b'"completed"' in raw and b'"bookmakers"' not in raw):
            return self._feed_scores(raw, recv_ms, channel[7:] or None)
        expect = channel or None
        bad: dict[str | None, FeedDecodeError] = {}  # rejected part prefix -> why
        events = self._decode(raw, bad)
        if expect is not None and expect != "upcoming" and any(ev.sport_key != expect for ev in events):
            raise FeedDecodeError("invalid_schema", f"events of other sports in a {expect} response", raw)
        rendered: list[Rendered] = []
        live: dict[str, set[str]] = {}
        for ev in events:
            try:
                start = self._time(ev.commence_time, f"event {ev.id} commence_time", raw,
                                   prefix=f"{SOURCE_PREFIX}{ev.id}")
                rendered.extend(self._markets_of(ev, raw, recv_ms, start, bad))
            except _Rejected as rej:
                bad.setdefault(rej.prefix, rej.error)
                continue
            if start is not None and start <= recv_ms:
                live.setdefault(ev.sport_key, set()).add(ev.id)
        if expect is None or expect == "upcoming":
            scopes = {ev.sport_key for ev in events} if expect is None else None
        else:
            scopes = {expect}
        for key in scopes if scopes is not None else {ev.sport_key for ev in events}:
            keep = {e for e in self.live_events.get(key, ()) if f"{SOURCE_PREFIX}{e}" in bad}  # rejected: as before
            self.live_events[key] = live.get(key, set()) | keep
        counts: dict[str, int] = {}
        for r in rendered:
            counts[r.market_id] = counts.get(r.market_id, 0) + 1
        for mid, n in counts.items():
            if n > 1:
                bad.setdefault(mid, FeedDecodeError("invalid_schema", f"market {mid} appears {n} times", raw))
        prefixes = [p for p in bad if p is not None]
        batch = NormalisedBatch(op="odds")
        updates = batch.updates
        seen = set()
        for r in rendered:
            mid = r.market_id
            seen.add(mid)
            if prefixes and _under(mid, prefixes):
                continue
            prev = self.differ.emitted.get(mid)
            if prev is not None and r.source_ts < prev.source_ts:
                self.dropped["stale_market"] += 1
                continue
            try:  # the bounds every update must meet (checked on the parts already: a safety net)
                check_market(mid, r.header, r.selections, None, r.source_ts, None, recv_ms, self.max_future_skew_ms)
            except FeedDecodeError as exc:
                bad.setdefault(mid, FeedDecodeError(exc.reason, exc.detail, raw))
                continue
            u = self.differ.emit(r, recv_ms)
            specifiers = r.header.specifiers
            assert specifiers is not None  # _render always sets sport_key
            self.scope_of[mid] = specifiers["sport_key"]
            if u is not None:
                updates.append(u)
        if None not in bad:  # every event identified: what is absent has vanished
            prefixes = [p for p in bad if p is not None]
            for mid in sorted(self.scope_of):
                if mid in seen or (scopes is not None and self.scope_of[mid] not in scopes):
                    continue
                if prefixes and _under(mid, prefixes):
                    continue
                u = self.differ.suspend(mid, "not_offered", None, recv_ms)
                if u is not None:
                    updates.append(u)
                self.differ.forget(mid)
                del self.scope_of[mid]
        batch.rejected = self._rejections(bad, raw)
        batch.runner_changes = sum(len(u.selections) for u in updates)
        batch.in_play = any(self.live_events.get(k) for k in (scopes if scopes is not None else self.live_events))
        batch.requests = sorted(f"scores:{k}" for k, ids in live.items() if ids)
        return batch

    def _feed_scores(self, raw: bytes, recv_ms: int, expect: str | None) -> NormalisedBatch:
        """One ``/scores`` answer → event states (see the module docstring)."""
        batch = NormalisedBatch(op="scores")
        try:
            events = _SCORES_DECODER.decode(raw)
        except msgspec.ValidationError:
            events = self._decode_scores_by_event(raw, batch)
        except _JSON_ERRORS as exc:
            raise FeedDecodeError("invalid_json", str(exc), raw) from None
        if expect is not None and any(ev.sport_key != expect for ev in events):
            raise FeedDecodeError("invalid_schema", f"scores of other sports in a {expect} response", raw)
        live: set[str] = set()
        for ev in events:
            if ev.scores is None and not ev.completed:
                continue  # not started: nothing to say
            eid = f"{SOURCE_PREFIX}{ev.id}"
            try:
                if not _ID.match(ev.id):
                    raise FeedDecodeError("invalid_schema", f"event id {ev.id[:80]!r}")
                ts = iso_to_ms(ev.last_update)
                if ts is not None:
                    check_provider_time(ts, recv_ms, self.max_future_skew_ms, f"event {ev.id} last_update")
                score = self._score_of(ev)
                prev = self.states.get(eid)
                ts = max(ts or recv_ms, prev.source_ts if prev is not None else 0)
                state = EventState(event_id=eid, source=self.source, status="ENDED" if ev.completed else "LIVE",
                                   in_play=not ev.completed, score=score, source_ts=ts, received_at=recv_ms)
                check_event_state(state, recv_ms, max_future_skew_ms=self.max_future_skew_ms)
            except FeedDecodeError as exc:
                batch.rejected.append(FeedDecodeError(exc.reason, exc.detail, raw, event_id=eid))
                continue
            if not ev.completed:
                live.add(ev.sport_key)
            if not state.same_content(prev):
                remember(self.states, eid, state)
                batch.event_states.append(state)
        batch.requests = sorted(f"scores:{k}" for k in live)
        batch.in_play = bool(live)
        return batch

    @staticmethod
    def _decode_scores_by_event(raw: bytes, batch: NormalisedBatch) -> list[ScoreEvent]:
        try:
            parts = _RAW_LIST_DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            raise FeedDecodeError("invalid_schema", str(exc), raw) from None
        except _JSON_ERRORS as exc:
            raise FeedDecodeError("invalid_json", str(exc), raw) from None
        out = []
        for i, part in enumerate(parts):
            try:
                out.append(_SCORE_EVENT_DECODER.decode(part))
            except (msgspec.ValidationError, *_JSON_ERRORS) as exc:
                try:
                    eid: str | None = f"{SOURCE_PREFIX}{_EVENT_ID_DECODER.decode(part).id}"
                except (msgspec.ValidationError, *_JSON_ERRORS):
                    eid = None
                batch.rejected.append(FeedDecodeError("invalid_schema", f"scores event {i}: {exc}", raw,
                                                      event_id=eid))
        return out

    @staticmethod
    def _score_of(ev: ScoreEvent) -> Score | None:
        """The event's score from its per-team ``score`` texts (None: none given)."""
        if not ev.scores:
            return None
        by_name = {t.name: t.score for t in ev.scores}
        if ev.home_team not in by_name or ev.away_team not in by_name:
            raise FeedDecodeError("invalid_schema", f"scores of event {ev.id} do not name its home and away teams")
        out = []
        for side in (by_name[ev.home_team], by_name[ev.away_team]):
            if isinstance(side, int) and not isinstance(side, bool) and side >= 0:
                out.append(side)
                continue
            m = _RUNS.match(side) if isinstance(side, str) else None
            if m is None:
                raise FeedDecodeError("invalid_number", f"score {side!r:.40} of event {ev.id} is not a whole number")
            out.append(int(m.group(1)))
        return Score(home=out[0], away=out[1])

    # -- internals ------------------------------------------------------------

    def _rejections(self, bad: dict[str | None, FeedDecodeError], raw: bytes) -> list[FeedDecodeError]:
        """One entry per known market under each rejected part (one with
        ``market_id`` None when none is known)."""
        out: list[FeedDecodeError] = []
        emitted = self.differ.emitted
        for prefix, exc in bad.items():
            mids = sorted(m for m in emitted if _under(m, [prefix])) if prefix is not None else []
            if not mids:
                out.append(FeedDecodeError(exc.reason, exc.detail, raw))
            for mid in mids:
                out.append(FeedDecodeError(exc.reason, exc.detail, raw, market_id=mid))
                # its update is lost: forget it, so the next good snapshot re-images it whole
                self.differ.forget(mid)
        return out

    def _time(self, value: str | float | None, where: str, raw: bytes, provider: bool = False,
              recv_ms: int = 0, prefix: str | None = None) -> int | None:
        """A provider time → ms (None when absent or unreadable); a time
        outside 1970..2100 (``invalid_time``) or, for a ``provider`` time,
        beyond the future-skew bound (``clock_skew``) rejects the part
        ``prefix``."""
        try:
            ms = iso_to_ms(value)
            if provider and ms is not None:
                check_provider_time(ms, recv_ms, self.max_future_skew_ms, where)
        except FeedDecodeError as exc:
            raise _Rejected(prefix, FeedDecodeError(exc.reason, f"{where}: {exc.detail}", raw)) from None
        return ms

    @staticmethod
    def _decode(raw: bytes, bad: dict[str | None, FeedDecodeError]) -> list[Event]:
        """The body's events; a part that fails is recorded in ``bad`` and left out."""
        try:
            events = _DECODER.decode(raw)
        except msgspec.ValidationError:
            events = None
        except _JSON_ERRORS as exc:
            raise FeedDecodeError("invalid_json", str(exc), raw) from None
        if events is None:  # decode event by event, to reject only those that fail
            try:
                parts = _RAW_LIST_DECODER.decode(raw)
            except msgspec.ValidationError as exc:
                raise FeedDecodeError("invalid_schema", str(exc), raw) from None
            except _JSON_ERRORS as exc:
                raise FeedDecodeError("invalid_json", str(exc), raw) from None
            events = []
            for i, part in enumerate(parts):
                try:
                    events.append(_EVENT_DECODER.decode(part))
                except (msgspec.ValidationError, *_JSON_ERRORS) as exc:
                    text = str(exc)
                    reason = "invalid_price" if text.endswith(".price`") else "invalid_schema"
                    try:
                        eid = _EVENT_ID_DECODER.decode(part).id
                    except (msgspec.ValidationError, *_JSON_ERRORS):
                        eid = None
                    prefix = f"{SOURCE_PREFIX}{eid}" if eid is not None and _ID.match(eid) else None
                    bad.setdefault(prefix, FeedDecodeError(reason, f"event {i}: {text}", raw))
        good = []
        for ev in events:
            if not _ID.match(ev.id) or not _ID.match(ev.sport_key):
                prefix = f"{SOURCE_PREFIX}{ev.id}" if _ID.match(ev.id) else None
                bad.setdefault(prefix, FeedDecodeError(
                    "invalid_schema", f"event id {ev.id[:80]!r} / sport key {ev.sport_key[:80]!r}", raw))
                continue
            keys = [bm.key for bm in ev.bookmakers] + [m.key for bm in ev.bookmakers for m in bm.markets]
            wrong = next((k for k in keys if not _ID.match(k)), None)
            if wrong is not None:
                bad.setdefault(f"{SOURCE_PREFIX}{ev.id}", FeedDecodeError(
                    "invalid_schema", f"bookmaker / market key {wrong[:80]!r} in event {ev.id}", raw))
                continue
            good.append(ev)
        return good

    def _selection_id(self, ev: Event, name: str) -> str:
        if name == ev.home_team:
            return "home"
        if name == ev.away_team:
            return "away"
        low = name.strip().lower()
        if low in ("draw", "over", "under"):
            return low
        return _slug(name)

    def _markets_of(self, ev: Event, raw: bytes, recv_ms: int, start: int | None,
                    bad: dict[str | None, FeedDecodeError]) -> list[Rendered]:
        """The event's canonical markets; a bookmaker market that fails is
        recorded in ``bad`` and left out."""
        home, away = display_name(ev.home_team), display_name(ev.away_team)
        common = dict(event_id=f"{SOURCE_PREFIX}{ev.id}", sport=sport_of(ev.sport_key),
                      competition=display_name(ev.sport_title),
                      event_name=f"{home} v {away}" if home and away else home or away,
                      status="OPEN", in_play=start is not None and start <= recv_ms, start_time=start)
        out: list[Rendered] = []
        for bm in ev.bookmakers:
            bm_prefix = f"{SOURCE_PREFIX}{ev.id}:{bm.key}"
            try:
                bm_ts = self._time(bm.last_update, f"event {ev.id} {bm.key} last_update", raw, True, recv_ms, bm_prefix)
            except _Rejected as rej:
                bad.setdefault(rej.prefix, rej.error)
                continue
            for m in bm.markets:
                if m.key.endswith(_LAY_SUFFIX):  # lay odds: never a back price (module docstring)
                    self.dropped["lay_market"] += 1
                    continue
                prefix = f"{bm_prefix}:{m.key}"
                try:
                    out.extend(self._market_lines(ev, bm, m, raw, recv_ms, bm_ts, common, prefix))
                except _Rejected as rej:
                    bad.setdefault(rej.prefix, rej.error)
        return out

    def _market_lines(self, ev: Event, bm: Bookmaker, m: OddsMarket, raw: bytes, recv_ms: int, bm_ts: int | None,
                      common: dict, prefix: str) -> list[Rendered]:
        fmt = self.odds_format
        ts = self._time(m.last_update, f"event {ev.id} {bm.key} {m.key} last_update", raw, True, recv_ms, prefix) \
            or bm_ts or recv_ms
        family = market_family(m.key)
        # group outcomes into lines: the spreads family by the home side's point
        lines: dict[str | None, list[Selection]] = {}
        for i, o in enumerate(m.outcomes):
            where = f"event {ev.id} {bm.key} {m.key} outcome {i}"
            try:
                price = price_to_decimal(o.price, fmt, where, raw)
            except FeedDecodeError as exc:
                raise _Rejected(prefix, exc) from None
            if o.point is not None and not -MAX_HANDICAP <= o.point <= MAX_HANDICAP:
                raise _Rejected(prefix, FeedDecodeError("invalid_number", f"point {o.point!r} at {where}", raw))
            sid = self._selection_id(ev, o.name)
            handicap = 0.0
            line: str | None = None
            if o.point is not None:
                if family == "spreads":  # the away side's +1.5 is the home side's -1.5 line
                    line = fmt_line(o.point if sid != "away" else -o.point)
                    handicap = o.point
                else:
                    line = fmt_line(o.point)
                    handicap = 0.0 if family == "totals" else o.point
            if o.description:
                sid = f"{_slug(o.description)}:{sid}"
            name = display_name(o.name)
            if family == "totals" and o.point is not None:
                name = f"{name} {fmt_line(o.point)}"
            lines.setdefault(line, []).append(
                make_selection(sid, name, price, raw_price=o.price, odds_format=fmt, handicap=handicap, outcome=sid))
        out: list[Rendered] = []
        for line, sels in lines.items():
            ids = [s.selection_id for s in sels]
            if len(set(ids)) != len(ids):
                raise _Rejected(prefix, FeedDecodeError(
                    "invalid_schema", f"duplicate outcomes in event {ev.id} {bm.key} {m.key}", raw))
            mid = f"{prefix}" + (f":{line}" if line is not None else "")
            mtype, spec = market_type_of(m.key, has_draw=any(s.outcome == "draw" for s in sels),
                                         sport=common["sport"])
            spec["sport_key"] = ev.sport_key
            if line is not None:
                spec["line"] = line
            name = {"match_result": "Match result", "moneyline": "Moneyline",
                    "handicap": f"Handicap {line}", "total": f"Total {line}"}.get(mtype, m.key)
            out.append(Rendered(
                market_id=mid,
                header=MarketHeader(**common, bookmaker=bm.key, name=name, market_type=mtype,
                                    market_type_raw=m.key, specifiers=spec),
                selections=sels, source_ts=ts))
        return out


def _under(market_id: str, prefixes: list[str]) -> bool:
    """``market_id`` is one of ``prefixes`` or lies under one (``<prefix>:…``)."""
    for p in prefixes:
        if market_id == p or market_id.startswith(p) and market_id[len(p)] == ":":
            return True
    return False


def from_spec(spec: SourceSpec, settings: Settings) -> TheOddsApiNormaliser:
    """The registry's normaliser factory for ``theoddsapi`` sources
    (``odds_format=decimal|american``)."""
    return TheOddsApiNormaliser(spec.name, odds_format=odds_format_of(spec))
