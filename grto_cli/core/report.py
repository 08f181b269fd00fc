"""The method study's report: each method's mean ± std over seeds, what it cost, and its curves.

Plain functions over plain data (a curve is a list of ``(step, value)``), so every number in the
report can be checked by hand; ``plot_methods`` draws PNGs with matplotlib's non-interactive backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from grto_cli.core.answer import ToolCall
from grto_cli.core.curves import Curve
from grto_cli.core.io import atomic_path


# metrics.json key -> column title: what the report tabulates per split (see metrics.py for each).
REPORT_METRICS = {"giou": "gIoU", "ciou": "cIoU", "call_box_iou": "box IoU", "point_in_target": "point in target",
                  "prompt_adherence": "prompt adherence", "distinct_calls": "distinct calls",
                  "call_box_area_ratio": "box area ratio"}
# The policy's own grounding, which RL must raise over the base by at least MIN_GAIN in the mean and
# by more than twice the seed std to count as a gain (README: the study).
POLICY_METRICS = ("call_box_iou", "point_in_target")
MIN_GAIN = 0.03


@dataclass
class RunResult:
    """One (method, seed) run of the study, read from its files."""
    method: str
    seed: int
    metrics: dict[str, dict]  # split -> that split's metrics.json (the best-on-val system)
    curves: dict[str, Curve]  # metric name -> curve over RL steps
    rollouts_per_step: int  # queries_per_step x group_size
    steps: int  # RL steps the run took
    best_val_giou: float  # the val gIoU of the checkpoint the run kept
    bootstrap_rollouts: int = 0  # generated before RL (b-grto's bootstrap), 0 otherwise
    train_seconds: float | None = None
    bootstrap_seconds: float | None = None
    last_metrics: dict[str, dict] | None = None  # split -> metrics.json of the last step's system


def gain(runs: Sequence[RunResult], base: Mapping[str, dict], split: str, key: str,
         last: bool = False) -> tuple[float, float]:
    """Mean and sample std over seeds of (run - base) on one split's metric (the best-on-val
    system, or the last step's with ``last``); NaN where nothing was measured."""
    values = []
    for r in runs:
        metrics = (r.last_metrics or {}) if last else r.metrics
        if split in metrics and split in base and metrics[split].get(key) is not None:
            values.append(float(metrics[split][key]) - float(base[split][key]))
    return mean_std(values)


def is_gain(mean: float, std: float, min_gain: float = MIN_GAIN) -> bool:
    """A gain: at least ``min_gain`` in the mean and more than twice the seed std.

    >>> is_gain(0.05, 0.01), is_gain(0.05, 0.03), is_gain(0.02, 0.0), is_gain(float("nan"), 0.0)
    (True, False, False, False)
    """
    return not math.isnan(mean) and mean >= min_gain and mean > 2 * std


def constant_call(boxes: Sequence[Sequence[float]]) -> ToolCall:
    """The one answer a policy that ignores image and query would learn: the per-coordinate median
    of the training targets' boxes, with its centre as the point. Scored like any policy's calls,
    it is the "same box for everything" baseline a grounding policy must beat.

    >>> constant_call([[0, 0, 4, 4], [2, 2, 6, 6], [4, 4, 8, 8]])
    ToolCall(box=(2.0, 2.0, 6.0, 6.0), points=((4.0, 4.0),))
    """
    x1, y1, x2, y2 = (float(v) for v in np.median(np.asarray(boxes, dtype=np.float64), axis=0))
    return ToolCall(box=(x1, y1, x2, y2), points=(((x1 + x2) / 2, (y1 + y2) / 2),))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for no values.

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    >>> mean_std([4.0])
    (4.0, 0.0)
    """
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def steps_to_reach(curve: Curve, threshold: float) -> int | None:
    """The first step at which the curve reaches ``threshold``; None if it never does.

    >>> steps_to_reach([(0, 10.0), (10, 19.0), (20, 21.0), (30, 25.0)], 20.0)
    20
    >>> steps_to_reach([(0, 10.0)], 20.0) is None
    True
    """
    return next((step for step, value in curve if value >= threshold), None)


def against_rollouts(curve: Curve, per_step: int, offset: int = 0) -> Curve:
    """Re-index a curve by rollouts generated so far: ``offset`` (e.g. the bootstrap's) plus
    ``per_step`` for each RL step taken before the point was measured.

    >>> against_rollouts([(0, 1.0), (10, 2.0)], per_step=64, offset=8000)
    [(8000, 1.0), (8640, 2.0)]
    """
    return [(offset + step * per_step, value) for step, value in curve]


def mean_curve(curves: Sequence[Curve]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Pointwise mean, min and max over curves, on the x values every curve has (x, mean, lo, hi).

    >>> mean_curve([[(0, 1.0), (1, 3.0)], [(0, 3.0), (1, 5.0), (2, 9.0)]])
    ([0, 1], [2.0, 4.0], [1.0, 3.0], [3.0, 5.0])
    """
    common = sorted(set.intersection(*(set(x for x, _ in c) for c in curves))) if curves else []
    tables = [dict(c) for c in curves]
    ys = [[t[x] for t in tables] for x in common]
    return common, [sum(v) / len(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def ordering(means: Mapping[str, float], order: Sequence[str]) -> bool:
    """Whether ``means`` strictly decrease along ``order`` (best first).

    >>> ordering({"b-grto": 3.0, "grto": 2.0, "grpo": 1.0}, ["b-grto", "grto", "grpo"])
    True
    >>> ordering({"b-grto": 3.0, "grto": 3.5, "grpo": 1.0}, ["b-grto", "grto", "grpo"])
    False
    """
    values = [means[m] for m in order]
    return all(a > b for a, b in zip(values, values[1:]))


def fmt(mean: float, std: float | None = None, digits: int = 2) -> str:
    """``mean ± std`` for a table cell.

    >>> fmt(25.123, 1.5), fmt(0.5, None, 3), fmt(float("nan"), 0.0)
    ('25.12 ± 1.50', '0.500', 'n/a')
    """
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """
    >>> print(markdown_table(["a", "b"], [["1", "2"]]))
    | a | b |
    | --- | --- |
    | 1 | 2 |
    """
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def by_method(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for r in runs:
        out.setdefault(r.method, []).append(r)
    return out


def split_stats(runs: Sequence[RunResult], split: str, key: str) -> tuple[float, float]:
    return mean_std([float(r.metrics[split][key]) for r in runs
                     if split in r.metrics and r.metrics[split].get(key) is not None])


def plot_methods(series: Mapping[str, Sequence[Curve]], xlabel: str, ylabel: str, title: str,
                 path: str | Path) -> None:
    """One chart, one line per method (mean over its seeds, shaded from min to max), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for method, curves in series.items():
        x, mean, lo, hi = mean_curve(list(curves))
        if not x:
            continue
        (line,) = ax.plot(x, mean, label=f"{method} (n={len(curves)})", linewidth=1.8)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
