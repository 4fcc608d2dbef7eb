"""Parquet export of price history (issue 12 item 4, `oddsfeed export-history`): what is read back
with pyarrow equals what the store (and GET /v1/markets/{id}/history) holds; --from/--to are
inclusive bounds on the change time; day and source partitions; a re-run replaces the rows of its
range and keeps every other row (also rows Redis has since trimmed); bounded pages and files; the
CLI's exit codes and one-line errors. Real redis-server (embedded), real pyarrow."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import require_shared_data
from feed.embedded_redis import EmbeddedRedis
from feed.history import decode_tops
from feed.history_export import export_history
from feed.ingest import Ingest
from feed.settings import Settings
from feed.sources.replay import recording_files
from feed.store import Store, history_key
from feed.supervisor import run_replay
from streaming_helpers import eventually, make_app, serve

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3_600_000
MIDNIGHT = 1_800_057_600_000  # 2027-01-16T00:00:00Z
RETENTION = 72 * HOUR

Row = tuple[Any, ...]


# --- feeding the store --------------------------------------------------------------------------


def _line(*mc: dict[str, Any], pt: int) -> bytes:
    return orjson.dumps({"op": "mcm", "id": 2, "clk": f"c{pt}", "pt": pt, "mc": list(mc)})


def image(market: str, back: float, *, pt: int) -> tuple[bytes, int]:
    md = {"status": "OPEN", "inPlay": True, "betDelay": 0, "version": 1, "eventId": "30000",
          "eventTypeId": "1", "marketType": "MATCH_ODDS", "marketTime": "2027-01-16T12:00:00.000Z",
          "numberOfWinners": 1, "name": "Match Odds", "eventName": "Home FC v Away FC",
          "runners": [{"id": 1, "sortPriority": 1, "status": "ACTIVE", "name": "Home FC"},
                      {"id": 2, "sortPriority": 2, "status": "ACTIVE", "name": "Away FC"}]}
    return _line({"id": market, "img": True, "marketDefinition": md,
                  "rc": [{"id": 1, "atb": [[back, 10]], "atl": [[back + 0.1, 7]], "ltp": back},
                         {"id": 2, "atb": [[4.0, 3]], "atl": [[4.2, 8]]}]}, pt=pt), pt


def price(market: str, back: float, *, pt: int, size: float = 12) -> tuple[bytes, int]:
    return _line({"id": market, "rc": [{"id": 1, "atb": [[back, size]]}]}, pt=pt), pt


async def feed(store: Store, source: str, *messages: tuple[bytes, int]) -> Ingest:
    """An ingest of ``source`` (history on) fed ``(line, provider ms)`` pairs (received 5 ms
    later), one batched apply each."""
    ingest = Ingest(store, source=source, history_retention_ms=RETENTION)
    for raw, pt in messages:
        ingest.feed_lines([raw], pt + 5)
        await ingest.flush()
    return ingest


async def entries(store: Store, mid: str) -> list[tuple[str, dict[bytes, bytes]]]:
    return await store.history_range(mid, "-", "+", count=1_000_000)


async def wait_entries(store: Store, want: dict[str, int]) -> None:
    async def written() -> bool:
        for mid, n in want.items():
            if len(await entries(store, mid)) < n:
                return False
        return True
    await eventually(written, what=f"history entries {want}")


async def seed_two_days(store: Store) -> Ingest:
    """bf:1.1 (source betfair): changes from 2 s before to 3 s after 2027-01-16 00:00 UTC, two in
    one ms (entry ids <ms>-0, <ms>-1); bf:7.7 (source other): an image 0.5 s before midnight.
    Returns betfair's ingest."""
    m = MIDNIGHT
    ingest = await feed(store, "betfair", image("1.1", 2.0, pt=m - 2000), price("1.1", 2.2, pt=m - 1000),
                        price("1.1", 2.3, pt=m - 1000), price("1.1", 2.4, pt=m), price("1.1", 2.5, pt=m + 1000),
                        price("1.1", 2.6, pt=m + 3000, size=5))
    await feed(store, "other", image("7.7", 3.0, pt=m - 500))
    await wait_entries(store, {"bf:1.1": 6, "bf:7.7": 1})
    return ingest


# --- what the store says, independently of the exporter -----------------------------------------


def _date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).date().isoformat()


async def expected(store: Store, mids: list[str] | None = None, lo: int = 0, hi: int = 1 << 62) -> list[Row]:
    """Every (market, selection) top of the stored history with lo ≤ entry time ≤ hi, as
    :func:`exported` gives them: ids, times (ms), seq, the top, source and date partition."""
    out: list[Row] = []
    for mid in mids if mids is not None else await store.history_markets():
        m = await store.get_market(mid)
        source = m.source if m is not None else "unknown"
        for eid, f in await entries(store, mid):
            ms = int(eid.split("-")[0])
            if lo <= ms <= hi:
                for t in decode_tops(f[b"d"]):
                    out.append((mid, eid, t.selection_id, ms, int(f[b"q"]), int(f[b"t"]), int(f[b"r"]),
                                t.bp, t.bs, t.lp, t.ls, t.ltp, t.price, source, _date(ms)))
    return sorted(out, key=repr)


def exported(out: Path) -> list[Row]:
    """The dataset under ``out`` read back with pyarrow (partition keys from the paths), sorted —
    a duplicated row stays duplicated."""
    table = pq.read_table(out)
    ms = {c: table.column(c).cast(pa.int64()).to_pylist() for c in ("ts", "source_ts", "received_at")}
    cols = {c: table.column(c).to_pylist() for c in table.column_names}
    rows = [(cols["market_id"][i], cols["entry_id"][i], cols["selection_id"][i], ms["ts"][i], cols["seq"][i],
             ms["source_ts"][i], ms["received_at"][i], cols["back_price"][i], cols["back_size"][i],
             cols["lay_price"][i], cols["lay_size"][i], cols["ltp"][i], cols["price"][i],
             cols["source"][i], cols["date"][i]) for i in range(table.num_rows)]
    return sorted(rows, key=repr)


def parquet_files(out: Path) -> list[Path]:
    """The dataset's files (not those of the export's own hidden folders)."""
    return sorted(p for p in out.rglob("*.parquet")
                  if not any(part.startswith(".") for part in p.relative_to(out).parts))


# --- the export ---------------------------------------------------------------------------------


async def test_replay_of_a_real_recording_exports_what_the_store_holds(store: Store, redis_url: str,
                                                                       tmp_path: Path) -> None:
    data = require_shared_data()
    paths = [p for p in (data / "betfair_parser" / "1.242971311.bz2", data / "betfair_parser" / "1.185781277.bz2")
             if p.is_file()]
    if not paths:
        paths = [Path(p) for p in recording_files([data]) if p.suffix == ".bz2"][:2]
        if not paths:
            pytest.skip(f"no .bz2 Betfair recording under {data}")
    summary = await run_replay(store, Settings(history_retention_ms=24 * HOUR), paths, speed=None)
    assert summary.deltas > 0
    mids = await store.history_markets()
    assert mids and set(mids) <= {m.market_id for m in await store.load_all_markets()}

    out = tmp_path / "archive"
    result = await export_history(store, out)
    want = await expected(store)
    got = exported(out)
    assert len(want) > 1000, "the recording should give a real history"
    assert got == want  # every row once, every value as stored, in the partition of its source and UTC day
    assert (result.rows, result.kept_rows, result.markets) == (len(want), 0, len(mids))
    files = parquet_files(out)
    assert result.files == len(files) and result.bytes == sum(p.stat().st_size for p in files)
    assert all(p.parent.parent.name.startswith("date=") and p.parent.name == "source=replay" for p in files)

    # typed columns, units in the schema, each market's snapshot fields on its rows
    schema = pq.read_schema(files[0])
    assert schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert schema.field("received_at").type == pa.timestamp("ms", tz="UTC")
    assert (schema.field("market_id").type, schema.field("seq").type, schema.field("back_price").type) == \
        (pa.string(), pa.int64(), pa.float64())
    assert b"decimal odds" in schema.field("back_price").metadata[b"description"]
    assert "source" not in schema.names and "date" not in schema.names  # partition keys live in the paths
    table = pq.read_table(out, columns=["market_id", "selection_id", "sport", "market_type", "event_id",
                                        "selection_name"])
    snapshots = {m.market_id: m for m in await store.load_all_markets()}
    for row in table.to_pylist()[::97]:
        m = snapshots[row["market_id"]]
        assert (row["sport"], row["market_type"], row["event_id"]) == (m.sport, m.market_type, m.event_id)
        assert row["selection_name"] == next(s.name for s in m.selections if s.selection_id == row["selection_id"])

    # the same as the API's history: entries read and each selection's last top
    mid = max(mids, key=lambda x: sum(1 for r in got if r[0] == x))
    rows = [r for r in got if r[0] == mid]
    lo, hi = min(r[3] for r in rows), max(r[3] for r in rows)
    async with serve(make_app(redis_url)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        r = await c.get(f"/v1/markets/{mid}/history",
                        params={"from": lo, "to": hi, "resolution": max(1, -(-(hi - lo + 1) // 2000))})
        assert r.status_code == 200, r.text
        h = r.json()
    assert h["entries"] == len({r[1] for r in rows}) and not h["truncated"]
    by_entry = sorted(rows, key=lambda r: tuple(map(int, r[1].split("-"))))
    last = {r[2]: r for r in by_entry}
    assert {s["selection_id"] for s in h["selections"]} == set(last)
    for s in h["selections"]:
        p, row = s["points"][-1], last[s["selection_id"]]
        assert (p["at"], p["seq"], p["back_price"], p["back_size"], p["lay_price"], p["lay_size"], p["ltp"]) == \
            (row[3], row[4], row[7], row[8], row[9], row[10], row[11])


async def test_from_and_to_are_inclusive_and_days_split_at_utc_midnight(store: Store, tmp_path: Path) -> None:
    await seed_two_days(store)
    out = tmp_path / "out"
    lo, hi = MIDNIGHT - 1000, MIDNIGHT
    result = await export_history(store, out, start_ms=lo, end_ms=hi)
    got = exported(out)
    want = await expected(store, lo=lo, hi=hi)
    assert got == want
    # both changes at lo (two entries in one ms), the one at hi, bf:7.7's image between; nothing else
    assert [(r[0], r[1], r[2]) for r in sorted(got, key=lambda r: (r[0], r[1], r[2]))] == [
        ("bf:1.1", f"{lo}-0", "1"), ("bf:1.1", f"{lo}-1", "1"), ("bf:1.1", f"{hi}-0", "1"),
        ("bf:7.7", f"{MIDNIGHT - 500}-0", "1"), ("bf:7.7", f"{MIDNIGHT - 500}-0", "2")]
    assert [r[7] for r in sorted(got) if r[0] == "bf:1.1"] == [2.2, 2.3, 2.4]
    assert {(r[14], r[13]) for r in got} == {("2027-01-15", "betfair"), ("2027-01-15", "other"),
                                             ("2027-01-16", "betfair")}
    assert [p.relative_to(out).as_posix() for p in parquet_files(out)] == [
        "date=2027-01-15/source=betfair/part-0.parquet", "date=2027-01-15/source=other/part-0.parquet",
        "date=2027-01-16/source=betfair/part-0.parquet"]
    assert (result.rows, result.markets, result.days) == (5, 2, ["2027-01-15", "2027-01-16"])
    # the market's snapshot fields on each of its rows
    m = await store.get_market("bf:1.1")
    assert m is not None and m.event_name == "Home FC v Away FC"
    described = {(r["market_id"], r["selection_id"], r["bookmaker"], r["sport"], r["competition"], r["event_id"],
                  r["event_name"], r["market_name"], r["market_type"], r["selection_name"])
                 for r in pq.read_table(out).to_pylist()}
    assert {d for d in described if d[0] == "bf:1.1"} == {("bf:1.1", "1", m.bookmaker, m.sport, m.competition,
                                                            m.event_id, m.event_name, m.name, m.market_type, "Home FC")}
    assert {d[1:] for d in described if d[0] == "bf:7.7"} == {
        ("1", m.bookmaker, m.sport, None, "bf:30000", "Home FC v Away FC", "Match Odds", m.market_type, "Home FC"),
        ("2", m.bookmaker, m.sport, None, "bf:30000", "Home FC v Away FC", "Match Odds", m.market_type, "Away FC")}
    assert (m.sport, m.market_type, m.event_id) == ("soccer", "moneyline", "bf:30000")  # two runners, no draw: two-way

    # one market; a window after every change of the other exports nothing of it
    out2 = tmp_path / "one"
    result = await export_history(store, out2, start_ms=MIDNIGHT + 1, markets=["bf:1.1", "bf:7.7"])
    assert exported(out2) == await expected(store, ["bf:1.1"], lo=MIDNIGHT + 1)
    assert (result.rows, result.markets) == (2, 1)


async def test_rerun_replaces_its_range_and_keeps_every_other_row(store: Store, tmp_path: Path) -> None:
    await seed_two_days(store)
    out = tmp_path / "out"
    first = await export_history(store, out)
    everything = await expected(store)
    assert exported(out) == everything and first.rows == len(everything) == 9
    names = [p.relative_to(out) for p in parquet_files(out)]

    again = await export_history(store, out)  # the same range: the same rows, the same files, no duplicates
    assert exported(out) == everything and [p.relative_to(out) for p in parquet_files(out)] == names
    assert (again.rows, again.kept_rows) == (9, 0)

    part = await export_history(store, out, start_ms=MIDNIGHT - 1000, end_ms=MIDNIGHT)  # overlapping
    assert exported(out) == everything
    assert (part.rows, part.kept_rows) == (5, 4)

    # rows of the range are rewritten from Redis, rows outside it are left as they were: once bf:1.1's
    # snapshot is gone (a closed market dropped), a re-export of [midnight, +1 s] finds no source for it
    m = await store.get_market("bf:1.1")
    assert m is not None and await store.prune([("bf:1.1", m.seq)]) == ["bf:1.1"]
    await export_history(store, out, start_ms=MIDNIGHT, end_ms=MIDNIGHT + 1000, markets=["bf:1.1"])
    rows = exported(out)
    assert len(rows) == 9
    moved = sorted((r[1], r[13]) for r in rows if r[0] == "bf:1.1" and r[14] == "2027-01-16")
    assert moved == [(f"{MIDNIGHT}-0", "unknown"), (f"{MIDNIGHT + 1000}-0", "unknown"),
                     (f"{MIDNIGHT + 3000}-0", "betfair")]
    assert (out / "date=2027-01-16" / "source=unknown").is_dir()
    assert {r[13] for r in rows if r[14] == "2027-01-15"} == {"betfair", "other"}  # a day not touched: as it was

    # Redis trims the oldest entries (retention): an export of all that is retained keeps the archived
    # ones and adds what is new
    await store.redis.xtrim(history_key(0, "bf:1.1"), minid=f"{MIDNIGHT}-0", approximate=False)
    assert len(await entries(store, "bf:1.1")) == 3
    await feed(store, "betfair", image("1.1", 2.8, pt=MIDNIGHT + 10_000))
    await wait_entries(store, {"bf:1.1": 4})
    result = await export_history(store, out)
    rows = exported(out)
    assert len(rows) == 11 and len(set(rows)) == 11
    assert {r[1] for r in rows if r[0] == "bf:1.1" and r[3] < MIDNIGHT} == \
        {f"{MIDNIGHT - 2000}-0", f"{MIDNIGHT - 1000}-0", f"{MIDNIGHT - 1000}-1"}
    assert sorted(r[7] for r in rows if r[1] == f"{MIDNIGHT + 10_000}-0") == [2.8, 4.0]
    assert result.rows == 3 + 2 + 2  # bf:1.1's 4 retained entries (the new image: 2 rows) + bf:7.7's image
    assert not list(out.glob(".export-*"))  # the staging folder is gone


async def test_history_of_a_dropped_market_reads_back_as_source_unknown(store: Store, tmp_path: Path) -> None:
    from feed.history import Top, _ENCODER

    # history whose market snapshot is gone (closed markets are dropped before their history expires)
    rows = [(MIDNIGHT + i, MIDNIGHT + i + 40, i + 1, _ENCODER.encode([Top("5", 1.5 + i / 100, 9.0, None, None, 1.5)]))
            for i in range(3)]
    assert await store.write_history({"bf:9.9": rows}, RETENTION) == 3
    assert await store.get_market("bf:9.9") is None and await store.history_markets() == ["bf:9.9"]
    out = tmp_path / "out"
    await export_history(store, out)
    table = pq.read_table(out)  # every row in one partition: still readable, no type to infer from nulls
    assert exported(out) == await expected(store)
    assert set(table.column("source").to_pylist()) == {"unknown"}
    assert table.column("lay_price").null_count == 3 and table.column("sport").null_count == 3
    assert table.column("back_price").to_pylist() == [1.5, 1.51, 1.52]


async def test_pages_row_groups_and_files_are_bounded(store: Store, tmp_path: Path) -> None:
    ingest = await seed_two_days(store)
    for i in range(40):  # 40 more changes, three in each ms
        raw, pt = price("1.1", round(3.0 + i / 100, 2), pt=MIDNIGHT + 5000 + i // 3)
        ingest.feed_lines([raw], pt + 5)
        await ingest.flush()
    await wait_entries(store, {"bf:1.1": 46})
    out = tmp_path / "small"
    result = await export_history(store, out, page_entries=3, row_group_rows=4, max_rows_per_file=5,
                                  max_buffered_rows=6)
    assert exported(out) == await expected(store)
    files = parquet_files(out)
    assert result.files == len(files) and result.rows == 49
    day2 = [p for p in files if "date=2027-01-16/source=betfair" in p.as_posix()]
    assert {p.name for p in day2} == {f"part-{n}.parquet" for n in range(9)}  # 43 rows, at most 5 a file
    for p in files:
        meta = pq.ParquetFile(p).metadata
        assert meta.num_rows <= 5
        assert all(meta.row_group(i).num_rows <= 4 for i in range(meta.num_row_groups))


# --- the command line ---------------------------------------------------------------------------


def _oddsfeed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "feed", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _summary(res: subprocess.CompletedProcess[str]) -> dict[str, float]:
    import re

    assert res.returncode == 0, res.stderr[-2000:]
    [line] = res.stdout.strip().splitlines()
    m = re.fullmatch(r"history export: (\d+) files, ([\d,]+) rows(?: \(\+([\d,]+) kept from earlier exports\))? "
                     r"of (\d+) markets, ([\d,]+) bytes, ([\d.]+) s -> (.+)", line)
    assert m, line
    n = [int((g or "0").replace(",", "")) for g in m.groups()[:5]]
    return {"files": n[0], "rows": n[1], "kept": n[2], "markets": n[3], "bytes": n[4], "seconds": float(m[6])}


async def test_cli_exports_a_range_given_in_iso_8601(store: Store, redis_url: str, tmp_path: Path) -> None:
    await seed_two_days(store)
    out = tmp_path / "cli"
    args = ("export-history", "--out", str(out), "--redis-url", redis_url,
            "--from", "2027-01-15T23:59:59Z", "--to", str(MIDNIGHT + 1000))
    s = _summary(_oddsfeed(*args))
    want = await expected(store, lo=MIDNIGHT - 1000, hi=MIDNIGHT + 1000)
    assert exported(out) == want
    files = parquet_files(out)
    assert (s["files"], s["rows"], s["kept"], s["markets"], s["bytes"]) == \
        (len(files), len(want), 0, 2, sum(p.stat().st_size for p in files))
    s = _summary(_oddsfeed(*args, "--market", "bf:1.1"))  # again, one market: replaced, not duplicated
    assert exported(out) == want and (s["rows"], s["kept"], s["markets"]) == (4, 2, 1)


def test_cli_reads_the_embedded_redis_of_a_data_dir(tmp_path: Path) -> None:
    import asyncio

    server = EmbeddedRedis(tmp_path / "var")  # as `oddsfeed run` leaves it: running in its data directory
    url = server.start()
    try:
        async def seed() -> list[Row]:
            s = await Store.open(url)
            try:
                await seed_two_days(s)
                return await expected(s)
            finally:
                await s.close()
        want = asyncio.run(seed())
        res = _oddsfeed("export-history", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "var"))
        assert _summary(res)["rows"] == len(want) == 9
        assert "using the embedded redis-server already running" in res.stderr
        assert exported(tmp_path / "out") == want
    finally:
        server.stop()


@pytest.mark.parametrize(("args", "says"), [
    ([], "the following arguments are required: --out"),
    (["--out", "{tmp}/o", "--from", "yesterday"],
     "argument --from: expected ISO-8601 UTC (e.g. 2027-01-15T08:00:00Z) or integer ms since the Unix epoch, "
     "not 'yesterday'"),
    (["--out", "{tmp}/o", "--to", "2027-13-01"], "argument --to: expected ISO-8601 UTC"),
    (["--out", "{tmp}/o", "--from", "1969-12-31T00:00:00Z"], "argument --from: must not be before 1970-01-01"),
    (["--out", "{tmp}/file"], "argument --out: expected a folder, not the file"),
    (["--out", "{tmp}/o", "--redis-url", "notaurl"], "argument --redis-url: a Redis URL starts with redis://"),
    (["--out", "{tmp}/o", "--partitions", "0"], "argument --partitions: must be at least 1, not 0"),
    (["--out", "{tmp}/o", "--from", "2000", "--to", "1000"],
     "oddsfeed: error: --from (2000 ms) must not be after --to (1000 ms)"),
    (["--out", "{tmp}/o", "--redis-url", "redis://127.0.0.1:1/0"],
     "oddsfeed: error: cannot reach redis at redis://127.0.0.1:1/0"),
])
def test_cli_bad_arguments_are_one_line_errors(tmp_path: Path, args: list[str], says: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    res = _oddsfeed("export-history", *(a.replace("{tmp}", str(tmp_path)) for a in args), timeout=60)
    assert res.returncode == 2, res.stderr
    assert says in res.stderr.strip().splitlines()[-1], res.stderr
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("*.parquet"))


def test_cli_without_pyarrow_names_the_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['pyarrow'] = None; from feed.cli import main; "
            "raise SystemExit(main(sys.argv[1:]))")
    # an unreachable Redis: the missing pyarrow is reported before any Redis is touched
    res = subprocess.run([sys.executable, "-c", code, "export-history", "--out", str(tmp_path / "o"),
                          "--redis-url", "redis://127.0.0.1:1/0"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "oddsfeed: error: the Parquet export needs pyarrow: pip install 'oddsfeed[parquet]'"]
    assert not (tmp_path / "o").exists()
