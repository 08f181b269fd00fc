"""Per-step curve files: where a run's curves live, and reading, truncating and drawing them.

A curve is one file per metric, ``<dir>/plots/metrics/<name>.tsv`` (a name's namespace is a folder:
``rollout/reward_mean``), a header then ``step<TAB>value`` rows, as dvclive writes them
(``stages/live.py: StepLogger``) and `dvc plots show` reads them.
"""

from __future__ import annotations

import math
from pathlib import Path

from grto_cli.core.io import atomic_path, write_text

Curve = list[tuple[int, float]]
CURVES_PNG = "curves.png"  # beside the curves it draws: <dir>/plots/metrics/curves.png


def metrics_dir(directory: str | Path) -> Path:
    """The folder a run's curve files are in."""
    return Path(directory) / "plots" / "metrics"


def curve_path(directory: str | Path, name: str) -> Path:
    """The file of one metric's curve (``name`` as logged, e.g. ``val/giou``)."""
    return metrics_dir(directory) / f"{name}.tsv"


def read_curve(tsv: str | Path) -> Curve:
    """A dvclive curve file (``step<TAB>value`` rows under a header) as (step, value) pairs."""
    _, *rows = Path(tsv).read_text().splitlines()
    out = []
    for row in rows:
        step, value = row.split("\t")[:2]
        out.append((int(float(step)), float(value)))
    return out


def truncate_curves(directory: str | Path, last_step: int) -> None:
    """Drop the rows after ``last_step`` from every curve: what a killed run logged past its last
    checkpoint is logged again, for the same steps, when it resumes."""
    for tsv in sorted(metrics_dir(directory).glob("**/*.tsv")):
        header, *rows = tsv.read_text().splitlines()
        kept = [r for r in rows if int(float(r.split("\t")[0])) <= last_step]
        if len(kept) != len(rows):
            write_text(tsv, "\n".join([header, *kept]) + "\n")


def plot_run_curves(metrics_dir: str | Path, path: str | Path, title: str, ncols: int = 3) -> list[str]:
    """Every dvclive curve under ``metrics_dir`` (``<name>.tsv``, nested by namespace) on one PNG, a
    panel per metric, so a run's curves open offline without `dvc plots show`'s web page. Returns
    the metric names drawn, in panel order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(metrics_dir)
    curves = {str(t.relative_to(root).with_suffix("")): read_curve(t) for t in sorted(root.rglob("*.tsv"))}
    curves = {name: c for name, c in curves.items() if c}
    if not curves:
        return []
    nrows = math.ceil(len(curves) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.3 * nrows), dpi=90, squeeze=False)
    for ax, (name, curve) in zip(axes.flat, curves.items()):
        steps, values = zip(*curve)
        ax.plot(steps, values, marker="." if len(curve) < 30 else None, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title above the panels
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return list(curves)
