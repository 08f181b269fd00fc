"""Per-step curves: a resumed run continues its curves from its checkpoint's step."""

from grto_cli.stages.live import StepLogger


def _rows(directory, name):
    return (directory / f"plots/metrics/{name}.tsv").read_text().splitlines()[1:]


def test_resuming_drops_what_was_logged_past_the_checkpoint(tmp_path):
    with StepLogger(tmp_path) as log:  # killed after logging step 3, last checkpoint at step 2
        for step in (1, 2, 3):
            log.log(step, {"loss/policy": float(step), "val/giou": 10.0 * step})
    with StepLogger(tmp_path, resume_step=2) as log:
        for step in (3, 4):
            log.log(step, {"loss/policy": 100.0 + step})
    assert [r.split("\t") for r in _rows(tmp_path, "loss/policy")] == [
        ["1", "1.0"], ["2", "2.0"], ["3", "103.0"], ["4", "104.0"]]
    assert [r.split("\t")[0] for r in _rows(tmp_path, "val/giou")] == ["1", "2"]


def test_a_finished_logger_draws_its_curves_to_a_png(tmp_path):
    """The curves open offline: one PNG beside them, a panel per metric, redrawn on resume."""
    import numpy as np
    from PIL import Image

    from grto_cli.core.curves import CURVES_PNG, plot_run_curves

    with StepLogger(tmp_path, title="train b-grto") as log:
        for step in (1, 2, 3):
            log.log(step, {"loss/policy": float(step), "val/giou": 10.0 * step})
    png = tmp_path / "plots" / "metrics" / CURVES_PNG
    first = np.asarray(Image.open(png).convert("L"))
    assert first.shape[0] > 100 and first.std() > 0  # a drawn chart, not a blank canvas
    assert plot_run_curves(png.parent, tmp_path / "again.png", "t") == ["loss/policy", "val/giou"]
    with StepLogger(tmp_path, resume_step=3, title="train b-grto") as log:
        log.log(4, {"loss/policy": 50.0, "val/giou": 0.0})
    assert not np.array_equal(np.asarray(Image.open(png).convert("L")), first)


def test_no_curves_no_png(tmp_path):
    from grto_cli.core.curves import plot_run_curves

    assert plot_run_curves(tmp_path, tmp_path / "x.png", "t") == [] and not (tmp_path / "x.png").exists()


def test_curves_log_in_a_git_repository_without_commits(tmp_path, monkeypatch):
    """A project `grto init` has just made has a git repository and no commit yet: dvclive's own
    git probe raises there ("Empty git repo"); the step logger must not."""
    import shutil
    import subprocess
    import sys

    import pytest

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    with StepLogger("results/train") as log:
        log.log(0, {"val/giou": 1.0})
    assert _rows(tmp_path / "results/train", "val/giou") == ["0\t1.0"]
