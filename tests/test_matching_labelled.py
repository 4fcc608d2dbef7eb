"""The event matcher measured on an independent labelled set.

``tests/fixtures/event_pairs.json`` holds pairs of events (one provider's
event and another's) built by ``tests/fixtures/build_event_pairs.py`` from the
real team, venue and runner names in the shared Betfair recordings, with the
spellings bookmakers use, and labelled same / not the same event. The matcher
was not tuned on it. A pair is *linked* when ``match_score(a, b)`` is not None
and reaches ``LINK_THRESHOLD``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from feed.matching import LINK_THRESHOLD, EventRecord, match_score

FIXTURE = Path(__file__).parent / "fixtures" / "event_pairs.json"
EVENT_FIELDS = ("event_id", "source", "sport", "start_time", "name", "home", "away", "competition", "venue", "country")
MIN_PRECISION = 0.99
MIN_RECALL = 0.95
#: kinds the set must exercise (any kind starting with "racing_" counts as racing)
REQUIRED_KINDS = ("abbreviation", "accent", "different_day", "women", "reserve")


def _pairs() -> list[dict]:
    with FIXTURE.open(encoding="utf-8") as f:
        return json.load(f)["pairs"]


def _describe(p: dict, score) -> str:
    a, b = p["a"], p["b"]
    dt_min = (None if a["start_time"] is None or b["start_time"] is None
              else round((b["start_time"] - a["start_time"]) / 60_000, 1))
    return (f"  [{p['kind']}] score={score!r} Δt={dt_min} min\n"
            f"    a: {a['source']}/{a['sport']} {a['name']!r} home={a['home']!r} away={a['away']!r} "
            f"comp={a['competition']!r} venue={a['venue']!r}\n"
            f"    b: {b['source']}/{b['sport']} {b['name']!r} home={b['home']!r} away={b['away']!r} "
            f"comp={b['competition']!r} venue={b['venue']!r}\n"
            f"    note: {p['note']}")


def test_fixture_is_a_usable_evaluation_set():
    pairs = _pairs()
    assert len(pairs) >= 200, f"only {len(pairs)} labelled pairs"
    labels = Counter(p["same"] for p in pairs)
    assert labels[True] and labels[False], f"both labels needed, got {dict(labels)}"
    kinds = {p["kind"] for p in pairs}
    missing = [k for k in REQUIRED_KINDS if k not in kinds]
    assert not missing, f"kinds missing from the fixture: {missing}"
    assert kinds & {"order", "reversed"}, "no order / reversed pairs"
    assert any(k.startswith("racing") for k in kinds), "no racing pairs"
    for i, p in enumerate(pairs):
        assert isinstance(p["same"], bool) and p["kind"] and p["note"], f"pair {i} lacks label/kind/note"
        for side in ("a", "b"):
            ev = p[side]
            assert tuple(ev) == EVENT_FIELDS, f"pair {i}.{side} fields {tuple(ev)}"
            assert ev["start_time"] is None or isinstance(ev["start_time"], int), f"pair {i}.{side} start_time"
            EventRecord(**ev)


def test_matcher_precision_and_recall_on_labelled_pairs():
    pairs = _pairs()
    threshold = float(LINK_THRESHOLD)
    tp = fp = fn = tn = 0
    false_links, missed, bad_scores = [], [], []
    for p in pairs:
        score = match_score(EventRecord(**p["a"]), EventRecord(**p["b"]))
        if score is not None and not (isinstance(score, (int, float)) and 0.0 <= score <= 1.0 and not math.isnan(score)):
            bad_scores.append(_describe(p, score))
            score = None
        linked = score is not None and score >= threshold
        if p["same"]:
            tp, fn = tp + linked, fn + (not linked)
            if not linked:
                missed.append(_describe(p, score))
        else:
            fp, tn = fp + linked, tn + (not linked)
            if linked:
                false_links.append(_describe(p, score))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    by_kind = Counter(p["kind"] for p in pairs)
    wrong_kind = Counter(line.split("]")[0].strip(" [") for line in false_links + missed)
    report = (
        f"\nLINK_THRESHOLD={threshold}  pairs={len(pairs)}  TP={tp} FP={fp} FN={fn} TN={tn}  "
        f"precision={precision:.4f} (need ≥ {MIN_PRECISION})  recall={recall:.4f} (need ≥ {MIN_RECALL})\n"
        f"errors by kind: {dict(sorted((k, f'{wrong_kind[k]}/{by_kind[k]}') for k in wrong_kind))}\n"
        + (f"\nscores outside 0..1 ({len(bad_scores)}):\n" + "\n".join(bad_scores) + "\n" if bad_scores else "")
        + f"\nfalse links ({len(false_links)}):\n" + ("\n".join(false_links) or "  none")
        + f"\n\nmissed links ({len(missed)}):\n" + ("\n".join(missed) or "  none")
    )
    assert not bad_scores and precision >= MIN_PRECISION and recall >= MIN_RECALL, report
