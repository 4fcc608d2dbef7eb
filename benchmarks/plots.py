"""Shared by the benchmarks: the machine's load (printed beside every figure)
and the PNGs they write to ``docs/bench/`` (matplotlib, Agg backend, small
files — the README links them).

Needs ``pip install -e .[bench]`` (matplotlib, psutil, hdrhistogram).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "bench"


def machine_load() -> str:
    """CPU count and the 1/5/15-minute load averages, as one phrase."""
    one, five, fifteen = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min)"


def header(name: str) -> str:
    """The first line of a benchmark's output: what ran where, and the load before it."""
    return (f"{name}: python {platform.python_version()} on {platform.machine()}; {machine_load()} before; "
            f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, name: str, out_dir: Path | None = None) -> Path:
    """Write ``fig`` as ``<out_dir>/<name>.png`` (default docs/bench/) and close it."""
    d = out_dir or OUT_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    pyplot().close(fig)
    return path


PERCENTILES = (0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 99.999, 100)
TAIL_TICKS = ((50, "50"), (90, "90"), (99, "99"), (99.9, "99.9"), (99.99, "99.99"))


def _stretch(q: float) -> float:
    """Percentile → x position: 1 / (1 − q) on a log axis, so each extra 9 gets the same width."""
    return 1.0 / max(1e-5, 1.0 - q / 100.0)


def cdf_points(hist: Any, scale: float = 1e-3) -> tuple[list[float], list[float]]:
    """(stretched percentile, value × scale) pairs of an HdrHistogram, up to what its count supports."""
    n = hist.get_total_count()
    xs, ys = [], []
    for q in PERCENTILES:
        if q not in (0, 100) and n * (1 - q / 100) < 1:
            continue  # fewer than one sample beyond this percentile
        xs.append(_stretch(q))
        ys.append(max(hist.get_value_at_percentile(q) * scale, 1e-3))
    return xs, ys


def cdf_axes(ax: Any, lines: Sequence[tuple[str, Any]], title: str, ylabel: str = "lag, ms (log)",
             scale: float = 1e-3) -> None:
    """One latency-distribution panel (HdrHistogram style: the CDF with the tail stretched):
    a line per (label, HdrHistogram); percentile on x, value (log) on y."""
    top = 0.0
    for i, (label, hist) in enumerate(lines):  # a line's colour follows its place, drawn or not
        if hist is None or not hist.get_total_count():
            continue
        xs, ys = cdf_points(hist, scale)
        top = max(top, xs[-1])
        ax.plot(xs, ys, marker=".", color=f"C{i}", label=f"{label} (n={hist.get_total_count():,})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [(x, t) for q, t in TAIL_TICKS if (x := _stretch(q)) <= max(top, 10)]
    ax.set_xticks([x for x, _ in ticks], [t for _, t in ticks])
    ax.set_xlabel("percentile")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def bar_axes(ax: Any, labels: Sequence[str], values: Sequence[float], title: str, ylabel: str,
             notes: Sequence[str] | None = None, target: float | None = None, target_label: str = "target",
             colors: Sequence[str] | None = None) -> None:
    """Bars with their values (and an optional note) written above them; optional target line."""
    colors = colors or [f"C{i}" for i in range(len(labels))]
    bars = ax.bar(range(len(labels)), values, color=colors)
    ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=15)
    for i, (b, v) in enumerate(zip(bars, values)):
        text = f"{v:,.1f}" if v < 100 else f"{v:,.0f}"
        if notes and notes[i]:
            text += f"\n{notes[i]}"
        ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    if target is not None:
        ax.axhline(target, color="k", linestyle="--", linewidth=1, label=target_label)
        ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.25)
