"""Per-step curves with dvclive, so `dvc plots show` draws them."""

from __future__ import annotations

from pathlib import Path


class StepLogger:
    """A dvclive writer used as a context manager; logs a dict of scalars per step."""

    def __init__(self, directory: str | Path, resume: bool = False):
        from dvclive import Live

        # dvcyaml=None / save_dvc_exp=False: the pipeline's own dvc.yaml declares the plots, and
        # nothing may create git refs or experiments behind `dvc repro`'s back.
        self.live = Live(str(directory), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)

    def log(self, step: int, metrics: dict) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, float(value))

    def __enter__(self) -> "StepLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.live.end()
