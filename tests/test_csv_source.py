"""``betfair-csv``: Betfair Data Scientists' historic CSVs replayed as a source,
through the real pipeline into the embedded Redis — the shared real files
(skipped when ../shared/data is absent) and small synthetic ones."""

from __future__ import annotations

import asyncio
import contextlib
import csv
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from feed.errors import ConfigError
from feed.models import Delta, Market
from feed.normalise.betfair_csv import kick_off_ms
from feed.pipeline import Pipeline, run_spec
from feed.settings import Settings
from feed.sources.base import Source
from feed.sources.csv_replay import CsvReplaySource
from feed.sources.spec import parse_source_spec
from feed.store import Store
from tests.conftest import SHARED_DATA
from tests.streaming_helpers import eventually

pytestmark = pytest.mark.timeout(180)

HUB = SHARED_DATA / "betfair-datascientists-hub"
A_LEAGUE = HUB / "A-League_2024-2025_Match_Odds.csv"
ANZ = HUB / "ANZ_Thoroughbreds_2021_07.csv"


def require(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"needs the shared Betfair CSV {path} (../shared/data beside the project); not present")
    return path


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def utc_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


@contextlib.asynccontextmanager
async def replaying(store: Store, spec_text: str) -> AsyncIterator[tuple[CsvReplaySource, Pipeline]]:
    """Run the spec through ``run_spec`` until every planned step was delivered and stored."""
    got: list[tuple[Source, Pipeline]] = []
    task = asyncio.create_task(run_spec(store, Settings(), parse_source_spec(spec_text),
                                        on_source=lambda s, p: got.append((s, p))))
    try:
        await eventually(lambda: got or task.done(), 10, "the source starts")
        source, pipeline = got[0]
        assert isinstance(source, CsvReplaySource)
        await eventually(lambda: source.finished.is_set() or task.done(), 120, "every step delivered")
        assert not task.done(), task.exception()
        await eventually(lambda: not pipeline.ingest.pending and not pipeline.ingest.backlog, 30, "all stored")
        yield source, pipeline
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def markets_of(store: Store, source: str) -> dict[str, Market]:
    return {m.market_id: m for m in await store.load_all_markets() if m.source == source}


def in_csv_order(deltas: list[Delta]) -> bool:
    """Replayed times never run against the CSV's: sorted by CSV time, the
    mapped ``source_ts`` never goes down (one log entry holds a whole batch,
    grouped by market, so log order is not time order)."""
    by_csv = sorted(deltas, key=lambda d: (d.source_ts_original or 0, d.source_ts))
    mapped = [d.source_ts for d in by_csv]
    return mapped == sorted(mapped)


async def deltas_of(store: Store, source: str) -> list[Delta]:
    """Every stored delta of ``source``, in log order."""
    return [d for _, ds in await store.log_range(0, "0-0") for d in ds if d.source == source]


# --- the real files ---------------------------------------------------------------------------


async def test_the_a_league_csv_plays_every_market_from_kick_off_to_settlement(store: Store) -> None:
    rows = rows_of(require(A_LEAGUE))
    runners: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        runners[f"bfcsv:1.{r['MARKET_ID']}"].add(r["SELECTION_ID"])
    async with replaying(store, f"betfair-csv={A_LEAGUE},name=aleague") as (source, pipeline):
        markets = await markets_of(store, "aleague")
        deltas = await deltas_of(store, "aleague")
        health = await store.get_health("aleague")
    assert source.planned == 3 * len(runners) and source.delivered == source.planned
    assert set(markets) == set(runners) and len(markets) == 176
    assert {mid: {s.selection_id for s in m.selections} for mid, m in markets.items()} == runners
    assert {m.status for m in markets.values()} == {"SETTLED"}
    assert all(m.sport == "soccer" and m.bookmaker == "betfair_exchange" and m.market_type == "match_result"
               and m.market_type_raw == "MATCH_ODDS" and m.competition == "Australian A-League Men"
               for m in markets.values())
    # every market: one winner, as the CSV says, and home / draw / away outcomes
    winners = {f"bfcsv:1.{r['MARKET_ID']}": r["SELECTION_ID"] for r in rows if r["RUNNER_STATUS"] == "WINNER"}
    assert {mid: [s.selection_id for s in m.selections if s.status == "WINNER"] for mid, m in markets.items()} \
        == {mid: [sid] for mid, sid in winners.items()}
    assert all(sorted(str(s.outcome) for s in m.selections) == ["away", "draw", "home"]
               for m in markets.values())

    # a known market: Central Coast Mariners v Melbourne Victory, 18 Oct 2024 (kick-off 19:35 AEDT)
    mid = "bfcsv:1.233485927"
    m = markets[mid]
    assert (m.event_id, m.event_name, m.country_code) == (
        "bfcsv:33623427", "Central Coast Mariners v Melbourne Victory", "AU")
    assert m.start_time == utc_ms("2024-10-18T08:35:00")  # HALF_TIME 09:26:15Z − 48 min, down to :35
    steps = [d for d in deltas if d.market_id == mid]
    assert [d.kind for d in steps] == ["image", "delta", "delta"]
    image = steps[0].market
    assert image is not None and image.status == "OPEN" and not image.in_play
    assert steps[0].source_ts_original == m.start_time
    kick_off = {s.selection_id: (s.price, s.traded_volume, s.back, s.lay) for s in image.selections}
    assert kick_off == {"1205126": (3.3, 15367.27, [], []), "1205124": (2.34, 26460.4, [], []),
                        "58805": (3.7, 11219.47, [], [])}  # best back as price; the CSV has no sizes
    half = steps[1]
    assert half.header is not None and half.header.in_play and half.header.status == "OPEN"
    assert half.source_ts_original == utc_ms("2024-10-18T09:26:15")
    assert {s.selection_id: s.price for s in half.selections} == {"1205126": 3.9, "1205124": 2.78, "58805": 2.6}
    assert steps[2].header is not None and steps[2].header.status == "SETTLED"
    draw = m.selection("58805")
    assert draw is not None and draw.status == "WINNER" and draw.traded_volume == 79510.34  # TOTAL_MATCHED_VOLUME

    # replayed times follow the CSV's order (the CSV's own clock is kept in source_ts_original)
    assert in_csv_order(deltas)
    assert all(d.source_ts == d.received_at > utc_ms("2025-06-01T00:00:00") for d in deltas)  # mapped onto now
    assert health is not None and (health.state, health.reason) == ("DOWN", "replay_finished")
    assert await store.quarantined() == []


def test_the_kick_off_rule_matches_the_betfair_stream_recording() -> None:
    """Two A-League markets also appear in a Betfair stream recording: its ``marketTime`` is the kick-off."""
    from feed.sources.replay import read_messages

    rows = rows_of(require(A_LEAGUE))
    stream = require(SHARED_DATA / "betfair-stream" / "betfair_parser" / "1.242971311.bz2")
    market_time: dict[str, str] = {}
    for line in read_messages(stream) or []:
        for mc in orjson.loads(line).get("mc", []):
            if "marketDefinition" in mc:
                market_time[mc["id"]] = mc["marketDefinition"]["marketTime"]
    for mid in ("243383462", "243383567"):
        half = next(r["HALF_TIME"] for r in rows if r["MARKET_ID"] == mid)
        derived = kick_off_ms(utc_ms(half.replace(" Z", "")))
        assert derived == utc_ms(market_time[f"1.{mid}"].replace("Z", "")), mid


async def test_the_thoroughbred_csv_plays_win_and_place_markets_with_bsp_and_results(store: Store) -> None:
    rows = rows_of(require(ANZ))
    win: dict[str, set[str]] = defaultdict(set)
    place: dict[str, set[str]] = defaultdict(set)
    place_with_result: set[str] = set()  # place markets with a PLACE_RESULT on any of their rows
    for r in rows:
        win[f"bfcsv:1.{r['WIN_MARKET_ID']}"].add(r["SELECTION_ID"])
        if r["PLACE_MARKET_ID"]:
            place[pmid := f"bfcsv:1.{r['PLACE_MARKET_ID'].removesuffix('.0')}"].add(r["SELECTION_ID"])
            if r["PLACE_RESULT"]:
                place_with_result.add(pmid)
    async with replaying(store, f"betfair-csv={ANZ},name=anz") as (_source, _pipeline):
        markets = await markets_of(store, "anz")
        assert await store.quarantined() == []
    assert len(win) == 1583 and len(place) == 1592
    assert {mid for mid, m in markets.items() if m.market_type == "win"} == set(win)
    assert {mid for mid, m in markets.items() if m.market_type == "place"} == set(place)
    assert {mid: {s.selection_id for s in m.selections} for mid, m in markets.items()} == {**win, **place}
    # settled where the CSV gives results; the place markets without any result only close
    unsettled = set(place) - place_with_result  # (one pass over the rows above, not one per place market)
    assert {mid for mid, m in markets.items() if m.status == "CLOSED"} == unsettled and len(unsettled) == 12
    assert all(m.status == "SETTLED" for mid, m in markets.items() if mid not in unsettled)

    # Lismore R7, 30 Jul 2021 (NSW, AEST = UTC+10): the race of the stream recording 1.185781277
    race = [r for r in rows if r["WIN_MARKET_ID"] == "185781277"]
    m = markets["bfcsv:1.185781277"]
    assert (m.event_id, m.event_name, m.venue, m.country_code, m.market_type_raw, m.sport) == (
        "bfcsv:2021-07-30:lismore", "Lismore R7", "Lismore", "AU", "WIN", "horse_racing")
    assert m.start_time == utc_ms("2021-07-30T05:44:00")  # 15:44 local
    assert {s.selection_id: (s.status, s.bsp) for s in m.selections} == {
        r["SELECTION_ID"]: (r["WIN_RESULT"], float(r["WIN_BSP"])) for r in race}
    assert {s.selection_id: s.outcome for s in m.selections} == {
        r["SELECTION_ID"]: r["SELECTION_ID"] for r in race}
    # an NZ meeting keeps its own country (Pacific/Auckland times)
    nz = next(r for r in rows if r["STATE_CODE"] == "NZ")
    assert markets[f"bfcsv:1.{nz['WIN_MARKET_ID']}"].country_code == "NZ"


async def test_the_thoroughbred_results_agree_with_the_betfair_stream_recording(store: Store,
                                                                                 tmp_path: Path) -> None:
    """PROVENANCE: the CSV's Lismore R7 agrees with the final marketDefinition of 1.185781277."""
    from feed.sources.replay import read_messages

    rows = [r for r in rows_of(require(ANZ)) if r["WIN_MARKET_ID"] == "185781277"]
    stream = require(SHARED_DATA / "betfair-stream" / "betfair_parser" / "1.185781277.bz2")
    final: dict[str, tuple[str, float | None]] = {}
    for line in read_messages(stream) or []:
        for mc in orjson.loads(line).get("mc", []):
            for rd in (mc.get("marketDefinition") or {}).get("runners", []):
                final[str(rd["id"])] = (rd["status"], rd.get("bsp"))
    path = write_csv(tmp_path / "lismore.csv", list(rows[0]), rows)
    async with replaying(store, f"betfair-csv={path},name=lismore") as _:
        m = await store.get_market("bfcsv:1.185781277")
    assert m is not None
    got = {s.selection_id: (s.status, s.bsp) for s in m.selections}
    want = {sid: (st, round(bsp, 2) if isinstance(bsp, float) else bsp) for sid, (st, bsp) in final.items()
            if st != "REMOVED"}
    assert len(got) == 14 and got == want


# --- synthetic files ---------------------------------------------------------------------------

FOOTBALL_HEADER = ("EVENT_DATE,PATH,EVENT_ID,MARKET_TYPE,MARKET_ID,MARKET_NAME,SELECTION_ID,RUNNER_NAME,"
                   "RUNNER_STATUS,IS_WINNER,TOTAL_GOALS,HOME_TEAM,AWAY_TEAM,HOME_MARGIN,HOME_SCORE,AWAY_SCORE,"
                   "BEST_BACK_KICK_OFF,BEST_LAY_KICK_OFF,MATCHED_VOLUME_KICK_OFF,HALF_TIME,BEST_BACK_PRICE_HALF_TIME,"
                   "BEST_LAY_PRICE_HALF_TIME,MATCHED_VOLUME_HALF_TIME,TOTAL_MATCHED_VOLUME").split(",")


def football_rows(market_id: str, event_id: str, half_time: str, *, home: str = "Home FC", away: str = "Away FC",
                  winner: str = "home", change: dict[str, dict[str, str]] | None = None) -> list[dict[str, str]]:
    """Three runner rows of one MATCH_ODDS market; ``change[outcome]`` replaces columns of one row."""
    out = []
    for i, (outcome, sid, name) in enumerate((("home", "101", home), ("away", "102", away),
                                             ("draw", "58805", "The Draw"))):
        row = {
            "EVENT_DATE": half_time[:10] + " 00:00:00.000 Z",
            "PATH": f"Australian Soccer/Test League/Fixtures 1 Jan/{home} v {away}", "EVENT_ID": event_id,
            "MARKET_TYPE": "MATCH_ODDS", "MARKET_ID": market_id, "MARKET_NAME": "Match Odds",
            "SELECTION_ID": sid, "RUNNER_NAME": name, "RUNNER_STATUS": "WINNER" if outcome == winner else "LOSER",
            "IS_WINNER": "1" if outcome == winner else "0", "TOTAL_GOALS": "1", "HOME_TEAM": home,
            "AWAY_TEAM": away, "HOME_MARGIN": "1", "HOME_SCORE": "1", "AWAY_SCORE": "0",
            "BEST_BACK_KICK_OFF": f"{2.0 + i}", "BEST_LAY_KICK_OFF": f"{2.02 + i:.2f}",
            "MATCHED_VOLUME_KICK_OFF": "100.5", "HALF_TIME": half_time,
            "BEST_BACK_PRICE_HALF_TIME": f"{1.5 + i}", "BEST_LAY_PRICE_HALF_TIME": f"{1.52 + i:.2f}",
            "MATCHED_VOLUME_HALF_TIME": "200", "TOTAL_MATCHED_VOLUME": "300",
        }
        row.update((change or {}).get(outcome, {}))
        out.append(row)
    return out


def write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


def synthetic_football(path: Path, markets: int, *, first_half_time: str = "2024-10-18 09:30:00.000 Z",
                       every_min: int = 30, id_base: int = 900_000_000) -> Path:
    """``markets`` good MATCH_ODDS markets (ids from ``id_base``), half-times ``every_min`` apart."""
    base = utc_ms(first_half_time.replace(" Z", ""))
    rows = []
    for i in range(markets):
        t = datetime.fromtimestamp((base + i * every_min * 60_000) / 1000, UTC)
        rows += football_rows(str(id_base + i), str(id_base + i), t.strftime("%Y-%m-%d %H:%M:%S.000 Z"),
                              home=f"Home {i}", away=f"Away {i}", winner=("home", "away", "draw")[i % 3])
    return write_csv(path, FOOTBALL_HEADER, rows)


async def test_bad_rows_are_quarantined_per_market_and_the_rest_plays_on(store: Store, tmp_path: Path) -> None:
    ht = "2024-10-18 09:30:00.000 Z"
    rows = (football_rows("900000001", "1", ht)
            + football_rows("900000002", "2", ht, change={"away": {"BEST_BACK_KICK_OFF": "abc"}})
            + football_rows("900000003", "3", ht, change={"draw": {"BEST_BACK_PRICE_HALF_TIME": "1001"}})
            + football_rows("900000004", "4", ht, change={"home": {"SELECTION_ID": ""}})
            + football_rows("900000005", "5", "half time")
            + football_rows("900000006", "6", ht, change={"away": {"TOTAL_MATCHED_VOLUME": "-3"}})
            + football_rows("", "7", ht)
            + football_rows("900000008", "8", "2024-10-18 11:30:00.000 Z"))
    path = write_csv(tmp_path / "bad.csv", FOOTBALL_HEADER, rows)
    async with replaying(store, f"betfair-csv={path},name=bad") as (_source, pipeline):
        markets = await markets_of(store, "bad")
        quarantined = await store.quarantined()
        health = await store.get_health("bad")
    assert set(markets) == {"bfcsv:1.900000001", "bfcsv:1.900000008"}
    assert all(m.status == "SETTLED" and len(m.selections) == 3 for m in markets.values())
    reasons = sorted((str(q["reason"]), str(q["detail"]).rsplit(" in market ", 1)[-1]) for q in quarantined)
    assert reasons == [
        ("invalid_price", "bfcsv:1.900000002"), ("invalid_price", "bfcsv:1.900000003"),
        ("invalid_size", "bfcsv:1.900000006"), ("invalid_time", "bfcsv:1.900000005"),
        ("missing_id", "MARKET_ID '' is not a market id"), ("missing_id", "bfcsv:1.900000004"),
    ]
    assert all(q["source"] == "bad" and b"MATCH_ODDS" in q["raw"] for q in quarantined)  # type: ignore[operator]
    assert health is not None and health.rejected == 6 and health.reason == "replay_finished"


async def test_a_paced_replay_maps_the_csv_clock_onto_now_in_time_order(store: Store, tmp_path: Path) -> None:
    """Six markets 30 min apart (4 h 25 min of CSV time) at 100,000×: ~160 ms, in the CSV's order."""
    path = synthetic_football(tmp_path / "paced.csv", 6)
    speed = 100_000
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    start_ms = int(datetime.now(UTC).timestamp() * 1000)
    async with replaying(store, f"betfair-csv={path},speed={speed},name=paced") as (source, _):
        elapsed = loop.time() - t0
        deltas = await deltas_of(store, "paced")
    assert source.delivered == 18 and len(deltas) == 18
    originals = sorted(d.source_ts_original or 0 for d in deltas)
    span = originals[-1] - originals[0]
    # first kick-off 08:40 (09:30 − 48 min, down to a 5-minute mark) … last result 13:05 (12:00 + 65 min)
    assert span == utc_ms("2024-10-18T13:05:00") - utc_ms("2024-10-18T08:40:00")
    assert elapsed >= span / speed / 1000 * 0.9
    assert in_csv_order(deltas)
    first = min(d.source_ts for d in deltas)
    assert first >= start_ms
    for d in deltas:  # released no earlier than its CSV time, mapped: start + (t − first) / speed
        assert d.source_ts - first >= ((d.source_ts_original or 0) - originals[0]) / speed - 2


async def test_keep_clock_keeps_the_csv_times(store: Store, tmp_path: Path) -> None:
    path = synthetic_football(tmp_path / "kept.csv", 2)
    async with replaying(store, f"betfair-csv={path},keep_clock=1,name=kept") as _:
        deltas = await deltas_of(store, "kept")
    assert len(deltas) == 6 and all(d.source_ts == d.source_ts_original for d in deltas)


async def test_a_folder_plays_its_files_as_one_timeline_and_on_end_stop_ends_the_source(
        store: Store, tmp_path: Path) -> None:
    synthetic_football(tmp_path / "a.csv", 2, first_half_time="2024-10-18 12:00:00.000 Z")
    synthetic_football(tmp_path / "b.csv", 1, first_half_time="2024-10-18 09:00:00.000 Z", id_base=800_000_000)
    (tmp_path / "notes.txt").write_text("not a csv")
    spec = parse_source_spec(f"betfair-csv={tmp_path},on_end=stop,name=folder")
    await asyncio.wait_for(run_spec(store, Settings(), spec), 60)  # returns by itself
    deltas = await deltas_of(store, "folder")
    assert len(deltas) == 9 and in_csv_order(deltas)
    first = min(deltas, key=lambda d: d.source_ts_original or 0)
    assert (first.market_id, first.source_ts_original) == ("bfcsv:1.800000000", utc_ms("2024-10-18T08:10:00"))
    assert first.source_ts == min(d.source_ts for d in deltas)  # b.csv's market was delivered first
    health = await store.get_health("folder")
    assert health is not None and health.state == "DOWN"


def test_bad_options_and_paths_name_what_to_fix(tmp_path: Path) -> None:
    from feed.pipeline import build

    with pytest.raises(ConfigError, match="unknown option 'sped'"):
        parse_source_spec("betfair-csv=x.csv,sped=2")
    for text, message in (("betfair-csv=x.csv,speed=0", "speed must be a number > 0"),
                          ("betfair-csv=x.csv,on_end=later", "on_end must be wait or stop"),
                          ("betfair-csv=x.csv,keep_clock=maybe", "keep_clock must be 1 or 0")):
        with pytest.raises(ConfigError, match=message):
            build(None, Settings(), parse_source_spec(text))  # type: ignore[arg-type]
    from feed.sources.csv_replay import csv_files, load_plan

    with pytest.raises(ConfigError, match="no such file or folder"):
        csv_files([tmp_path / "missing.csv"])
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="not a Betfair data-scientists"):
        load_plan([other])


async def test_a_missing_file_ends_the_source_fatally(store: Store, tmp_path: Path) -> None:
    spec = parse_source_spec(f"betfair-csv={tmp_path / 'missing.csv'},name=missing")
    with pytest.raises(ConfigError, match="no such file"):
        await asyncio.wait_for(run_spec(store, Settings(), spec), 30)
