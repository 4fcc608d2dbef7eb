"""Read recorded Betfair streams (historic-data / flumine recorder NDJSON).

Files may be bzip2, gzip or plain (detected by their magic bytes, not the
name), NDJSON or one JSON array of messages; folders are walked recursively
in name order (the same reader as ``feed.sources.replay``). Only ``mcm`` lines with
an ``mc`` list are yielded; anything else (blank lines, catalogue JSON,
``status``/``connection`` lines, malformed JSON) is skipped.

:func:`merged_messages` interleaves several files by ``pt`` (ms since the
epoch), so a folder of per-market files replays as one stream.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from feed.sources.replay import read_messages as read_raw_messages
from feed.sources.replay import recording_files as expand_paths

__all__ = ["expand_paths", "merged_messages", "read_messages"]

logger = logging.getLogger(__name__)


def read_messages(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(pt, message)`` for each ``mcm`` line of one file, in file order.

    A line without ``pt`` inherits the previous line's (0 at the start).
    Files are read by :func:`feed.sources.replay.read_messages` (the same
    reader the ingest replay uses).
    """
    pt = 0
    skipped = 0
    for raw in read_raw_messages(Path(path)) or ():
        if not raw.strip():
            continue
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            skipped += 1
            continue
        if not isinstance(msg, dict) or msg.get("op") != "mcm" or not isinstance(msg.get("mc"), list):
            continue
        if isinstance(msg.get("pt"), int):
            pt = msg["pt"]
        yield pt, msg
    if skipped:
        logger.warning("recording %s: %d malformed lines skipped", path, skipped)


def merged_messages(paths: Iterable[str | os.PathLike[str]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(pt, message)`` from every file under ``paths``, merged in ``pt`` order."""
    files = expand_paths(paths)
    if len(files) == 1:
        yield from read_messages(files[0])
        return
    yield from heapq.merge(*(read_messages(f) for f in files), key=lambda item: item[0])
