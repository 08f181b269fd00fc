"""Per-step curves with dvclive, so `dvc plots show` draws them, and as a PNG that opens offline."""

from __future__ import annotations

from pathlib import Path

from grto_cli.core.curves import CURVES_PNG, metrics_dir, plot_run_curves, truncate_curves

class StepLogger:
    """A dvclive writer used as a context manager; logs a dict of scalars per step. ``resume_step``
    continues curves already in ``directory`` from that step on (later rows are dropped)."""

    def __init__(self, directory: str | Path, resume_step: int | None = None, title: str | None = None):
        from dvclive import Live

        class CurvesOnly(Live):
            def _init_dvc(self) -> None:
                """No git or DVC probing: grto's own dvc.yaml declares the plots and no experiment is
                saved, and dvclive's probe raises in a git repository without commits (a project
                `grto init` has just made)."""

        self.directory = Path(directory)
        self.title = title or str(directory)
        resume = resume_step is not None
        if resume:
            truncate_curves(directory, resume_step)

        # dvcyaml=None / save_dvc_exp=False: the pipeline's own dvc.yaml declares the plots, and
        # nothing may create git refs or experiments behind `dvc repro`'s back.
        self.live = CurvesOnly(str(directory), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)

    def log(self, step: int, metrics: dict) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, float(value))

    def __enter__(self) -> "StepLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.live.end()
        metrics = metrics_dir(self.directory)
        # `dvc plots show` writes a page that loads vega from a CDN; this PNG needs nothing.
        plot_run_curves(metrics, metrics / CURVES_PNG, self.title)


class NoLogger:
    """``StepLogger``'s stand-in on processes other than the main one: curves are written once."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def __enter__(self) -> "NoLogger":
        return self

    def __exit__(self, *exc) -> None:
        pass
