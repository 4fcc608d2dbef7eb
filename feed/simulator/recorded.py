"""Read recorded Betfair streams (historic-data / flumine recorder NDJSON).

Files may be bzip2, gzip or plain (detected by their magic bytes, not the
name), NDJSON or one JSON array of messages; folders are walked recursively
in name order. Only ``mcm`` lines with
an ``mc`` list are yielded; anything else (blank lines, catalogue JSON,
``status``/``connection`` lines, malformed JSON) is skipped.

:func:`merged_messages` interleaves several files by ``pt`` (ms since the
epoch), so a folder of per-market files replays as one stream.
"""

from __future__ import annotations

import bz2
import gzip
import heapq
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

__all__ = ["expand_paths", "merged_messages", "open_recording", "read_messages"]

logger = logging.getLogger(__name__)


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files named by ``paths``; folders expand to their files (recursive, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"recording not found: {p}")
    return out


def open_recording(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open ``path`` for binary reading, decompressing bzip2/gzip by magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(3)
    if magic == b"BZh":
        return bz2.open(path, "rb")
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_messages(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(pt, message)`` for each ``mcm`` line of one file, in file order.

    A line without ``pt`` inherits the previous line's (0 at the start).
    """
    pt = 0
    skipped = 0
    for msg in _decoded(path):
        if msg is None:
            skipped += 1
            continue
        if not isinstance(msg, dict) or msg.get("op") != "mcm" or not isinstance(msg.get("mc"), list):
            continue
        if isinstance(msg.get("pt"), int):
            pt = msg["pt"]
        yield pt, msg
    if skipped:
        logger.warning("recording %s: %d malformed lines skipped", path, skipped)


def _decoded(path: str | os.PathLike[str]) -> Iterator[Any]:
    """Decoded JSON values of a file: one per line (NDJSON), or the elements of
    a top-level JSON array; ``None`` for a line that is not JSON."""
    with open_recording(path) as f:
        head = f.read(64).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            try:
                values = orjson.loads(f.read())
            except orjson.JSONDecodeError:
                values = None
            if isinstance(values, list):
                yield from values
                return
            f.seek(0)
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                yield None


def merged_messages(paths: Iterable[str | os.PathLike[str]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(pt, message)`` from every file under ``paths``, merged in ``pt`` order."""
    files = expand_paths(paths)
    if len(files) == 1:
        yield from read_messages(files[0])
        return
    yield from heapq.merge(*(read_messages(f) for f in files), key=lambda item: item[0])
