"""Export the price history kept in Redis to Parquet files (issue 12 item 4).

``oddsfeed export-history --out DIR`` (:func:`export_history`) reads every
market's history stream (:mod:`feed.history`) through the :class:`~feed.store.Store`
API, page by page, and writes it as a Hive-partitioned Parquet dataset::

    DIR/date=YYYY-MM-DD/source=<source>/part-<n>.parquet

``date`` is the UTC day of the change (``ts``); ``source`` the name of the
source that owns the market (the ``source`` of its stored snapshot,
URI-encoded), ``unknown`` when the snapshot is gone: closed markets are
dropped ``settled_retention_ms`` after closing, their history stays up to
``history_retention_ms``. (Not Hive's null, ``__HIVE_DEFAULT_PARTITION__``:
pyarrow cannot read a dataset whose every ``source`` is null.) The two are
directory keys only, not columns inside the files (as Hive, Spark, DuckDB and
pyarrow expect: a reader of ``DIR`` gets them as columns from the path; the
same name inside the files would clash). Day partitions keep one day of
archive together however many exports fed it; ``source`` lets a reader skip
the providers it does not study. ``part-<n>`` holds at most
``max_rows_per_file`` rows (zstd-compressed, row groups of
``row_group_rows``). Files and folders whose names start with ``.`` or ``_``
are the export's own (lock, staging) and are skipped by every reader.

One row per selection per history entry (an entry is one applied change that
moved at least one selection's top of book; it holds a top for each selection
that moved). Columns — every time is a UTC timestamp with millisecond unit
(``timestamp[ms, tz=UTC]``), every price decimal odds, every size in the
market's currency as the provider gives it; the Parquet schema carries the
same text as each field's ``description`` metadata:

==============  =====================  ================================================================
market_id       string, not null       canonical market id (``bf:1.206064380``)
selection_id    string, not null       the selection's id in the market (``47972``, ``47972:-0.25``)
ts              timestamp, not null    time of the change: the history entry's id time — the provider
                                       time, kept non-decreasing per market; what ``GET
                                       /v1/markets/{id}/history`` calls ``at`` and filters on
entry_id        string, not null       the history stream entry id ``<ms>-<n>``: (market_id, entry_id,
                                       selection_id) is unique; orders changes with equal ``ts``
seq             int64, not null        the market's seq after the change
source_ts       timestamp, not null    the change's provider time as recorded (``ts`` unless the
                                       provider's clock went back; a replay's mapped onto now)
received_at     timestamp, not null    when the ingest read the change's bytes (a poller's: as of its request)
back_price      float64                best back price (null: nothing offered to back)
back_size       float64                size available at back_price
lay_price       float64                best lay price (null: nothing offered to lay)
lay_size        float64                size available at lay_price
ltp             float64                last traded price
price           float64                the offered price: a bookmaker's price, an exchange's best back
bookmaker …     string                 bookmaker, sport, competition, event_id, event_name, market_name,
                                       market_type, selection_name: from the market's stored snapshot
                                       at export time (descriptive; null when the snapshot is gone)
==============  =====================  ================================================================

Not exported: a market's or selection's status, in-play flag and traded
volume. The history does not record them (only tops of book), and the
snapshot's current values would misstate every older row.

Bounds: ``start_ms``/``end_ms`` (inclusive, ms since the epoch, UTC) select
entries by ``ts``; without ``end_ms`` each market is read up to its newest
entry when the export reaches it (entries written later wait for the next
export). Memory is bounded: ``page_entries`` entries per Redis call, at most
``max_buffered_rows`` rows held before they are written.

Idempotence: an export owns, per market, the span of history ids it read
(its first to its last entry in the range). In every day partition such a
span touches it writes what it read and carries over every other row already
there (other markets, other times, rows older than what Redis still holds);
rows inside a span are replaced, not duplicated. So re-running a range, or
overlapping ranges (a nightly ``export-history`` of all that is retained),
never duplicates a row and never drops an archived row that Redis has since
trimmed. Each touched day is built in a staging folder under ``DIR`` and
swapped in by two renames when everything is written (an interrupted export
leaves the earlier files as they were); ``DIR/.export.lock`` keeps two
exports from writing one folder at once. Days no span touches are not read
or rewritten.

pyarrow is optional (``pip install 'oddsfeed[parquet]'``): this module
imports without it and :func:`require_pyarrow` raises ConfigError naming the
extra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

from redis.exceptions import RedisError

from feed.errors import ConfigError, StoreError
from feed.history import decode_tops
from feed.models import Market
from feed.store import Store

logger = logging.getLogger(__name__)

__all__ = ["COLUMNS", "ExportResult", "export_history", "require_pyarrow", "schema"]

DAY_MS = 86_400_000
#: the source partition of a market whose snapshot is gone
UNKNOWN_SOURCE = "unknown"
INSTALL_HINT = "pip install 'oddsfeed[parquet]'"

#: (name, arrow type name, nullable, description) of every column, in file order
COLUMNS: tuple[tuple[str, str, bool, str], ...] = (
    ("market_id", "string", False, "canonical market id"),
    ("selection_id", "string", False, "selection id within the market"),
    ("ts", "timestamp", False, "time of the change, UTC ms: the history entry id's time (provider time, "
                               "non-decreasing per market)"),
    ("entry_id", "string", False, "history stream entry id <ms>-<n>; (market_id, entry_id, selection_id) is unique"),
    ("seq", "int64", False, "the market's seq after the change"),
    ("source_ts", "timestamp", False, "provider time of the change as recorded, UTC ms"),
    ("received_at", "timestamp", False, "when the ingest read the change (a poller's: as of its request), UTC ms"),
    ("back_price", "float64", True, "best back price, decimal odds (null: nothing offered)"),
    ("back_size", "float64", True, "size at the best back price, market currency"),
    ("lay_price", "float64", True, "best lay price, decimal odds (null: nothing offered)"),
    ("lay_size", "float64", True, "size at the best lay price, market currency"),
    ("ltp", "float64", True, "last traded price, decimal odds"),
    ("price", "float64", True, "offered price, decimal odds (bookmaker price or exchange best back)"),
    ("bookmaker", "string", True, "from the market snapshot at export time"),
    ("sport", "string", True, "from the market snapshot at export time"),
    ("competition", "string", True, "from the market snapshot at export time"),
    ("event_id", "string", True, "from the market snapshot at export time"),
    ("event_name", "string", True, "from the market snapshot at export time"),
    ("market_name", "string", True, "from the market snapshot at export time"),
    ("market_type", "string", True, "canonical market type, from the market snapshot at export time"),
    ("selection_name", "string", True, "from the market snapshot at export time"),
)
_MARKET_COLUMNS = ("bookmaker", "sport", "competition", "event_id", "event_name", "market_name", "market_type")
_SCHEMA_VERSION = b"1"


def require_pyarrow() -> tuple[ModuleType, ModuleType, ModuleType]:
    """(pyarrow, pyarrow.parquet, pyarrow.compute); ConfigError naming the
    ``parquet`` extra when pyarrow is not installed."""
    try:
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.compute as pc  # type: ignore[import-untyped]
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(f"the Parquet export needs pyarrow: {INSTALL_HINT}") from None
    return pa, pq, pc


def schema() -> Any:
    """The files' ``pyarrow.Schema`` (:data:`COLUMNS`, each field's text as its
    ``description`` metadata). Raises ConfigError without pyarrow."""
    pa, _, _ = require_pyarrow()
    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(),
             "timestamp": pa.timestamp("ms", tz="UTC")}
    return pa.schema([pa.field(name, types[t], nullable=nullable, metadata={"description": doc})
                      for name, t, nullable, doc in COLUMNS],
                     metadata={"oddsfeed.history_export": _SCHEMA_VERSION})


@dataclass(slots=True)
class ExportResult:
    """What an export did. rows: rows read from Redis and written; kept_rows:
    rows of earlier exports carried over in the rewritten days; files / bytes:
    the Parquet files of the rewritten days (all of them, carried rows
    included); days: the rewritten day partitions (``YYYY-MM-DD``);
    markets: markets with at least one row; seconds: wall time."""

    out: Path
    rows: int = 0
    kept_rows: int = 0
    files: int = 0
    bytes: int = 0
    markets: int = 0
    days: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """The one line ``oddsfeed export-history`` prints."""
        kept = f" (+{self.kept_rows:,} kept from earlier exports)" if self.kept_rows else ""
        return (f"history export: {self.files} files, {self.rows:,} rows{kept} of {self.markets} markets, "
                f"{self.bytes:,} bytes, {self.seconds:.2f} s -> {self.out}")


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms // DAY_MS * 86_400, UTC).strftime("%Y-%m-%d")


def _source_dir(source: str | None) -> str:
    return "source=" + quote(source or UNKNOWN_SOURCE, safe="")


def _entry_id(eid: str) -> tuple[int, int]:
    ms, _, n = eid.partition("-")
    return int(ms), int(n or 0)


class _Part:
    """The files of one (day, source) partition being written in staging."""

    def __init__(self, sink: _Sink, folder: Path) -> None:
        self.sink = sink
        self.folder = folder
        self.pending: list[Any] = []
        self.pending_rows = 0
        self.writer: Any = None
        self.file_no = 0
        self.file_rows = 0
        self.paths: list[Path] = []

    def flush(self) -> int:
        """Write what is pending (rolling files at max_rows_per_file); the rows written."""
        if not self.pending_rows:
            return 0
        pa, pq = self.sink.pa, self.sink.pq
        table = pa.Table.from_batches(self.pending, schema=self.sink.schema)
        n = self.pending_rows
        self.pending, self.pending_rows = [], 0
        cap = self.sink.max_rows_per_file
        while table.num_rows:
            if self.writer is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / f"part-{self.file_no}.parquet"
                self.paths.append(path)
                self.writer = pq.ParquetWriter(path, self.sink.schema, compression="zstd")
            chunk = table.slice(0, cap - self.file_rows)
            self.writer.write_table(chunk, row_group_size=self.sink.row_group_rows)
            self.file_rows += chunk.num_rows
            table = table.slice(chunk.num_rows)
            if self.file_rows >= cap:
                self.close()
        return n

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.file_no += 1
            self.file_rows = 0


class _Sink:
    """Routes record batches to their (day, source) partition under ``root``,
    holding at most ``max_buffered_rows`` rows before writing."""

    def __init__(self, root: Path, *, row_group_rows: int, max_rows_per_file: int, max_buffered_rows: int) -> None:
        self.pa, self.pq, self.pc = require_pyarrow()
        self.schema = schema()
        self.root = root
        self.row_group_rows = row_group_rows
        self.max_rows_per_file = max_rows_per_file
        self.max_buffered_rows = max_buffered_rows
        self.parts: dict[tuple[str, str], _Part] = {}
        self.buffered = 0

    def add(self, day: str, source_dir: str, batch: Any) -> None:
        if not batch.num_rows:
            return
        part = self.parts.get((day, source_dir))
        if part is None:
            part = self.parts[(day, source_dir)] = _Part(self, self.root / f"date={day}" / source_dir)
        part.pending.append(batch)
        part.pending_rows += batch.num_rows
        self.buffered += batch.num_rows
        if part.pending_rows >= self.row_group_rows:
            self.buffered -= part.flush()
        if self.buffered > self.max_buffered_rows:
            for p in self.parts.values():
                self.buffered -= p.flush()

    def close(self) -> None:
        for p in self.parts.values():
            p.flush()
            p.close()
        self.buffered = 0

    def page(self, market_id: str, market: Market | None, rows: list[tuple[str, dict[bytes, bytes]]]) -> int:
        """Add one page of a market's history entries (oldest first); the rows added."""
        cols: dict[str, list[Any]] = {name: [] for name, _, _, _ in COLUMNS}
        names = {s.selection_id: s.name for s in market.selections} if market is not None else {}
        days: list[tuple[int, int]] = []  # (day number, first row)
        n = 0
        sel, ts, eids, seqs, st, ra = (cols["selection_id"], cols["ts"], cols["entry_id"], cols["seq"],
                                       cols["source_ts"], cols["received_at"])
        bp, bs, lp, ls, ltp, price, sname = (cols["back_price"], cols["back_size"], cols["lay_price"],
                                             cols["lay_size"], cols["ltp"], cols["price"], cols["selection_name"])
        for eid, f in rows:
            ms = _entry_id(eid)[0]
            if not days or ms // DAY_MS != days[-1][0]:
                days.append((ms // DAY_MS, n))
            t, r, q = int(f[b"t"]), int(f[b"r"]), int(f[b"q"])
            for top in decode_tops(f[b"d"]):
                sel.append(top.selection_id)
                ts.append(ms)
                eids.append(eid)
                seqs.append(q)
                st.append(t)
                ra.append(r)
                bp.append(top.bp)
                bs.append(top.bs)
                lp.append(top.lp)
                ls.append(top.ls)
                ltp.append(top.ltp)
                price.append(top.price)
                sname.append(names.get(top.selection_id))
                n += 1
        if not n:
            return 0
        cols["market_id"] = [market_id] * n
        for name in _MARKET_COLUMNS:
            value = getattr(market, "name" if name == "market_name" else name) if market is not None else None
            cols[name] = [value] * n
        batch = self.pa.RecordBatch.from_pydict(cols, schema=self.schema)
        source_dir = _source_dir(market.source if market is not None else None)
        for i, (day, first) in enumerate(days):
            end = days[i + 1][1] if i + 1 < len(days) else n
            self.add(_day(day * DAY_MS), source_dir, batch.slice(first, end - first))
        return n

    def carry_over(self, day: str, folder: Path, spans: dict[str, tuple[tuple[int, int], tuple[int, int]]]) -> int:
        """Add the rows of an earlier export of ``day`` (``folder``) outside
        ``spans`` ({market id: (first, last) entry id read}); the rows kept."""
        pa, pc = self.pa, self.pc
        mids = sorted(spans)
        value_set = pa.array(mids, pa.string())
        lo_ms = pa.array([spans[m][0][0] for m in mids], pa.int64())
        lo_n = pa.array([spans[m][0][1] for m in mids], pa.int64())
        hi_ms = pa.array([spans[m][1][0] for m in mids], pa.int64())
        hi_n = pa.array([spans[m][1][1] for m in mids], pa.int64())
        kept = 0
        for source in sorted(folder.iterdir()):
            if not source.is_dir() or not source.name.startswith("source="):
                continue
            for path in sorted(source.glob("*.parquet")):
                for batch in self._earlier(path):
                    idx = pc.index_in(batch.column("market_id"), value_set=value_set)
                    if idx.null_count < len(idx):  # rows of markets this export read: drop those in their span
                        parts = pc.split_pattern(batch.column("entry_id"), "-", max_splits=1)
                        ms = pc.cast(pc.list_element(parts, 0), pa.int64())
                        sub = pc.cast(pc.list_element(parts, 1), pa.int64())
                        a, b = pc.take(lo_ms, idx), pc.take(lo_n, idx)
                        c, d = pc.take(hi_ms, idx), pc.take(hi_n, idx)
                        after_lo = pc.or_(pc.greater(ms, a), pc.and_(pc.equal(ms, a), pc.greater_equal(sub, b)))
                        before_hi = pc.or_(pc.less(ms, c), pc.and_(pc.equal(ms, c), pc.less_equal(sub, d)))
                        inside = pc.fill_null(pc.and_(after_lo, before_hi), False)
                        batch = batch.filter(pc.invert(inside))
                    kept += batch.num_rows
                    self.add(day, source.name, batch)
        return kept

    def _earlier(self, path: Path) -> Iterator[Any]:
        """The record batches of an earlier export's file, in this version's
        schema; ConfigError when it cannot be read."""
        try:
            for batch in self.pq.ParquetFile(path).iter_batches(batch_size=65_536):
                yield self._conform(batch, path)
        except (OSError, self.pa.ArrowException) as exc:
            raise ConfigError(f"cannot read the earlier export {path}: {exc}; move it away or export "
                              "to another --out") from None

    def abort(self) -> None:
        """Close every open file (after an error; the staging folder goes)."""
        for p in self.parts.values():
            if p.writer is not None:
                with contextlib.suppress(Exception):
                    p.writer.close()
                p.writer = None

    def _conform(self, batch: Any, path: Path) -> Any:
        """``batch`` of an earlier file with this version's schema (a column it
        lacks: null; a column this version does not know: ConfigError)."""
        if batch.schema.equals(self.schema, check_metadata=False):
            return batch
        unknown = set(batch.schema.names) - {f.name for f in self.schema}
        if unknown:
            raise ConfigError(f"{path} has columns this version does not write ({', '.join(sorted(unknown))}): "
                              "export to another --out")
        pa = self.pa
        arrays = [batch.column(f.name).cast(f.type) if f.name in batch.schema.names
                  else pa.nulls(batch.num_rows, f.type) for f in self.schema]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def _lock(out: Path) -> int:
    """Create ``out`` and hold ``out/.export.lock`` (flock, dropped by the
    kernel when the process ends). ConfigError when ``out`` is unusable or
    another export holds it."""
    import fcntl

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".export.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another export-history is writing to {out}; wait for it or pick another --out") from None
    return fd


async def export_history(store: Store, out: str | Path, *, start_ms: int | None = None, end_ms: int | None = None,
                         markets: Sequence[str] | None = None, page_entries: int = 2000,
                         row_group_rows: int = 100_000, max_rows_per_file: int = 1_000_000,
                         max_buffered_rows: int = 250_000) -> ExportResult:
    """Export the price history of ``markets`` (default: every market with
    history, :meth:`Store.history_markets`) with ``ts`` in ``[start_ms,
    end_ms]`` (ms since the epoch, UTC, inclusive; None: unbounded) to the
    Parquet dataset under ``out`` (layout, columns and the replace rule in the
    module docstring). ``page_entries``: history entries per Redis call;
    ``row_group_rows`` / ``max_rows_per_file``: Parquet row group and file
    sizes; ``max_buffered_rows``: most rows held in memory before writing.

    Raises ConfigError (pyarrow missing, ``start_ms > end_ms``, ``out`` not
    writable or locked by another export, an unreadable earlier file under
    ``out``), StoreError (Redis). On any error ``out`` keeps its earlier files.
    """
    require_pyarrow()
    if start_ms is not None and end_ms is not None and start_ms > end_ms:
        raise ConfigError(f"the start ({start_ms}) must not be after the end ({end_ms})")
    if min(page_entries, row_group_rows, max_rows_per_file, max_buffered_rows) < 1:
        raise ValueError("page_entries, row_group_rows, max_rows_per_file and max_buffered_rows must be ≥ 1")
    t0 = time.monotonic()
    out = Path(out)
    result = ExportResult(out=out)
    lock = _lock(out)
    staging = out / f".export-{os.getpid()}-{secrets.token_hex(4)}"
    sink = _Sink(staging, row_group_rows=row_group_rows, max_rows_per_file=max_rows_per_file,
                 max_buffered_rows=max_buffered_rows)
    try:
        ids = sorted(set(markets)) if markets else await store.history_markets()
        lo0 = str(start_ms) if start_ms is not None else "-"
        spans: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
        for mid in ids:
            if end_ms is not None:
                hi = str(end_ms)
            else:  # up to the newest entry now: a busy market cannot keep the export reading
                newest = await store.history_range(mid, "+", "-", count=1, reverse=True)
                if not newest:
                    logger.warning("no price history of market %r", mid)
                    continue
                hi = newest[0][0]
            market = await _snapshot(store, mid)
            lo, first, last = lo0, "", ""
            while True:
                rows = await store.history_range(mid, lo, hi, count=page_entries)
                if not rows:
                    break
                result.rows += sink.page(mid, market, rows)
                first, last = first or rows[0][0], rows[-1][0]
                if len(rows) < page_entries:
                    break
                lo = f"({last}"
            if first:
                spans[mid] = (_entry_id(first), _entry_id(last))
            elif markets:
                logger.warning("no price history of market %r in the range", mid)
        result.markets = len(spans)
        days: set[str] = set()
        for (lo_ms, _), (hi_ms, _) in spans.values():
            days.update(_day(d * DAY_MS) for d in range(lo_ms // DAY_MS, hi_ms // DAY_MS + 1))
        for day in sorted(days):
            earlier = out / f"date={day}"
            if earlier.is_dir():
                result.kept_rows += sink.carry_over(day, earlier, spans)
        sink.close()
        written = [p for part in sink.parts.values() for p in part.paths]
        result.files = len(written)
        result.bytes = sum(p.stat().st_size for p in written)
        _swap_in(out, staging, sorted(days))
        result.days = sorted(days)
    except OSError as exc:  # Redis errors are StoreErrors by now: this is the file system
        raise ConfigError(f"cannot write the Parquet files under {out}: {exc}") from None
    finally:
        sink.abort()
        shutil.rmtree(staging, ignore_errors=True)
        os.close(lock)
    result.seconds = time.monotonic() - t0
    return result


async def _snapshot(store: Store, market_id: str) -> Market | None:
    """The market's stored snapshot (None when it is gone). Raises StoreError."""
    try:
        return await store.get_market(market_id)
    except (RedisError, OSError) as exc:
        raise StoreError(f"redis read failed: {exc}") from None


def _swap_in(out: Path, staging: Path, days: list[str]) -> None:
    """Replace ``out/date=<day>`` by ``staging/date=<day>`` (when built) for
    each day: the earlier folder is moved aside into staging (removed with
    it), then the new one renamed into place; the earlier one is put back
    when that fails."""
    replaced = staging / ".replaced"
    replaced.mkdir(exist_ok=True)
    for day in days:
        final, new, old = out / f"date={day}", staging / f"date={day}", replaced / f"date={day}"
        had = final.exists()
        if had:
            final.rename(old)
        if new.exists():
            try:
                new.rename(final)
            except OSError:
                if had:
                    old.rename(final)
                raise
