"""Recording what sources receive, and reading it back for a replay.

:class:`Recorder` writes every :class:`~feed.sources.base.Payload` a source
delivers to the pipeline, before it is normalised (so a rejected message is
recorded too), one file per source and UTC day under ``DIR/<source>/``,
compressed (gzip) when closed — at the day's end or when the source stops
— as flumine's market recorder does for Betfair:

- ``esa`` sources are written in the **Betfair historic format**: the raw
  ``mcm`` lines, one per line (``<day>T<time>.betfair``, then ``.gz``), which
  betfairlightweight's historic stream and flumine read as they are, and
  ``oddsfeed ingest --replay`` replays (timing from each line's ``pt``);
- every other kind in the **oddsfeed recording format** (``….jsonl`` →
  ``.jsonl.gz``): a header line ``{"oddsfeed_recording": 2, "kind", "source",
  "options", "started_at"}`` (``options``: the source's options minus
  credentials, which the normaliser may need, e.g. ``prefix``), then one JSON
  array per payload: ``[recv_ms, channel, data]`` — ``data`` the payload as
  text when it is UTF-8, else ``{"b64": "…"}`` — with a fourth, ``age_ms``,
  when it is not 0 (a poller's answer: :class:`~feed.sources.base.Payload`).
  Format 1 (before that fourth field) is read too; a build that reads only
  format 1 refuses a format-2 file by its header, saying so.

:func:`read_recording` reads an oddsfeed recording back (plain or gzip);
:class:`feed.replay_any.RecordingSource` replays it through the pipeline.
Times are integer ms since the Unix epoch (UTC).
"""

from __future__ import annotations

import base64
import gzip
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from feed.errors import ConfigError
from feed.sources.base import Payload
from feed.sources.replay import open_recording

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
#: the formats read_recording reads (1: lines of three fields only)
READABLE_FORMATS = (1, 2)
#: option names never written to a recording (credentials)
_SECRET_WORDS = ("key", "secret", "password", "session", "token", "user", "auth")


def safe_options(options: Mapping[str, str]) -> dict[str, str]:
    """``options`` without credentials (any key naming a key, secret,
    password, session, token, user or auth)."""
    return {k: v for k, v in options.items() if not any(w in k.lower() for w in _SECRET_WORDS)}


class Recorder:
    """Writes one source's payloads (see the module docstring).

    directory: the recording root (``--record DIR``). source / kind: the
    source's name and registry kind. options: its ``--source`` options
    (credentials are left out). clock: wall clock in seconds (tests).
    Raises ConfigError when the directory cannot be created. A write that
    fails (disk full) is logged once and recording stops; ingest goes on.
    """

    def __init__(self, directory: str | os.PathLike[str], *, source: str, kind: str,
                 options: Mapping[str, str] | None = None, clock: Any = time.time) -> None:
        self.root = Path(directory) / source
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot record into {self.root}: {exc}") from None
        self.source = source
        self.kind = kind
        self.betfair = kind == "esa"
        self.options = safe_options(options or {})
        self._clock = clock
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._day: str | None = None
        self.payloads = 0
        self.files: list[Path] = []
        self._failed = False

    def _open(self, day: str) -> IO[bytes]:
        self._close_file()
        stamp = datetime.fromtimestamp(self._clock(), UTC).strftime("%H%M%S")
        ext = "betfair" if self.betfair else "jsonl"
        path = self.root / f"{day}T{stamp}.{ext}"
        n = 1
        while path.exists() or path.with_name(path.name + ".gz").exists():
            n += 1
            path = self.root / f"{day}T{stamp}-{n}.{ext}"
        f = path.open("wb")
        if not self.betfair:
            f.write(orjson.dumps({"oddsfeed_recording": FORMAT_VERSION, "kind": self.kind, "source": self.source,
                                  "options": self.options, "started_at": int(self._clock() * 1000)}) + b"\n")
        self._file, self._path, self._day = f, path, day
        return f

    def write(self, payloads: Sequence[Payload]) -> None:
        """Append ``payloads`` (in order); rolls to a new file at a new UTC day."""
        if self._failed or not payloads:
            return
        try:
            for p in payloads:
                day = datetime.fromtimestamp(p.recv_ms / 1000, UTC).strftime("%Y-%m-%d")
                f = self._file if day == self._day and self._file is not None else self._open(day)
                if self.betfair:
                    f.write(p.data.rstrip(b"\r\n") + b"\n")
                else:
                    row = [p.recv_ms, p.channel, _data_json(p.data)]
                    if p.age_ms:  # (a cached answer: a fourth field, absent otherwise)
                        row.append(p.age_ms)
                    f.write(orjson.dumps(row) + b"\n")
                self.payloads += 1
            assert self._file is not None
            self._file.flush()
        except OSError as exc:
            self._failed = True
            logger.error("recording of %s stopped: %s", self.source, exc)

    def _close_file(self) -> None:
        f, path = self._file, self._path
        self._file = self._path = None
        if f is None or path is None:
            return
        try:
            f.close()
            gz = path.with_name(path.name + ".gz")
            with path.open("rb") as src, gzip.open(gz, "wb") as dst:
                shutil.copyfileobj(src, dst)
            path.unlink()
            self.files.append(gz)
        except OSError as exc:
            logger.error("could not compress the recording %s: %s", path, exc)
            self.files.append(path)

    def close(self) -> None:
        """Close and compress the open file (idempotent)."""
        self._close_file()


def _data_json(data: bytes) -> str | dict[str, str]:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(data).decode()}


@dataclass
class Recording:
    """An oddsfeed recording read back: its header and payloads in order."""

    path: Path
    kind: str
    source: str
    options: dict[str, str] = field(default_factory=dict)
    payloads: list[Payload] = field(default_factory=list)


def is_oddsfeed_recording(path: Path) -> bool:
    """True when ``path`` (plain, gzip or bzip2) starts with an oddsfeed recording header."""
    try:
        with open_recording(path) as f:
            first = f.readline(4096)
    except (OSError, EOFError):
        return False
    return first.startswith(b'{"oddsfeed_recording"')


def read_recording(path: Path) -> Recording:
    """Read an oddsfeed recording (see the module docstring). Raises
    ConfigError when it is not one or a line is unreadable (naming the line)."""
    with open_recording(path) as f:
        lines: Iterator[bytes] = iter(f.read().splitlines())
    try:
        head = orjson.loads(next(lines))
    except (StopIteration, orjson.JSONDecodeError):
        raise ConfigError(f"{path}: not an oddsfeed recording (no header line)") from None
    if not isinstance(head, dict) or head.get("oddsfeed_recording") not in READABLE_FORMATS:
        raise ConfigError(f"{path}: not an oddsfeed recording of format "
                          f"{' or '.join(map(str, READABLE_FORMATS))} (this build reads those)")
    rec = Recording(path, kind=str(head.get("kind")), source=str(head.get("source")),
                    options={str(k): str(v) for k, v in (head.get("options") or {}).items()})
    for n, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        try:
            recv_ms, channel, data, *age = orjson.loads(line)
            if len(age) > 1:
                raise ValueError(f"{3 + len(age)} fields, not 3 or 4")
            raw = base64.b64decode(data["b64"]) if isinstance(data, dict) else str(data).encode()
            rec.payloads.append(Payload(int(recv_ms), raw, str(channel), max(0, int(age[0])) if age else 0))
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{path}:{n}: unreadable recording line ({exc})") from None
    return rec
