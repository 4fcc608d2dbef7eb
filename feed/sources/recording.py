"""Replay of oddsfeed recordings (:mod:`feed.recorder`) of any source kind.

:class:`RecordingSource` is a :class:`~feed.sources.base.Source` that
delivers a recording's payloads — bytes, original receive time and channel
— to the same pipeline and normaliser the live source used (the registry
entry of the recorded kind), so the replay ends at the snapshot the live
run stored. Pacing: the recording's own timing divided by ``speed``, or as
fast as the store takes it (``speed=None``). The replay keeps the
recording's clock (``received_at`` and provider times as recorded), so
normalisers that compare provider times with the receive time decide as
they did live; replayed markets therefore read as old as they are.

:func:`replay_recordings` replays files or folders (one pipeline per
recorded source, sources one after another).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from feed.recorder import Recording, is_oddsfeed_recording, read_recording
from feed.sources.base import Payload, Sink
from feed.sources.replay import recording_files
from feed.sources.spec import SourceSpec

if TYPE_CHECKING:
    from feed.settings import Settings
    from feed.store import Store

logger = logging.getLogger(__name__)

#: payloads per delivery when replaying as fast as possible
CHUNK = 500


class RecordingSource:
    """Delivers recorded payloads (see the module docstring)."""

    confirms_by_messages = True
    stale_after_ms: int | None = None

    def __init__(self, name: str, payloads: list[Payload], *, speed: float | None = 1.0) -> None:
        self.name = name
        self.payloads = payloads
        self.speed = speed
        self.delivered = 0
        self._stop = asyncio.Event()

    async def run(self, sink: Sink) -> None:
        payloads = self.payloads
        if not payloads:
            return
        if self.speed is None:
            for i in range(0, len(payloads), CHUNK):
                if self._stop.is_set():
                    return
                await sink.deliver(payloads[i:i + CHUNK])
                self.delivered += len(payloads[i:i + CHUNK])
            return
        loop = asyncio.get_running_loop()
        start, first = loop.time(), payloads[0].recv_ms
        i, n = 0, len(payloads)
        while i < n and not self._stop.is_set():
            due = first + (loop.time() - start) * 1000 * self.speed
            j = i
            while j < n and payloads[j].recv_ms <= due and j - i < CHUNK:
                j += 1
            if j > i:
                await sink.deliver(payloads[i:j])
                self.delivered += j - i
                i = j
                continue
            wait_s = (payloads[i].recv_ms - first) / 1000 / self.speed - (loop.time() - start)
            await asyncio.sleep(min(max(wait_s, 0.001), 1.0))

    def request_repair(self) -> None:
        """A recording cannot be asked for an image: the lost change stays lost (as it did live)."""

    def stop(self) -> None:
        self._stop.set()


@dataclass
class RecordingSummary:
    """What :func:`replay_recordings` did, per recorded source."""

    sources: dict[str, int]
    """source name -> payloads delivered"""
    files: int


def recording_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The oddsfeed recordings among files and folders (as
    :func:`feed.sources.replay.recording_files` walks them). Raises
    FileNotFoundError for a path that does not exist."""
    return [f for f in recording_files(paths) if is_oddsfeed_recording(f)]


async def replay_recordings(store: Store, settings: Settings, paths: Iterable[str | os.PathLike[str]], *,
                            speed: float | None = 1.0) -> RecordingSummary:
    """Replay oddsfeed recordings of any kind into ``store`` through the
    pipeline of their recorded kind (ConfigError for a kind this build does
    not know). Files of one source are replayed in order, as one stream."""
    from feed.pipeline import Pipeline
    from feed.sources.registry import kind_of

    by_source: dict[tuple[str, str], list[Recording]] = {}
    files = recording_paths(paths)
    for f in files:
        rec = read_recording(f)
        by_source.setdefault((rec.kind, rec.source), []).append(rec)
    done: dict[str, int] = {}
    for (kind, name), recs in by_source.items():
        spec = SourceSpec(kind=kind, url="", name=name, options=recs[0].options)
        normaliser = kind_of(spec).load_normaliser()(spec, settings)
        payloads = [p for r in recs for p in r.payloads]
        source = RecordingSource(name, payloads, speed=speed)
        # (a webhook's recording keeps the live source's rule: a delivery rejected whole was answered
        # 422 and delivered again — the recording holds the redelivery)
        pipeline = Pipeline(store, settings, name=name, kind=kind, normaliser=normaliser,
                            rejected_messages_redelivered=kind == "webhook")
        logger.info("replaying %d payloads of %s (%s) from %d file(s)", len(payloads), name, kind, len(recs))
        await pipeline.run(source)
        await pipeline.ingest.drain()
        done[name] = source.delivered
    return RecordingSummary(done, len(files))
