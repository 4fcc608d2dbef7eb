"""Replay of Betfair Data Scientists' historic CSVs as a source (``betfair-csv``).

``--source betfair-csv=PATH[,speed=…][,keep_clock=1][,on_end=wait|stop]``:
PATH is a ``.csv`` file or a folder of them (every ``*.csv`` below it, in
name order). :class:`CsvReplaySource` reads the files (the only I/O), has
:func:`feed.normalise.betfair_csv.schedule` split each into one small CSV
document per market and plan the market's three steps (pre-off image, in
play, settled: see that module), and delivers the steps of all markets of
all files in the CSVs' time order as :class:`~feed.sources.base.Payload` s
(data = the market's document, channel = ``<step>:<MATCH_ODDS|WIN|PLACE>``).
The normaliser renders each step; the pipeline validates, sequences,
stores, quarantines and records as for any source.

Clock: the CSV's time ``t`` of a step is due at ``start + (t − first) /
speed`` (``speed=3600``: an hour of the CSV per second); ``speed=max``
(the default — a season of football is 7 months) delivers everything at
once, in time order, in chunks of 500. Each payload is received (``recv_ms``)
when the replay releases it and the normaliser stamps the step with that
time (``source_ts``; the CSV's own time stays in ``source_ts_original``,
and the book orders a market's steps by it), so the replay's markets read as
of now; ``keep_clock=1`` keeps the CSV's times as ``source_ts`` instead. A
market whose times cannot be read is delivered first (and rejected by the
normaliser, quarantined with its reason). While a paced replay waits it
confirms its markets once a second (the replay vouches for its own clock).

The end: the source's health reads DOWN / ``replay_finished`` (nothing
confirms those prices any more, as the Betfair replay). ``on_end=wait``
(default) keeps the source running until it is stopped, so ``oddsfeed run
--source betfair-csv=…`` goes on serving the replayed markets;
``on_end=stop`` returns, so ``oddsfeed ingest --source betfair-csv=…,on_end=stop``
exits when the files are consumed.

Errors: a missing path, a file that is not one of the two CSV layouts, or a
tz database without the tracks' zones is a :class:`~feed.errors.ConfigError`
(fatal: a restart cannot fix it). A bad market never stops the replay.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from feed.aio import wait_event
from feed.errors import ConfigError, FeedDecodeError
from feed.ingest import now_ms
from feed.normalise.betfair_csv import Planned, schedule
from feed.sources.base import Payload, Sink

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.sources.spec import SourceSpec

__all__ = ["CHUNK", "CsvReplaySource", "csv_files", "from_spec", "load_plan"]

logger = logging.getLogger(__name__)

#: payloads per delivery
CHUNK = 500
#: how often a waiting paced replay confirms its markets, s
CONFIRM_EVERY_S = 1.0


def csv_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The CSV files among ``paths`` (files as given; folders: every
    ``*.csv`` below, in name order). Raises ConfigError for a path that
    does not exist or a folder without CSVs."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.csv") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise ConfigError(f"betfair-csv: no .csv files in {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"betfair-csv: no such file or folder: {p}")
    return out


def load_plan(files: list[Path]) -> list[Planned]:
    """Every step of every market of ``files``, in the CSVs' time order
    (markets whose times cannot be read first; ties by file, market, step).
    Raises ConfigError for a file that is not a Betfair data-scientists CSV."""
    plan: list[Planned] = []
    for n, f in enumerate(files):
        try:
            plan.extend(schedule(f.read_bytes(), n))
        except FeedDecodeError as exc:
            raise ConfigError(f"betfair-csv: {f}: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"betfair-csv: cannot read {f}: {exc}") from None
    plan.sort(key=lambda p: (p.time_ms is not None, p.time_ms or 0, p.order))
    return plan


class CsvReplaySource:
    """Delivers the planned steps of Betfair CSV files (module docstring).

    name: the source's name. paths: files or folders. speed: CSV seconds per
    wall second, None = as fast as the store takes it. on_end: ``wait``
    (stay until stopped) or ``stop`` (return) after the last step.
    clock_ms: the wall clock (ms since the epoch) stamped as ``recv_ms``.
    """

    confirms_by_messages = True
    stale_after_ms: int | None = None

    def __init__(self, name: str, paths: list[str], *, speed: float | None = None,
                 on_end: Literal["wait", "stop"] = "wait", clock_ms: Callable[[], int] = now_ms) -> None:
        if speed is not None and not speed > 0:
            raise ConfigError(f"source {name}: speed must be > 0 or max")
        self.name = name
        self.paths = paths
        self.speed = speed
        self.on_end = on_end
        self.clock_ms = clock_ms
        #: steps delivered so far, and how many there are (after the files are read)
        self.delivered = 0
        self.planned = 0
        #: set once every step was delivered
        self.finished = asyncio.Event()
        self._stop = asyncio.Event()

    async def run(self, sink: Sink) -> None:
        files = csv_files(self.paths)
        plan = await asyncio.to_thread(load_plan, files)
        self.planned = len(plan)
        logger.info("betfair-csv %s: %d steps of %d file(s), speed %s", self.name, len(plan), len(files),
                    self.speed or "max")
        sink.set_state("UP", "replaying")
        if self.speed is None:
            await self._play_max(sink, plan)
        else:
            await self._play_paced(sink, plan, self.speed)
        if self._stop.is_set():
            return
        self.finished.set()
        sink.set_state("DOWN", "replay_finished")
        if self.on_end == "wait":
            await self._stop.wait()

    async def _deliver(self, sink: Sink, steps: list[Planned]) -> None:
        recv = self.clock_ms()
        await sink.deliver([Payload(recv, p.data, p.channel) for p in steps])
        self.delivered += len(steps)

    async def _play_max(self, sink: Sink, plan: list[Planned]) -> None:
        for i in range(0, len(plan), CHUNK):
            if self._stop.is_set():
                return
            await self._deliver(sink, plan[i:i + CHUNK])

    async def _play_paced(self, sink: Sink, plan: list[Planned], speed: float) -> None:
        if not plan:
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = next((p.time_ms for p in plan if p.time_ms is not None), 0)
        i, n = 0, len(plan)
        while i < n and not self._stop.is_set():
            due = first + (loop.time() - start) * 1000 * speed
            j = i
            while j < n and ((t := plan[j].time_ms) is None or t <= due) and j - i < CHUNK:
                j += 1
            if j > i:
                await self._deliver(sink, plan[i:j])
                i = j
                continue
            next_t = plan[i].time_ms
            assert next_t is not None  # a step without a time is always due
            wait_s = (next_t - first) / 1000 / speed - (loop.time() - start)
            sink.confirm(self.clock_ms())  # the replay is alive: its markets are as of its clock
            await wait_event(self._stop, min(max(wait_s, 0.001), CONFIRM_EVERY_S))  # (not wait_for: feed.aio)

    def request_repair(self) -> None:
        """A CSV cannot be asked for an image: a rejected market stays rejected."""

    def stop(self) -> None:
        self._stop.set()


def _speed(spec: SourceSpec) -> float | None:
    raw = (spec.get("speed", "max") or "max").strip().lower()
    if raw == "max":
        return None
    speed = spec.get_float("speed", 0.0)
    if not speed > 0:
        raise ConfigError(f"source {spec.name}: speed must be a number > 0 or max, not {raw!r}")
    return speed


def from_spec(spec: SourceSpec, settings: Settings) -> CsvReplaySource:
    """``betfair-csv=PATH[,speed=<x>|max][,on_end=wait|stop]`` (``keep_clock``
    is the normaliser's). PATH: a CSV file or a folder of them; several
    paths may be joined with ``;``. No I/O until :meth:`CsvReplaySource.run`."""
    on_end = (spec.get("on_end", "wait") or "wait").strip().lower()
    if on_end not in ("wait", "stop"):
        raise ConfigError(f"source {spec.name}: on_end must be wait or stop, not {on_end!r}")
    paths = [p for p in spec.url.split(";") if p.strip()]
    if not paths:
        raise ConfigError(f"source {spec.name}: betfair-csv needs a CSV file or folder (betfair-csv=PATH)")
    return CsvReplaySource(spec.name, paths, speed=_speed(spec), on_end="stop" if on_end == "stop" else "wait")
