"""Long-mode fuzzing of every normaliser, and the validator's cost per update.

    python benchmarks/fuzz.py --examples 10000         # ≥ 10,000 examples per normaliser
    python benchmarks/fuzz.py --examples 500 --only push
    python benchmarks/fuzz.py --validator              # µs per validate_update call

Reuses the strategies, seeds, invariants and runner of ``tests/test_fuzz.py``
(nothing is copied): each example is a provider's real message sequence with
one or two messages mutated, fed through ``normaliser.feed`` and every
returned update through ``feed.validate.validate_update``. Prints per
normaliser: examples, messages fed, crashes (an exception other than
FeedDecodeError), updates accepted, rejections by reason (whole messages and
markets rejected alone; ``validate:<reason>`` = updates a normaliser returned
that the validator rejected) and invalid-accepted (accepted updates breaking
the test's own invariants). Exits 1 when anything crashed or an invalid
update was accepted. Deterministic (hypothesis ``derandomize``) unless
``--seed`` is given. Then prints the machine's load before/after and writes
``docs/bench/fuzz-outcomes.png`` (per normaliser: messages fed, updates
accepted, rejected alone and rejected by the validator, with crashes and
invalid-accepted; ``--png-dir`` elsewhere, ``--no-png`` not at all).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_fuzz  # (tests/test_fuzz.py: the strategies, seeds and invariants live there)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from benchmarks import plots


def fuzz(target: test_fuzz.Target, examples: int, seed: int | None) -> test_fuzz.Outcome:
    total = test_fuzz.Outcome()

    @settings(max_examples=examples, derandomize=seed is None, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=test_fuzz.cases(target))
    def run(case: test_fuzz.Case) -> None:
        total.merge(test_fuzz.run_case(target, case))  # counts, never fails: every example is run

    if seed is not None:
        run = hypothesis_seed(seed)(run)
    run()
    return total


def validator_cost(repeat: int = 5) -> None:
    """µs per validate_update on typical market updates (best of ``repeat``)."""
    from feed.models import MarketHeader, Selection
    from feed.normalise.base import MarketUpdate
    from feed.validate import validate_update

    now = 1_755_349_200_000

    def sel(i: int, depth: int) -> Selection:
        back = [(2.0 + i - k * 0.02, 10.0 + k) for k in range(depth)]
        lay = [(2.02 + i + k * 0.02, 5.0 + k) for k in range(depth)]
        return Selection(selection_id=str(i), price=back[0][0] if back else None, back=back, lay=lay, ltp=2.0,
                         traded_volume=1234.5, sort_priority=i + 1, adjustment_factor=12.5)

    header = MarketHeader(bookmaker="betfair_exchange", status="OPEN", bet_delay_s=5, version=123456789,
                          start_time=now + 3_600_000, traded_volume=1e6, number_of_winners=1)

    def update(selections: list[Selection], head: MarketHeader | None = None) -> MarketUpdate:
        return MarketUpdate(market_id="bf:1.1", source="betfair", image=head is not None, header=head,
                            selections=selections, source_ts=now - 40, received_at=now)

    cases = {
        "exchange delta: 1 selection, 3+3 levels": update([sel(0, 3)]),
        "exchange delta: 1 selection, 10+10 levels": update([sel(0, 10)]),
        "exchange delta: 2 selections, 10+10 levels": update([sel(0, 10), sel(1, 10)]),
        "exchange image: 20 selections, 10+10 + header": update([sel(i, 10) for i in range(20)], header),
        "bookmaker: 3 selections, price + max stake": update(
            [Selection(selection_id=s, price=1.9, max_stake=500.0) for s in "abc"]),
    }
    print(f"{'update':48s} {'µs/update':>10s} {'µs/selection':>13s}")
    for name, u in cases.items():
        n = 100_000 // max(1, len(u.selections))
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(n):
                validate_update(u, now)
            best = min(best, (time.perf_counter() - t0) / n)
        print(f"{name:48s} {best * 1e6:10.2f} {best * 1e6 / len(u.selections):13.2f}")


def write_png(rows: list[tuple[str, test_fuzz.Outcome, dict[str, int], float]], args: argparse.Namespace,
              load0: tuple[float, ...], load1: tuple[float, ...]) -> Path:
    """Grouped bars per normaliser (log): messages fed, updates accepted, whole messages /
    markets rejected, updates the validator rejected; crashes and invalid-accepted above."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(max(6.5, 1.8 * len(rows) + 2), 4.2))
    groups = (("messages fed", lambda o: o.messages), ("updates accepted", lambda o: o.accepted),
              ("rejected (message / market)", lambda o: sum(o.rejected.values())),
              ("rejected by the validator", lambda o: sum(o.validator_rejected.values())))
    w = 0.8 / len(groups)
    for g, (label, get) in enumerate(groups):
        xs = [i - 0.4 + w * (g + 0.5) for i in range(len(rows))]
        vals = [get(out) for _, out, _, _ in rows]
        bars = ax.bar(xs, [max(v, 0.8) for v in vals], w, color=f"C{g}", label=label)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:,}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=6, rotation=90)
    ax.set_yscale("log")
    ax.set_ylim(0.7, None)
    labels = []
    for name, out, _, _ in rows:
        bad = len(out.crashes) + len(out.invalid_accepted)
        labels.append(f"{name}\n{out.examples:,} examples\n{'' if not bad else 'FAIL: '}"
                      f"{len(out.crashes)} crashes, {len(out.invalid_accepted)} invalid-acc.")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    for t, (_, out, _, _) in zip(ax.get_xticklabels(), rows):
        if out.crashes or out.invalid_accepted:
            t.set_color("C3")
    ax.set_ylabel("count (log)")
    ax.margins(y=0.3)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    seed = "derandomized" if args.seed is None else f"seed {args.seed}"
    ax.set_title(f"fuzzing the normalisers: {args.examples:,} examples each ({seed}); "
                 "target: 0 crashes, 0 invalid accepted", fontsize=9)
    fig.suptitle(f"{os.cpu_count()} CPUs, load avg {load0[0]:.2f} → {load1[0]:.2f}", fontsize=8)
    return plots.save(fig, "fuzz-outcomes", args.png_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="examples per normaliser (default 10000)")
    parser.add_argument("--only", action="append", help="fuzz only this target (repeatable): "
                        + ", ".join(sorted(test_fuzz.TARGETS)) + ", betfair-recorded")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: derandomized)")
    parser.add_argument("--validator", action="store_true", help="measure validate_update instead of fuzzing")
    parser.add_argument("--png-dir", type=Path, default=None, help="where fuzz-outcomes.png goes (default docs/bench/)")
    parser.add_argument("--no-png", action="store_true")
    args = parser.parse_args()
    if args.validator:
        validator_cost()
        return 0
    targets = dict(test_fuzz.TARGETS)
    recorded = test_fuzz.betfair_recordings_target()
    if recorded is not None:
        targets[recorded.name] = recorded
    else:
        print(f"(no shared recordings at {test_fuzz.SHARED_BETFAIR}: betfair-recorded skipped)")
    if args.only:
        targets = {k: v for k, v in targets.items() if k in args.only}
    rows = []
    failed = False
    load0 = os.getloadavg()
    for name, target in targets.items():
        t0 = time.perf_counter()
        out = fuzz(target, args.examples, args.seed)
        took = time.perf_counter() - t0
        failed |= bool(out.crashes or out.invalid_accepted)
        reasons = dict(sorted(out.rejected.items(), key=lambda kv: -kv[1]))
        reasons.update({f"validate:{k}": v for k, v in out.validator_rejected.items()})
        rows.append((name, out, reasons, took))
        for problem in (out.crashes + out.invalid_accepted)[:5]:
            print(f"  {name}: {problem[:400]}")
    print()
    print("| normaliser | examples | messages | crashes | accepted updates | invalid-accepted | s | rejected by reason |")
    print("|---|---|---|---|---|---|---|---|")
    for name, out, reasons, took in rows:
        text = ", ".join(f"{k} {v}" for k, v in reasons.items()) or "—"
        print(f"| {name} | {out.examples:,} | {out.messages:,} | {len(out.crashes)} | {out.accepted:,} | "
              f"{len(out.invalid_accepted)} | {took:.0f} | {text} |")
    load1 = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPUs; load average before {load0[0]:.2f} / {load0[1]:.2f} / "
          f"{load0[2]:.2f}, after {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f} (1/5/15 min)")
    if not args.no_png and rows:
        print(f"wrote {write_png(rows, args, load0, load1)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
