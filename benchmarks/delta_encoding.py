"""What a delta's selections cost on the wire and in the ingest, by rule
(issue 11, item 4), over the shared Betfair recordings.

Every recording goes through ``BetfairNormaliser`` + ``Book``; for each
``kind: delta`` the (held, new) state of every changed selection is kept,
then three rules are timed on the same pairs (best of ``--repeat``):

- ``full``: the whole selection (the rule before issue 11): the book's
  equality check, then encode;
- ``sides`` (the rule in use): :func:`feed.models.selection_change` — only
  the changed fields, a ladder side whole — then encode;
- ``levels``: the changed fields, but a changed side as level changes
  (``[price, size]`` for each new or resized level, ``[price, 0]`` for each
  level gone), then encode.

Prints bytes per delta and µs per delta (diff + encode). Usage::

    python benchmarks/delta_encoding.py [--data ../shared/data/betfair-stream] [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
from msgspec import UNSET  # noqa: E402

from feed.book import Book  # noqa: E402
from feed.errors import FeedDecodeError  # noqa: E402
from feed.models import ENCODER, Delta, Selection, SelectionChange, selection_change  # noqa: E402
from feed.normalise.betfair import BetfairNormaliser  # noqa: E402
from feed.sources.replay import read_messages, recording_files  # noqa: E402
from feed.validate import MAX_TIME_MS  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "betfair-stream"
Pair = tuple[Selection | None, Selection]


def collect(data: Path) -> list[tuple[Delta, list[Pair]]]:
    """Every delta of the recordings with the (held, new) selections it changed."""
    out: list[tuple[Delta, list[Pair]]] = []
    for path in recording_files([data]):
        n, book = BetfairNormaliser("bench"), Book()
        held: dict[str, dict[str, Selection]] = {}
        for raw in read_messages(path) or []:
            try:
                batch = n.feed(raw, MAX_TIME_MS)
            except FeedDecodeError:
                continue
            for u in batch.updates:
                d = book.apply(u)
                if d is None:
                    continue
                if d.kind == "image" and d.market is not None:
                    held[d.market_id] = {s.selection_id: s for s in d.market.selections}
                    continue
                h = held[d.market_id]
                now = book.markets[d.market_id]
                pairs = [(h.get(c.selection_id), sel) for c in d.selections
                         if (sel := now.selection(c.selection_id)) is not None]
                for _, s in pairs:
                    h[s.selection_id] = s
                out.append((d, pairs))
    return out


def _levels(old: list[tuple[float, float]], new: list[tuple[float, float]]) -> list[tuple[float, float]]:
    have = set(old)
    out = [lv for lv in new if lv not in have]
    prices = {p for p, _ in new}
    out += [(p, 0.0) for p, _ in old if p not in prices]
    return out


def level_change(old: Selection | None, new: Selection) -> SelectionChange | None:
    """:func:`selection_change` with each changed side as level changes."""
    c = selection_change(old, new)
    if c is None or old is None:
        return c
    back: Any = _levels(old.back, new.back) if c.back is not UNSET else UNSET
    lay: Any = _levels(old.lay, new.lay) if c.lay is not UNSET else UNSET
    return msgspec.structs.replace(c, back=back, lay=lay)


def run(deltas: list[tuple[Delta, list[Pair]]], rule: str) -> list[bytes]:
    enc = ENCODER.encode
    out = []
    for d, pairs in deltas:
        sels: list[Any]
        if rule == "full":
            sels = [s for o, s in pairs if o != s]  # the book's check before issue 11; whole selections
        elif rule == "sides":
            sels = [c for o, s in pairs if (c := selection_change(o, s)) is not None]
        else:
            sels = [c for o, s in pairs if (c := level_change(o, s)) is not None]
        out.append(enc(msgspec.structs.replace(d, selections=sels)))
    return out


def best_of(repeat: int, fn: Callable[[], list[bytes]]) -> tuple[float, list[bytes]]:
    times, res = [], []
    for _ in range(repeat):
        t0 = time.process_time()
        res = fn()
        times.append(time.process_time() - t0)
    return min(times), res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"no recordings at {args.data} (needs ../shared/data)", file=sys.stderr)
        return 2
    deltas = collect(args.data)
    n = len(deltas)
    gc.disable()
    # the structs rebuilt per rule (replace) cost the same for all three: measure it and take it out
    base, _ = best_of(args.repeat, lambda: [ENCODER.encode(msgspec.structs.replace(d, selections=[]))
                                            for d, _ in deltas])
    results = {rule: best_of(args.repeat, lambda rule=rule: run(deltas, rule))  # type: ignore[misc]
               for rule in ("full", "sides", "levels")}
    full_bytes = sum(map(len, results["full"][1]))
    print(f"{n:,} deltas, {sum(len(p) for _, p in deltas):,} selection changes; best of {args.repeat}")
    for rule, (t, encoded) in results.items():
        nbytes = sum(map(len, encoded))
        print(f"  {rule:7s} {nbytes / n:6.0f} B/delta ({nbytes / full_bytes:6.1%})   "
              f"{(t - base) * 1e6 / n:5.2f} µs/delta (diff + encode of the selections)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
