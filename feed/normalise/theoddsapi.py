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

    toa:<eventId>:<bookmaker>:h2h
    toa:<eventId>:<bookmaker>:spreads:<home point>
    toa:<eventId>:<bookmaker>:totals:<points>

market_type: ``moneyline`` (h2h), ``moneyline_lay`` (h2h_lay), ``spread``,
``total``, otherwise the provider key; ``specifiers`` carry the line and
``sport_key`` (the scope, needed to resume after a restart). Selection ids:
``home`` / ``away`` / ``draw`` (matched on the event's team names),
``over`` / ``under``, else the outcome name lower-cased. ``in_play`` =
``commence_time <= recv_ms``. Prices: decimal, or American with
``odds_format="american"``, converted and validated by :mod:`feed.odds`;
an invalid price rejects the whole response (``invalid_price``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Literal

import msgspec

from feed.errors import FeedDecodeError
from feed.models import Market, MarketHeader, Selection
from feed.normalise.base import NormalisedBatch
from feed.normalise.rendered import (
    MarketDiffer,
    Rendered,
    display_name,
    fmt_line,
    iso_to_ms,
    make_selection,
    price_to_decimal,
)

__all__ = ["TheOddsApiNormaliser", "sport_of"]

SOURCE_PREFIX = "toa:"

_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_MARKET_TYPES = {"h2h": "moneyline", "h2h_lay": "moneyline_lay", "spreads": "spread", "totals": "total",
                 "alternate_spreads": "spread", "alternate_totals": "total"}
_SPREADS = frozenset({"spreads", "alternate_spreads"})
_TOTALS = frozenset({"totals", "alternate_totals"})

#: sport-key group prefix → canonical sport (``soccer_epl`` → ``soccer``)
_SPORT_GROUPS = {"americanfootball": "american_football", "icehockey": "ice_hockey", "mma": "mma",
                 "aussierules": "australian_rules", "rugbyleague": "rugby_league", "rugbyunion": "rugby_union"}


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


_DECODER = msgspec.json.Decoder(list[Event])


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:64] or "x"


class TheOddsApiNormaliser:
    """Odds API snapshots → canonical market updates (see the module docstring).

    source: the source name; odds_format: ``decimal`` or ``american`` (the
    ``oddsFormat`` the poller asked for).
    """

    def __init__(self, source: str = "theoddsapi", *, odds_format: Literal["decimal", "american"] = "decimal") -> None:
        self.source = source
        self.odds_format = odds_format
        self.differ = MarketDiffer(source)
        self.scope_of: dict[str, str] = {}  # market id -> sport key
        self.dropped: Counter[str] = Counter()
        self._expect: str | None = None
        self.live_events: dict[str, set[str]] = {}  # sport key -> ids of events in play in the last snapshot

    def expect(self, sport_key: str) -> None:
        """Say which sport key the next :meth:`feed` body answers (its scope
        for vanished markets; ``upcoming`` = every sport)."""
        self._expect = sport_key

    def restore(self, markets: Iterable[Market]) -> None:
        """Resume after a restart: remember the stored open markets of this
        source as emitted, so a market gone meanwhile is suspended."""
        mine = [m for m in markets if m.source == self.source and m.market_id.startswith(SOURCE_PREFIX)
                and m.status != "SUSPENDED" and m.specifiers and "sport_key" in m.specifiers]
        self.differ.seed(mine)
        for m in mine:
            self.scope_of[m.market_id] = m.specifiers["sport_key"]  # type: ignore[index]

    def feed(self, raw: bytes, recv_ms: int, pt_map: Callable[[int], int] | None = None) -> NormalisedBatch:
        """Decode one odds response (a JSON array of events) and diff it
        against the previous snapshot. Raises :class:`FeedDecodeError`
        (``invalid_json``, ``invalid_schema``, ``invalid_price``) and then
        has applied nothing."""
        expect, self._expect = self._expect, None
        events = self._decode(raw)
        rendered: list[Rendered] = []
        live: dict[str, set[str]] = {}
        for ev in events:
            rendered.extend(self._markets_of(ev, raw, recv_ms))
            start = iso_to_ms(ev.commence_time)
            if start is not None and start <= recv_ms:
                live.setdefault(ev.sport_key, set()).add(ev.id)
        if expect is None or expect == "upcoming":
            scopes = {ev.sport_key for ev in events} if expect is None else None
        else:
            scopes = {expect}
            if any(ev.sport_key != expect for ev in events):
                raise FeedDecodeError("invalid_schema", f"events of other sports in a {expect} response", raw)
        for key in scopes if scopes is not None else {ev.sport_key for ev in events}:
            self.live_events[key] = live.get(key, set())
        batch = NormalisedBatch(op="odds")
        updates = batch.updates
        seen = set()
        for r in rendered:
            if r.market_id in seen:
                raise FeedDecodeError("invalid_schema", f"market {r.market_id} appears twice", raw)
            seen.add(r.market_id)
            prev = self.differ.emitted.get(r.market_id)
            if prev is not None and r.source_ts < prev.source_ts:
                self.dropped["stale_market"] += 1
                continue
            u = self.differ.emit(r, recv_ms)
            self.scope_of[r.market_id] = r.header.specifiers["sport_key"]  # type: ignore[index]
            if u is not None:
                updates.append(u)
        for mid in sorted(self.scope_of):
            if mid in seen or (scopes is not None and self.scope_of[mid] not in scopes):
                continue
            u = self.differ.suspend(mid, "not_offered", recv_ms, recv_ms)
            if u is not None:
                updates.append(u)
            self.differ.forget(mid)
            del self.scope_of[mid]
        batch.runner_changes = sum(len(u.selections) for u in updates)
        return batch

    # -- internals ------------------------------------------------------------

    @staticmethod
    def _decode(raw: bytes) -> list[Event]:
        try:
            events = _DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            text = str(exc)
            reason = "invalid_price" if text.endswith(".price`") else "invalid_schema"
            raise FeedDecodeError(reason, text, raw) from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            raise FeedDecodeError("invalid_json", str(exc), raw) from None
        for ev in events:
            if not _ID.match(ev.id) or not _ID.match(ev.sport_key):
                raise FeedDecodeError("invalid_schema", f"event id {ev.id[:80]!r} / sport key {ev.sport_key[:80]!r}", raw)
            for bm in ev.bookmakers:
                if not _ID.match(bm.key):
                    raise FeedDecodeError("invalid_schema", f"bookmaker key {bm.key[:80]!r} in event {ev.id}", raw)
                for m in bm.markets:
                    if not _ID.match(m.key):
                        raise FeedDecodeError("invalid_schema", f"market key {m.key[:80]!r} in event {ev.id}", raw)
        return events

    def _selection_id(self, ev: Event, name: str) -> str:
        if name == ev.home_team:
            return "home"
        if name == ev.away_team:
            return "away"
        low = name.strip().lower()
        if low in ("draw", "over", "under"):
            return low
        return _slug(name)

    def _markets_of(self, ev: Event, raw: bytes, recv_ms: int) -> list[Rendered]:
        fmt = self.odds_format
        start = iso_to_ms(ev.commence_time)
        home, away = display_name(ev.home_team), display_name(ev.away_team)
        common = dict(event_id=f"{SOURCE_PREFIX}{ev.id}", sport=sport_of(ev.sport_key),
                      competition=display_name(ev.sport_title),
                      event_name=f"{home} v {away}" if home and away else home or away,
                      status="OPEN", in_play=start is not None and start <= recv_ms, start_time=start)
        out: list[Rendered] = []
        for bm in ev.bookmakers:
            bm_ts = iso_to_ms(bm.last_update)
            for m in bm.markets:
                ts = iso_to_ms(m.last_update) or bm_ts or recv_ms
                # group outcomes into lines
                lines: dict[str | None, list[Selection]] = {}
                for i, o in enumerate(m.outcomes):
                    where = f"event {ev.id} {bm.key} {m.key} outcome {i}"
                    price = price_to_decimal(o.price, fmt, where, raw)
                    sid = self._selection_id(ev, o.name)
                    handicap = 0.0
                    line: str | None = None
                    if o.point is not None:
                        if m.key in _SPREADS:
                            line = fmt_line(o.point if sid != "away" else -o.point)
                            handicap = o.point
                        else:
                            line = fmt_line(o.point)
                            handicap = 0.0 if m.key in _TOTALS else o.point
                    if o.description:
                        sid = f"{_slug(o.description)}:{sid}"
                    name = display_name(o.name)
                    if m.key in _TOTALS and o.point is not None:
                        name = f"{name} {fmt_line(o.point)}"
                    lines.setdefault(line, []).append(
                        make_selection(sid, name, price, raw_price=o.price, odds_format=fmt, handicap=handicap))
                for line, sels in lines.items():
                    ids = [s.selection_id for s in sels]
                    if len(set(ids)) != len(ids):
                        raise FeedDecodeError("invalid_schema", f"duplicate outcomes in event {ev.id} {bm.key} {m.key}", raw)
                    mid = f"{SOURCE_PREFIX}{ev.id}:{bm.key}:{m.key}" + (f":{line}" if line is not None else "")
                    mtype = _MARKET_TYPES.get(m.key, m.key)
                    spec = {"sport_key": ev.sport_key}
                    if line is not None:
                        spec["handicap" if m.key in _SPREADS else "total" if m.key in _TOTALS else "line"] = line
                    name = {"moneyline": "Moneyline", "moneyline_lay": "Moneyline (lay)",
                            "spread": f"Handicap {line}", "total": f"Total {line}"}.get(mtype, m.key)
                    out.append(Rendered(
                        market_id=mid,
                        header=MarketHeader(**common, bookmaker=bm.key, name=name, market_type=mtype,  # type: ignore[arg-type]
                                            market_type_raw=m.key, specifiers=spec),
                        selections=sels, source_ts=ts))
        return out
