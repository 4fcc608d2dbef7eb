"""Betfair Data Scientists' historic CSVs → canonical market timelines.

Betfair Australia's data-science team publishes per-runner market summaries
as CSV (``../shared/data/betfair-datascientists-hub/``, see PROVENANCE.md).
Two layouts are understood, told apart by their header:

- **match odds** (football, e.g. ``A-League_2024-2025_Match_Odds.csv``): one
  row per runner with ``EVENT_DATE`` (a date only), ``PATH``
  (``Australian Soccer/<competition>/…/<Home> v <Away>``), ``EVENT_ID``,
  ``MARKET_TYPE``, ``MARKET_ID``, ``SELECTION_ID``, ``RUNNER_NAME``,
  ``RUNNER_STATUS``, ``HOME_TEAM``, ``AWAY_TEAM``, best back / lay and matched
  volume at kick-off, ``HALF_TIME`` (a UTC timestamp), best back / lay and
  matched volume at half-time, ``TOTAL_MATCHED_VOLUME``;
- **racing** (e.g. ``ANZ_Thoroughbreds_2021_07.csv``): one row per runner with
  ``LOCAL_MEETING_DATE``, ``SCHEDULED_RACE_TIME`` and ``ACTUAL_OFF_TIME``
  (local times of the track's ``STATE_CODE``), ``TRACK``, ``RACE_NO``,
  ``WIN_MARKET_ID``, ``PLACE_MARKET_ID``, ``SELECTION_ID``, ``TAB_NUMBER``,
  ``SELECTION_NAME``, win / place results and BSPs, pre-play / in-play traded
  prices and volumes, best available back / lay at the scheduled off.

Each market becomes a timeline of three **steps** (the CSV holds nothing in
between):

==========  ==================================  ==================================================
step        football (MATCH_ODDS)               racing (WIN and PLACE markets)
==========  ==================================  ==================================================
``pre_off`` kick-off: image, OPEN, best back    scheduled off (or the actual off when the race
            at kick-off, matched volume         went early): image, OPEN, best back at the
                                                scheduled off (WIN; the CSV has no PLACE prices)
``in_play`` ``HALF_TIME``: in play, best back   ``ACTUAL_OFF_TIME``: in play, BSP, last price
            and matched volume at half-time     traded pre-play, pre-play matched volume (the
                                                prices of the scheduled off are kept: the CSV
                                                has none in play)
``settled`` ``HALF_TIME`` + 65 min: results,    the off + 5 min: results (WINNER / LOSER; a PLACE
            SETTLED, total matched volume       market's placed runners are WINNER, as Betfair
                                                says), SETTLED, last price traded, matched volume
==========  ==================================  ==================================================

**Times** (integer ms since the Unix epoch, UTC). The football CSV has no
kick-off time (``EVENT_DATE`` is a date) but a real ``HALF_TIME``: kick-off
is taken as ``HALF_TIME − 48 min`` rounded *down* to a 5-minute mark.
Kick-offs are scheduled on 5-minute marks; the first half lasts 45 min plus
stoppage time and ``HALF_TIME`` is stamped a little after the whistle: 51.9
and 52.4 min after kick-off in the two markets that also appear in the
Betfair stream recording ``betfair_parser/1.242971311.bz2`` (1.243383462 and
1.243383567, ``marketTime`` 09:35Z), which the rule reproduces. The rule is
exact when ``HALF_TIME`` falls 48–53 min after kick-off and 5 min early when
it falls sooner (``HALF_TIME − 60 min`` would be wrong by ~10 min). Nor is
there a full-time time: the result is stamped 65 min after ``HALF_TIME``
(15 min break + 45 min + ~5 min stoppage). Racing times are local to the
track's state: VIC Australia/Melbourne, NSW and ACT Australia/Sydney, QLD
Australia/Brisbane, SA Australia/Adelaide, WA Australia/Perth, TAS
Australia/Hobart, NT Australia/Darwin, NZ Pacific/Auckland (``zoneinfo``:
the system's tz database or the ``tzdata`` package); results are stamped
5 min after the actual off (the CSV has no settlement time).

**Prices without sizes.** The CSV gives best back and lay *prices* only. A
canonical ladder level is ``[price, size]`` with a finite size ≥ 0
(:mod:`feed.validate`), and size 0 means "nothing offered" (Betfair deletes
a level with it), so no level can be written honestly: the best back goes
into ``Selection.price`` (the model's sizeless best price to back; a price
check answers it with ``price_field: "price"``, ``available_size: null``) and
``back`` / ``lay`` stay empty. The best lay is read and checked but not
carried (the model has no sizeless lay). Matched volumes become
``traded_volume`` (per selection; the market's is their sum), never sizes.

**Ids and taxonomy.** Market ``bfcsv:1.<MARKET_ID>`` (the CSV writes Betfair
market ids without their ``1.`` exchange prefix, PLACE ids as floats such as
``185340630.0``; ``bfcsv:1.185781277`` is ``bf:1.185781277`` of a live ESA
source, kept apart as another source), event ``bfcsv:<EVENT_ID>`` (racing:
the meeting, ``bfcsv:<date>:<track-slug>``), bookmaker ``betfair_exchange``,
sport ``soccer`` / ``horse_racing``; ``market_type`` ``match_result``
(``market_type_raw`` ``MATCH_ODDS``), ``win`` (``WIN``), ``place``
(``PLACE``: its number of places is not in the CSV, so no ``places``
specifier); selection ``outcome`` ``home`` / ``draw`` / ``away`` (the
runner named as ``HOME_TEAM`` / ``AWAY_TEAM`` — or, where those columns do
not name two runners of the market (empty, or garbled as ``ixtures 6 Jan`` in
a few rows), as the sides of the event name — and ``The Draw``), racing: the
selection id.

**Payloads.** :func:`schedule` (used by :mod:`feed.sources.csv_replay`)
splits a CSV file into one small CSV document per market (the header and
that market's rows) and plans its steps in time order; the channel of each
payload is ``<step>:<MATCH_ODDS|WIN|PLACE>``. :class:`BetfairCsvNormaliser`
renders one step of one market from such a document.

**Errors.** A market with a bad value in any of its rows — a price that is
not a number or outside 1.01–1000, a volume that is not a number ≥ 0, a
missing market / selection / event id, an unreadable time, an unknown state
or status — is rejected whole at its first step with a typed
:class:`~feed.errors.FeedDecodeError` (``invalid_price``, ``invalid_size``,
``missing_id``, ``invalid_time``, ``invalid_schema``; ``market_id`` set when
known): the pipeline quarantines it and the rest of the file plays on; the
market's later steps are dropped (``dropped["rejected_market"]``).

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

from feed.errors import ConfigError, FeedDecodeError
from feed.models import Market, MarketHeader, MarketStatus, Selection, SelectionStatus
from feed.normalise.base import NormalisedBatch
from feed.normalise.rendered import MarketDiffer, Rendered, display_name
from feed.validate import MAX_FUTURE_SKEW_MS, MAX_SIZE, MAX_TIME_MS, MIN_TIME_MS, is_price

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec

__all__ = [
    "BOOKMAKER",
    "PREFIX",
    "STEPS",
    "BetfairCsvNormaliser",
    "Planned",
    "from_spec",
    "kick_off_ms",
    "layout_of",
    "schedule",
]

PREFIX = "bfcsv"
BOOKMAKER = "betfair_exchange"
Step = Literal["pre_off", "in_play", "settled"]
STEPS: tuple[Step, ...] = ("pre_off", "in_play", "settled")
Layout = Literal["match_odds", "racing"]

#: kick-off = HALF_TIME − this, rounded down to KICK_OFF_GRID (module docstring)
HALF_TIME_AFTER_KICK_OFF = timedelta(minutes=48)
KICK_OFF_GRID_MS = 5 * 60_000
#: football result = HALF_TIME + this; racing result = the off + RACE_SETTLED_AFTER
FULL_TIME_AFTER_HALF_TIME = timedelta(minutes=65)
RACE_SETTLED_AFTER = timedelta(minutes=5)

#: STATE_CODE → the track's time zone
STATE_ZONES: dict[str, str] = {
    "VIC": "Australia/Melbourne", "NSW": "Australia/Sydney", "ACT": "Australia/Sydney",
    "QLD": "Australia/Brisbane", "SA": "Australia/Adelaide", "WA": "Australia/Perth",
    "TAS": "Australia/Hobart", "NT": "Australia/Darwin", "NZ": "Pacific/Auckland",
}

_FOOTBALL_COLUMNS = frozenset({"PATH", "EVENT_ID", "MARKET_ID", "SELECTION_ID", "RUNNER_NAME", "HALF_TIME",
                               "BEST_BACK_KICK_OFF"})
_RACING_COLUMNS = frozenset({"LOCAL_MEETING_DATE", "SCHEDULED_RACE_TIME", "TRACK", "STATE_CODE", "WIN_MARKET_ID",
                             "SELECTION_ID", "WIN_RESULT"})
_STATUSES: dict[str, SelectionStatus] = {"WINNER": "WINNER", "LOSER": "LOSER", "PLACED": "PLACED",
                                         "REMOVED": "REMOVED", "REMOVED_VACANT": "REMOVED"}
_SLUG = re.compile(r"[^a-z0-9]+")


def layout_of(header: Sequence[str]) -> Layout:
    """The layout of a CSV header (``match_odds`` or ``racing``); raises
    ``FeedDecodeError("unsupported_layout")`` for any other CSV."""
    cols = set(header)
    if _FOOTBALL_COLUMNS <= cols:
        return "match_odds"
    if _RACING_COLUMNS <= cols:
        return "racing"
    raise FeedDecodeError("unsupported_layout", "not a Betfair data-scientists match-odds or racing CSV (columns "
                          + ", ".join(list(header)[:6]) + ", …)")


def market_id_of(raw: str) -> str | None:
    """``bfcsv:1.<id>`` from the CSV's id (``185340630``, ``185340630.0``,
    ``1.185340630``); None when empty or not an id."""
    text = raw.strip()
    if not text:
        return None
    if text.startswith("1.") and text[2:].isdigit():
        return f"{PREFIX}:{text}"
    if text.endswith(".0"):
        text = text[:-2]
    return f"{PREFIX}:1.{text}" if text.isdigit() else None


# --- values ---------------------------------------------------------------------------


def _num(row: dict[str, str], col: str) -> float | None:
    raw = (row.get(col) or "").strip()
    if not raw:
        return None
    try:
        x = float(raw)
    except ValueError:
        return math.nan
    return x


def _price(row: dict[str, str], col: str, mid: str | None) -> float | None:
    x = _num(row, col)
    if x is None:
        return None
    if not is_price(x):
        raise FeedDecodeError("invalid_price", f"{col} {row.get(col)!r} of selection {row.get('SELECTION_ID')!r} "
                              f"is not a decimal price 1.01-1000 in market {mid}", market_id=mid)
    return x


def _volume(row: dict[str, str], col: str, mid: str | None) -> float | None:
    x = _num(row, col)
    if x is None:
        return None
    if not 0.0 <= x <= MAX_SIZE:  # also NaN (not a number)
        raise FeedDecodeError("invalid_size", f"{col} {row.get(col)!r} of selection {row.get('SELECTION_ID')!r} "
                              f"is not a volume >= 0 in market {mid}", market_id=mid)
    return x


def _status(row: dict[str, str], col: str, mid: str | None) -> SelectionStatus | None:
    raw = (row.get(col) or "").strip().upper()
    if not raw:
        return None
    status = _STATUSES.get(raw)
    if status is None:
        raise FeedDecodeError("invalid_schema", f"{col} {raw!r} is not a runner result in market {mid}",
                              market_id=mid)
    return status


def _utc_ms(dt: datetime, what: str, mid: str | None) -> int:
    ms = int(dt.timestamp() * 1000)
    if not MIN_TIME_MS <= ms <= MAX_TIME_MS:
        raise FeedDecodeError("invalid_time", f"{what} {dt.isoformat()} is not within 1970..2100 in market {mid}",
                              market_id=mid)
    return ms


@cache
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except Exception as exc:  # ZoneInfoNotFoundError: no tz database on this machine
        raise ConfigError(f"time zone {name} is unknown here ({exc}): install the system tz database or "
                          "`pip install tzdata`") from None


def kick_off_ms(half_time_ms: int) -> int:
    """The kick-off derived from a football CSV's ``HALF_TIME`` (ms since the
    epoch): ``HALF_TIME − 48 min`` rounded down to a 5-minute mark (module
    docstring)."""
    t = half_time_ms - int(HALF_TIME_AFTER_KICK_OFF.total_seconds() * 1000)
    return t - t % KICK_OFF_GRID_MS


def _half_time(row: dict[str, str], mid: str | None) -> int:
    raw = (row.get("HALF_TIME") or "").strip()
    try:
        dt = datetime.fromisoformat(raw.replace(" Z", "+00:00").replace("Z", "+00:00"))
    except ValueError:
        raise FeedDecodeError("invalid_time", f"HALF_TIME {raw[:40]!r} is not a timestamp in market {mid}",
                              market_id=mid) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return _utc_ms(dt, "HALF_TIME", mid)


def _local(row: dict[str, str], col: str, mid: str | None) -> int:
    state = (row.get("STATE_CODE") or "").strip().upper()
    zone = STATE_ZONES.get(state)
    if zone is None:
        raise FeedDecodeError("invalid_time", f"STATE_CODE {state!r} has no known time zone in market {mid}",
                              market_id=mid)
    date, clock = (row.get("LOCAL_MEETING_DATE") or "").strip(), (row.get(col) or "").strip()
    try:
        dt = datetime.fromisoformat(f"{date}T{clock}")
    except ValueError:
        raise FeedDecodeError("invalid_time", f"{col} {date!r} {clock!r} is not a local date and time in market "
                              f"{mid}", market_id=mid) from None
    return _utc_ms(dt.replace(tzinfo=_zone(zone)), col, mid)


# --- one market -------------------------------------------------------------------------


@dataclass
class _Runner:
    selection_id: str
    name: str | None
    outcome: str | None
    sort_priority: int | None
    #: per step: (best back, best lay, ltp, traded volume)
    prices: dict[Step, tuple[float | None, float | None, float | None, float | None]]
    bsp: float | None
    result: SelectionStatus | None


@dataclass
class _Market:
    market_id: str
    header: MarketHeader
    times: dict[Step, int]
    runners: list[_Runner]


def _need_id(row: dict[str, str], col: str, mid: str | None) -> str:
    value = (row.get(col) or "").strip()
    if not value:
        raise FeedDecodeError("missing_id", f"{col} is empty in market {mid}", market_id=mid)
    return value


def _event_name(path: str) -> tuple[str | None, str | None]:
    """(competition, "Home v Away") from a football PATH."""
    parts = [p.strip() for p in path.split("/")]
    event = next((p for p in reversed(parts) if " v " in p), None)
    competition = parts[1] if len(parts) > 2 else None
    return display_name(competition), display_name(event)


def _football(rows: list[dict[str, str]]) -> _Market:
    first = rows[0]
    mid = market_id_of(first.get("MARKET_ID") or "")
    if mid is None:
        raise FeedDecodeError("missing_id", f"MARKET_ID {first.get('MARKET_ID')!r} is not a market id")
    for row in rows:
        if market_id_of(row.get("MARKET_ID") or "") != mid:
            raise FeedDecodeError("invalid_schema", f"rows of two markets in one payload ({mid})", market_id=mid)
    event_id = _need_id(first, "EVENT_ID", mid)
    half = _half_time(first, mid)
    ko = kick_off_ms(half)
    times: dict[Step, int] = {"pre_off": ko, "in_play": half,
                              "settled": half + int(FULL_TIME_AFTER_HALF_TIME.total_seconds() * 1000)}
    competition, event_name = _event_name(first.get("PATH") or "")
    home = (first.get("HOME_TEAM") or "").strip()
    away = (first.get("AWAY_TEAM") or "").strip()
    names = {(r.get("RUNNER_NAME") or "").strip() for r in rows}
    if event_name and not (home in names and away in names):
        # HOME_TEAM / AWAY_TEAM are sometimes empty or garbled (``ixtures 6 Jan``, cut from PATH): the
        # event name's sides decide then
        left, _, right = event_name.partition(" v ")
        home, away = left.strip(), right.strip()
    raw_type = (first.get("MARKET_TYPE") or "").strip() or None
    runners: list[_Runner] = []
    seen: set[str] = set()
    for row in rows:
        sid = _need_id(row, "SELECTION_ID", mid)
        name = (row.get("RUNNER_NAME") or "").strip()
        outcome = ("home" if name == home else "away" if name == away
                   else "draw" if name.lower() in ("the draw", "draw") else None)
        result = _status(row, "RUNNER_STATUS", mid)
        if result is None and (row.get("IS_WINNER") or "").strip() in ("0", "1"):
            result = "WINNER" if row["IS_WINNER"].strip() == "1" else "LOSER"
        runner = _Runner(
            selection_id=sid, name=display_name(name), outcome=outcome,
            sort_priority={"home": 1, "away": 2, "draw": 3}.get(outcome or ""),
            prices={
                "pre_off": (_price(row, "BEST_BACK_KICK_OFF", mid), _price(row, "BEST_LAY_KICK_OFF", mid), None,
                            _volume(row, "MATCHED_VOLUME_KICK_OFF", mid)),
                "in_play": (_price(row, "BEST_BACK_PRICE_HALF_TIME", mid), _price(row, "BEST_LAY_PRICE_HALF_TIME", mid),
                            None, _volume(row, "MATCHED_VOLUME_HALF_TIME", mid)),
                "settled": (_price(row, "BEST_BACK_PRICE_HALF_TIME", mid), _price(row, "BEST_LAY_PRICE_HALF_TIME", mid),
                            None, _volume(row, "TOTAL_MATCHED_VOLUME", mid)),
            },
            bsp=None, result=result)
        if sid not in seen:
            seen.add(sid)
            runners.append(runner)
    header = MarketHeader(
        event_id=f"{PREFIX}:{event_id}", bookmaker=BOOKMAKER, sport="soccer", competition=competition,
        event_name=event_name, name=display_name(first.get("MARKET_NAME")) or "Match Odds",
        market_type="match_result" if raw_type == "MATCH_ODDS" else None, market_type_raw=raw_type,
        start_time=ko, number_of_winners=1, country_code="AU")
    return _Market(mid, header, times, runners)


def _racing(rows: list[dict[str, str]], kind: Literal["WIN", "PLACE"]) -> _Market:
    first = rows[0]
    col = "WIN_MARKET_ID" if kind == "WIN" else "PLACE_MARKET_ID"
    mid = market_id_of(first.get(col) or "")
    if mid is None:
        raise FeedDecodeError("missing_id", f"{col} {first.get(col)!r} is not a market id")
    for row in rows:
        if market_id_of(row.get(col) or "") != mid:
            raise FeedDecodeError("invalid_schema", f"rows of two markets in one payload ({mid})", market_id=mid)
    scheduled = _local(first, "SCHEDULED_RACE_TIME", mid)
    off = _local(first, "ACTUAL_OFF_TIME", mid) if (first.get("ACTUAL_OFF_TIME") or "").strip() else scheduled
    times: dict[Step, int] = {"pre_off": min(scheduled, off), "in_play": off,
                              "settled": off + int(RACE_SETTLED_AFTER.total_seconds() * 1000)}
    track = display_name(first.get("TRACK")) or "?"
    race_no = (first.get("RACE_NO") or "").strip()
    date = (first.get("LOCAL_MEETING_DATE") or "").strip()
    state = (first.get("STATE_CODE") or "").strip().upper()
    runners: list[_Runner] = []
    seen: set[str] = set()
    for row in rows:
        sid = _need_id(row, "SELECTION_ID", mid)
        tab = (row.get("TAB_NUMBER") or "").strip()
        if kind == "WIN":
            back, lay = (_price(row, "BEST_AVAIL_BACK_AT_SCHEDULED_OFF", mid),
                         _price(row, "BEST_AVAIL_LAY_AT_SCHEDULED_OFF", mid))
            pre_vol = _volume(row, "WIN_PREPLAY_VOLUME", mid)
            in_vol = _volume(row, "WIN_INPLAY_VOLUME", mid)
            total = None if pre_vol is None and in_vol is None else round((pre_vol or 0.0) + (in_vol or 0.0), 2)
            prices: dict[Step, tuple[float | None, float | None, float | None, float | None]] = {
                "pre_off": (back, lay, None, None),
                "in_play": (back, lay, _price(row, "WIN_PREPLAY_LAST_PRICE_TAKEN", mid), pre_vol),
                "settled": (back, lay, _price(row, "WIN_LAST_PRICE_TAKEN", mid), total),
            }
            bsp, result = _price(row, "WIN_BSP", mid), _status(row, "WIN_RESULT", mid)
        else:
            ltp, vol = _price(row, "PLACE_LAST_PRICE_TAKEN", mid), _volume(row, "PLACE_PREPLAY_VOLUME", mid)
            prices = {"pre_off": (None, None, None, None), "in_play": (None, None, ltp, vol),
                      "settled": (None, None, ltp, vol)}
            bsp, result = _price(row, "PLACE_BSP", mid), _status(row, "PLACE_RESULT", mid)
        if sid in seen:
            continue
        seen.add(sid)
        runners.append(_Runner(selection_id=sid, name=display_name(row.get("SELECTION_NAME")), outcome=sid,
                               sort_priority=int(tab) if tab.isdigit() else None, prices=prices, bsp=bsp,
                               result=result))
    win_name = display_name(first.get("WIN_MARKET_NAME"))
    header = MarketHeader(
        event_id=f"{PREFIX}:{date}:{_SLUG.sub('-', track.lower()).strip('-')}", bookmaker=BOOKMAKER,
        sport="horse_racing", event_name=f"{track} R{race_no}" if race_no else track,
        name=win_name if kind == "WIN" else "To Be Placed", market_type=kind.lower(), market_type_raw=kind,
        start_time=scheduled, number_of_winners=1 if kind == "WIN" else None,
        country_code="NZ" if state == "NZ" else "AU", venue=track)
    return _Market(mid, header, times, runners)


def _parse(raw: bytes) -> tuple[list[str], list[dict[str, str]]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FeedDecodeError("invalid_encoding", f"not UTF-8: {exc}") from None
    try:
        reader = csv.reader(io.StringIO(text))
        header = next(reader, [])
        rows = [dict(zip(header, r, strict=False)) for r in reader if r]
    except csv.Error as exc:
        raise FeedDecodeError("invalid_schema", f"not CSV: {exc}") from None
    return header, rows


def _market_of(kind: str, rows: list[dict[str, str]]) -> _Market:
    if not rows:
        raise FeedDecodeError("invalid_schema", "a market payload without rows")
    if kind == "MATCH_ODDS":
        return _football(rows)
    if kind in ("WIN", "PLACE"):
        return _racing(rows, "WIN" if kind == "WIN" else "PLACE")
    raise FeedDecodeError("unsupported_type", f"channel market kind {kind!r} is not MATCH_ODDS, WIN or PLACE")


# --- planning (for the source) -----------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One step of one market, due at ``time_ms`` (the CSV's clock, ms since
    the epoch; None when the market's times cannot be read — it is then
    delivered first, and rejected). ``order`` breaks ties (file, market, step)."""

    time_ms: int | None
    order: tuple[int, int, int]
    channel: str
    data: bytes


def _document(header: list[str], rows: Iterable[list[str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def schedule(raw: bytes, file_no: int = 0) -> list[Planned]:
    """Split one CSV file into per-market documents and plan their steps.

    raw: the file's bytes. file_no: its position among the replayed files
    (ties). Returns every step of every market (unsorted); a market whose
    times cannot be derived gets one ``pre_off`` step with ``time_ms`` None
    (the normaliser rejects it with the reason). Raises FeedDecodeError for
    a file that is not one of the two layouts, ConfigError when the tz
    database lacks a zone.
    """
    header, _ = _parse(raw.split(b"\n", 1)[0])
    layout = layout_of(header)
    text = raw.decode("utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(text))
    next(reader, None)
    groups: dict[tuple[str, str], list[list[str]]] = {}
    idx = {c: i for i, c in enumerate(header)}
    for r in reader:
        if not r:
            continue
        if layout == "match_odds":
            groups.setdefault(("MATCH_ODDS", _cell(r, idx, "MARKET_ID")), []).append(r)
        else:
            groups.setdefault(("WIN", _cell(r, idx, "WIN_MARKET_ID")), []).append(r)
            place = _cell(r, idx, "PLACE_MARKET_ID")
            if place:
                groups.setdefault(("PLACE", place), []).append(r)
    out: list[Planned] = []
    for m_no, ((kind, _key), rows) in enumerate(groups.items()):
        data = _document(header, rows)
        try:
            market = _market_of(kind, [dict(zip(header, r, strict=False)) for r in rows])
        except FeedDecodeError:
            out.append(Planned(None, (file_no, m_no, 0), f"pre_off:{kind}", data))
            continue
        for s_no, step in enumerate(STEPS):
            out.append(Planned(market.times[step], (file_no, m_no, s_no), f"{step}:{kind}", data))
    return out


def _cell(r: list[str], idx: dict[str, int], col: str) -> str:
    i = idx.get(col)
    return r[i].strip() if i is not None and i < len(r) else ""


# --- the normaliser ------------------------------------------------------------------------


class BetfairCsvNormaliser:
    """Renders one step of one market per payload (module docstring).

    source: the source's name. keep_clock: stamp updates with the CSV's own
    times (``source_ts`` = the step's time) instead of the replay's clock
    (``source_ts`` = the payload's receive time, the moment the replay
    released the step; the CSV time is kept in ``source_ts_original``
    either way). :attr:`dropped` counts later steps of rejected markets.
    """

    #: no live provider times (see Normaliser.live_provider_times)
    live_provider_times = False

    def __init__(self, source: str = "betfair-csv", *, keep_clock: bool = False,
                 max_future_skew_ms: int = MAX_FUTURE_SKEW_MS) -> None:
        self.source = source
        self.keep_clock = keep_clock
        self.max_future_skew_ms = max_future_skew_ms
        self.differ = MarketDiffer(source)
        self.rejected: set[str] = set()
        self.dropped: dict[str, int] = {}

    def restore(self, markets: Iterable[Market], cursor: str | None) -> None:
        """A replay starts over: nothing is seeded. Steps already stored (a
        restarted replay) are older in CSV time than what the book holds and
        are dropped there (``out_of_order``); the rest continue."""

    def feed(self, raw: bytes, recv_ms: int, channel: str = "") -> NormalisedBatch:
        """Render step ``channel`` (``<step>:<MATCH_ODDS|WIN|PLACE>``) of the
        market whose rows ``raw`` holds. Raises FeedDecodeError (with the
        market id when known) for a market with any bad row."""
        step, _, kind = channel.partition(":")
        if step not in STEPS:
            raise FeedDecodeError("unsupported_type", f"channel {channel!r} names no step of {', '.join(STEPS)}")
        header, rows = _parse(raw)
        layout_of(header)
        first_id = market_id_of(rows[0].get("MARKET_ID" if kind == "MATCH_ODDS" else f"{kind}_MARKET_ID") or "") \
            if rows else None
        if first_id is not None and first_id in self.rejected:
            self.dropped["rejected_market"] = self.dropped.get("rejected_market", 0) + 1
            return NormalisedBatch(op=step)
        try:
            market = _market_of(kind, rows)
        except FeedDecodeError as exc:
            if exc.market_id is not None:
                self.rejected.add(exc.market_id)
            exc.raw = raw
            raise
        except ConfigError as exc:
            raise FeedDecodeError("invalid_time", str(exc), raw, market_id=first_id) from None
        t = market.times[step]
        rendered = self._render(market, step, t if self.keep_clock else recv_ms)
        update = self.differ.emit(rendered, recv_ms)
        if update is None:
            return NormalisedBatch(op=step, provider_ts=t)
        update.source_ts_original = t
        return NormalisedBatch(op=step, provider_ts=t, updates=[update], runner_changes=len(update.selections),
                               in_play=step == "in_play")

    def _render(self, market: _Market, step: Step, source_ts: int) -> Rendered:
        settled = step == "settled"
        selections: list[Selection] = []
        total: float | None = None
        any_result = False
        for r in market.runners:
            back, _lay, ltp, volume = r.prices[step]
            status: SelectionStatus = "ACTIVE"
            if settled and r.result is not None:
                status, any_result = r.result, True
            selections.append(Selection(
                selection_id=r.selection_id, name=r.name, status=status, price=back, ltp=ltp, traded_volume=volume,
                sort_priority=r.sort_priority, bsp=r.bsp if step != "pre_off" else None, outcome=r.outcome))
            if volume is not None:
                total = (total or 0.0) + volume
        status_m: MarketStatus = "OPEN"
        if settled:
            status_m = "SETTLED" if any_result else "CLOSED"
        header = MarketHeader(**{**_fields(market.header), "status": status_m, "in_play": step != "pre_off",
                                 "traded_volume": None if total is None else round(total, 2)})
        return Rendered(market_id=market.market_id, header=header, selections=selections, source_ts=source_ts)


def _fields(h: MarketHeader) -> dict[str, Any]:
    return {f: getattr(h, f) for f in MarketHeader.__struct_fields__}


def from_spec(spec: SourceSpec, settings: Settings) -> BetfairCsvNormaliser:
    """The ``betfair-csv`` normaliser of a ``--source`` spec (``keep_clock=1``
    keeps the CSV's times as ``source_ts``)."""
    return BetfairCsvNormaliser(spec.name, keep_clock=_flag(spec, "keep_clock"),
                                max_future_skew_ms=settings.max_future_skew_ms)


def _flag(spec: SourceSpec, key: str) -> bool:
    raw = (spec.get(key, "0") or "0").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"source {spec.name}: {key} must be 1 or 0, not {raw!r}")
