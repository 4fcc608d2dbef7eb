"""Replay of recorded Betfair stream files through the live ingest path.

Reads ``.bz2``, ``.gz`` or plain files (detected by magic bytes, so files
without an extension work), given as files or folders (recursively, in name
order). A file is NDJSON of ESA messages (one per line), a JSON array of
messages, or a single JSON object. Files that are not stream recordings
(JSON without ``op``) are skipped and counted; flumine's catalogue files
(``op: marketCatalogue``) are replayed for their names.

Clock: by default the recording's clock is mapped onto now —
``source_ts = start + (pt − first_pt) / speed`` for a paced replay and the
time of ingestion for ``speed=None`` (max) — and the original ``pt`` is kept
in ``source_ts_original``, so ages and staleness read as they would live.
"""

from __future__ import annotations

import asyncio
import bz2
import contextlib
import gzip
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

import msgspec
import orjson

from feed.errors import StoreError
from feed.ingest import Ingest, now_ms

logger = logging.getLogger(__name__)


class _Envelope(msgspec.Struct):
    pt: int | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)

#: a paced replay does not wait on a longer jump of the recording's clock, ms
MAX_PACED_GAP_MS = 3_600_000


def recording_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and folders into the list of files to replay (sorted
    within each folder, hidden files skipped). Raises FileNotFoundError."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such recording file or folder: {p}")
    return out


def open_recording(path: Path) -> IO[bytes]:
    """``path`` opened for reading, decompressed by its magic bytes (bzip2,
    gzip or plain). Raises OSError."""
    with path.open("rb") as f:
        magic = f.read(3)
    if magic == b"BZh":
        return cast(IO[bytes], bz2.open(path, "rb"))
    if magic[:2] == b"\x1f\x8b":
        return cast(IO[bytes], gzip.open(path, "rb"))
    return path.open("rb")


def read_messages(path: Path) -> list[bytes] | None:
    """The raw messages of one recording, or None when the file is not an
    ESA recording (no ``op`` in its first message)."""
    with open_recording(path) as f:
        data = f.read()
    stripped = data.lstrip()
    if stripped[:1] == b"[":
        try:
            items = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            return None
        if not items or not isinstance(items[0], dict) or "op" not in items[0]:
            return None
        return [orjson.dumps(x) for x in items]
    lines = data.splitlines()
    first = next((line for line in lines if line.strip()), b"")
    try:
        head = orjson.loads(first)
    except orjson.JSONDecodeError:
        try:  # a single pretty-printed object
            head = orjson.loads(stripped)
            return [orjson.dumps(head)] if isinstance(head, dict) and "op" in head else None
        except orjson.JSONDecodeError:
            return None
    if not isinstance(head, dict) or "op" not in head:
        return None
    return lines


@dataclass
class ReplaySummary:
    """What a replay did. rate = runner changes per second of wall time."""

    files: int = 0
    skipped_files: list[str] = field(default_factory=list)
    messages: int = 0
    runner_changes: int = 0
    deltas: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.runner_changes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected_by_reason.items())) or "none"
        out = [
            f"files: {self.files} replayed, {len(self.skipped_files)} skipped (not stream recordings)",
            f"messages: {self.messages}",
            f"runner changes: {self.runner_changes}",
            f"deltas stored: {self.deltas}",
            f"rejected: {self.rejected} ({reasons}; a line, or one market of a line)",
            f"elapsed: {self.elapsed_s:.2f} s, rate: {self.rate:,.0f} runner changes/s",
        ]
        return out


class Replay:
    """Feeds recordings into an :class:`~feed.ingest.Ingest`.

    speed: pacing multiplier (1 = real time, 10 = ten times faster) or None
    for as fast as possible. map_clock: map the recording's clock onto now
    (default) or keep the original ``pt``. chunk_lines: messages per batched
    store apply at max speed. progress: called about once a second with the
    ingest's counters (for a progress line). max_gap_ms: a paced replay does
    not wait on a longer jump (either way) of the recording's clock between
    two messages (ms of recorded time; an absurd ``pt`` is such a jump).
    """

    def __init__(self, paths: list[str | Path], ingest: Ingest, *, speed: float | None = None,
                 map_clock: bool = True, chunk_lines: int = 2000, clock_ms: Callable[[], int] = now_ms,
                 progress: Callable[[Ingest, int, int], None] | None = None,
                 max_gap_ms: int = MAX_PACED_GAP_MS) -> None:
        if speed is not None and speed <= 0:
            raise ValueError("speed must be > 0 or None (max)")
        self.files = recording_files(paths)
        self.ingest = ingest
        self.speed = speed
        self.map_clock = map_clock
        if not map_clock:  # the recording's own clock: its messages are not late, they are old
            ingest.max_stream_lag_ms = 0
        self.chunk_lines = chunk_lines
        self.clock_ms = clock_ms
        self.progress = progress
        self.max_gap_ms = max_gap_ms
        self.summary = ReplaySummary()
        self._done_files = 0
        self._last_progress = 0.0

    async def run(self) -> ReplaySummary:
        """Replay every file; return the summary. Files play one after the
        other at max speed and side by side when paced."""
        ingest = self.ingest
        ingest.set_state("UP", "replaying")
        await ingest.publish_health()
        t0 = time.perf_counter()
        s0 = ingest.stats
        base_messages, base_rc, base_rej = s0.messages, s0.runner_changes, s0.rejected
        base_deltas = s0.deltas
        try:
            loaded = []
            for path in self.files:
                messages = await asyncio.to_thread(read_messages, path)
                if messages is None:
                    logger.info("skipping %s: not a stream recording", path)
                    self.summary.skipped_files.append(str(path))
                    continue
                loaded.append((path, messages))
                if self.speed is None:
                    await self._play_max(messages)
                    loaded.clear()
                    self._done_files += 1
            if self.speed is not None and loaded:
                await asyncio.gather(*(self._play_paced(m) for _, m in loaded))
                self._done_files += len(loaded)
            await ingest.drain()  # a replay is finished only when Redis holds all of it
        finally:
            await ingest.flush()
            s = self.summary
            st = ingest.stats
            s.files = len(self.files) - len(s.skipped_files)
            s.messages = st.messages - base_messages
            s.runner_changes = st.runner_changes - base_rc
            s.rejected = st.rejected - base_rej
            s.deltas = st.deltas - base_deltas
            s.rejected_by_reason = dict(st.rejected_by_reason)
            s.elapsed_s = time.perf_counter() - t0
            ingest.set_state("DOWN", "replay_finished")
            with contextlib.suppress(StoreError):
                await ingest.publish_health()
        return self.summary

    def _tick(self) -> None:
        if self.progress is None:
            return
        t = time.monotonic()
        if t - self._last_progress >= 1.0:
            self._last_progress = t
            self.progress(self.ingest, self._done_files, len(self.files))

    async def _play_max(self, messages: list[bytes]) -> None:
        """Normalise chunk N+1 while Redis applies chunk N (two cores: ours
        and redis-server's); flushes stay in order (Ingest's flush lock)."""
        ingest = self.ingest
        step = self.chunk_lines
        in_flight: asyncio.Task[object] | None = None
        for i in range(0, len(messages), step):
            recv = self.clock_ms()
            ingest.time_map = (lambda pt, _r=recv: _r) if self.map_clock else None
            ingest.feed_lines(messages[i:i + step], recv)
            if in_flight is not None:
                await in_flight
            in_flight = asyncio.ensure_future(ingest.flush())
            await asyncio.sleep(0)  # let the flush sequence, encode and send before we go on
            self._tick()
        if in_flight is not None:
            await in_flight

    async def _play_paced(self, messages: list[bytes]) -> None:
        """Feed one file's messages when their ``pt`` is due.

        The recording's clock is followed while it moves by at most
        :attr:`max_gap_ms` between two messages; a message a little out of
        order is due at once. A jump of more than that, either way, that the
        next message continues (the recording's clock jumped) is not waited
        on: the clock goes on from there (logged), and each stretch between
        jumps maps onto now by its own offset. One absurd ``pt`` that the
        next message does not continue (a year ahead, or 0, among normal
        ones; or the last message's) is neither waited on nor followed: it
        maps by its stretch, so the ingest rejects it (``clock_skew``) as it
        would live. Several paced files play side by side, each with its
        own mapping."""
        ingest = self.ingest
        speed = self.speed or 1.0
        max_gap = self.max_gap_ms
        n = len(messages)
        pts: list[int | None] = []
        for raw in messages:
            try:
                pts.append(_ENVELOPE.decode(raw).pt)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
                pts.append(None)
        due: list[int] = [0] * n  # ms of replay (recorded time, jumps removed) at which message i is due
        base: list[int] = [0] * n  # a pt of message i's stretch maps to start + (pt − base) / speed
        ref: int | None = None  # the recording's clock: the last pt it followed
        t = b = jumps = 0
        for k, pt in enumerate(pts):
            if pt is not None:
                if ref is None:
                    ref, b = pt, pt
                elif 0 <= pt - ref <= max_gap:
                    t += pt - ref
                    ref = pt
                elif abs(pt - ref) > max_gap:
                    nxt = next((q for q in pts[k + 1:] if q is not None), None)
                    if nxt is not None and abs(nxt - pt) <= max_gap:  # the clock jumped: a new stretch
                        jumps += 1
                        ref, b = pt, pt - t
                    # else one absurd pt the clock does not follow: mapped by its stretch (so the
                    # ingest rejects it as it would live — a clock_skew — not stamped now)
            due[k], base[k] = t, b
        if jumps:
            logger.warning("replay: the recording's clock jumps by more than %d s %d time(s); not waited on",
                           max_gap // 1000, jumps)
        start = self.clock_ms()
        i = 0
        while i < n:
            now = self.clock_ms()
            due_t = (now - start) * speed
            j = i
            b = base[i]
            while j < n and due[j] <= due_t and base[j] == b and j - i < self.chunk_lines:
                j += 1
            if j > i:
                if self.map_clock:  # bound per stretch; files play side by side, each maps by its own
                    ingest.time_map = lambda pt, _b=b: start + int((pt - _b) / speed)
                else:
                    ingest.time_map = None
                ingest.feed_lines(messages[i:j], now)
                await ingest.flush()
                i = j
                self._tick()
                continue
            wait_ms = (due[i] - due_t) / speed
            await asyncio.sleep(min(max(wait_ms, 1) / 1000, 1.0))
