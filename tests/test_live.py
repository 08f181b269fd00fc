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
