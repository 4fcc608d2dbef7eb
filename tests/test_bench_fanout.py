"""benchmarks/fanout.py's summary over several rounds: medians and same-run ratios (no servers run)."""

from __future__ import annotations

from typing import Any

from benchmarks.fanout import median_results, ratios, summary


def _run(us: float, lost: int = 0) -> dict[str, Any]:
    return {"cpu_us_per_frame": us, "frames_per_cpu_s": 1e6 / us, "frames_per_write": 2.0, "p50_ms": 1.0,
            "p99_ms": 2.0, "p999_ms": 3.0, "lost": lost, "dup": 0, "updates_per_s": 2000, "clients": 1000}


def _round(ours: float, floor: float, starlette: float, lost: int = 0) -> dict[str, dict[str, Any]]:
    return {"lag/oddsfeed": _run(ours, lost=lost), "lag/floor": _run(floor), "lag/starlette": _run(starlette)}


def test_ratios_are_per_round_and_the_verdict_takes_their_median() -> None:
    # the median rounds differ per server (oddsfeed: round 1, Starlette: round 3), so a ratio of
    # median-round figures (30 / 14 = 2.14×: met) is not the median of the rounds' ratios (1.83×)
    rounds = [_round(14.0, 7.0, 40.0), _round(12.0, 8.0, 22.0), _round(20.0, 8.0, 30.0, lost=3)]
    per_round = [ratios(r) for r in rounds]
    assert [round(r["lag_floor"], 2) for r in per_round] == [2.0, 1.5, 2.5]
    assert [round(r["lag_starlette"], 2) for r in per_round] == [2.86, 1.83, 1.5]
    med = median_results(rounds)
    assert med["lag/oddsfeed"]["cpu_us_per_frame"] == 14.0  # the median round's figure …
    assert med["lag/oddsfeed"]["lost"] == 3  # … with the worst round's losses
    text = "\n".join(summary(med, per_round))
    # judged on the median of the rounds' own ratios, not on figures of different rounds
    assert "= 2.00× the floor (rounds: 2.00×, 1.50×, 2.50×)" in text
    assert "[NOT MET] µs per delivered frame ≤ 1.5× the floor" in text
    assert "[NOT MET] ≥ 2× the Starlette baseline" in text and "1.83× (" in text  # median of 2.86, 1.83, 1.5
    assert "[NOT MET] 2,000 updates/s" in text  # a round that lost deltas fails the lag target


def test_a_round_that_delivered_nothing_is_no_ratio_and_the_worst_figure() -> None:
    empty = _round(14.0, 7.0, 30.0)
    empty["lag/oddsfeed"]["cpu_us_per_frame"] = 0.0  # nothing delivered: no CPU per frame to speak of
    empty["lag/oddsfeed"]["frames_per_cpu_s"] = 0.0
    rounds = [empty, _round(12.0, 8.0, 22.0), _round(16.0, 8.0, 30.0)]
    per_round = [ratios(r) for r in rounds]
    assert "lag_floor" not in per_round[0] and "lag_starlette" not in per_round[0]
    assert median_results(rounds)["lag/oddsfeed"]["cpu_us_per_frame"] == 16.0  # (12, 16, nothing)


def test_one_round_keeps_the_same_run_verdict() -> None:
    text = "\n".join(summary(_round(9.0, 6.0, 30.0)))
    assert "= 1.50× the floor" in text and "[met] µs per delivered frame ≤ 1.5× the floor" in text
    assert "same run: floor" in text
