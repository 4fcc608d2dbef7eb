"""feed.sources.backoff: full-jitter exponential reconnect delays."""

from __future__ import annotations

import itertools
import random

import pytest

from feed.sources.backoff import Backoff, RepairPacer, backoff


def test_backoff_upper_bound_grows_exponentially_then_caps() -> None:
    delays = backoff(initial_s=0.5, factor=2.0, max_s=4.0, rng=lambda: 1.0)
    assert list(itertools.islice(delays, 6)) == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_is_full_jitter_within_bounds() -> None:
    rng = random.Random(7)
    delays = list(itertools.islice(backoff(initial_s=0.5, factor=2.0, max_s=30.0, rng=rng.random), 50))
    caps = [min(30.0, 0.5 * 2**n) for n in range(50)]
    assert all(0 <= d < cap for d, cap in zip(delays, caps, strict=True))
    # jitter: the late delays (cap 30 s) are spread out, not all equal
    assert len({round(d, 6) for d in delays[10:]}) > 30


def test_backoff_defaults_match_contract() -> None:
    first = list(itertools.islice(backoff(rng=lambda: 0.999999), 10))
    assert first[0] == pytest.approx(0.5, rel=1e-3)
    assert first[-1] == pytest.approx(30.0, rel=1e-3)


def test_backoff_rejects_nonsense_arguments() -> None:
    with pytest.raises(ValueError):
        next(backoff(initial_s=0))
    with pytest.raises(ValueError):
        next(backoff(factor=0.5))


def test_backoff_class_resets_to_initial() -> None:
    b = Backoff(initial_s=1.0, factor=3.0, max_s=100.0, rng=lambda: 1.0)
    assert [b.next_delay() for _ in range(3)] == [1.0, 3.0, 9.0]
    assert b.attempts == 3
    b.reset()
    assert b.attempts == 0
    assert b.next_delay() == 1.0


def test_repair_pacer_takes_the_first_repair_at_once_then_doubles_the_gap_up_to_the_cap() -> None:
    pacer = RepairPacer(first_s=1.0, max_s=8.0, quiet_s=60.0)
    taken: list[float] = []
    t = 0.0
    while t < 40.0:  # a provider that keeps asking every 0.1 s
        if pacer.due(t):
            pacer.take(t)
            taken.append(t)
        t = round(t + 0.1, 1)
    assert taken[:5] == [0.0, 1.0, 3.0, 7.0, 15.0]
    assert [b - a for a, b in zip(taken[4:], taken[5:])] == [8.0] * (len(taken) - 5)  # capped


def test_repair_pacer_starts_over_after_a_quiet_spell() -> None:
    pacer = RepairPacer(first_s=1.0, max_s=30.0, quiet_s=60.0)
    for t in (0.0, 1.0, 3.0):
        assert pacer.due(t)
        pacer.take(t)
    assert not pacer.due(6.9) and pacer.due(7.0)  # 4 s after the third
    assert pacer.due(63.0)  # a quiet minute: at once again …
    pacer.take(63.0)
    assert not pacer.due(63.9) and pacer.due(64.0)  # … and the gap is back to 1 s


def test_repair_pacer_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        RepairPacer(first_s=0.0)
    with pytest.raises(ValueError):
        RepairPacer(first_s=2.0, max_s=1.0)
    with pytest.raises(ValueError):
        RepairPacer(first_s=1.0, max_s=30.0, quiet_s=10.0)  # a quiet spell shorter than a gap
    pacer = RepairPacer(first_s=1.0, max_s=120.0)  # the quiet spell grows with a longer cap
    for t in (0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 63.0, 127.0):
        assert pacer.due(t)
        pacer.take(t)
    assert not pacer.due(127.0 + 119.0) and pacer.due(127.0 + 128.0)  # gap 128 → capped at 120 s…
