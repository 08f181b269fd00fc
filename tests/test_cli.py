"""The stages through the CLI, at toy size: what `dvc repro` runs, minus the step counts."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from grto_cli.cli import app
from grto_cli.core.tiny import tiny_sam_arch
from grto_cli.core.tool import build_sam

runner = CliRunner()
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _invoke(args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    return runner.invoke(app, args, catch_exceptions=False)


def test_pretrain_then_evaluate_writes_metrics_predictions_and_sheet(tmp_path, monkeypatch):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    small = ["--set", "prepare.sizes={train: 24, val: 4, testA: 6, testB: 6}"]
    assert _invoke(["prepare", "synthetic", *small], tmp_path, monkeypatch).exit_code == 0
    r = _invoke(["pretrain", "--set", "pretrain.sam.steps=2", "--set", "pretrain.sft.steps=2",
                 "--set", "pretrain.sam.batch_size=2", "--set", "pretrain.sft.batch_size=2"], tmp_path, monkeypatch)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "models/base/policy/config.json").is_file()
    assert (tmp_path / "models/base/tool/sam.pt").is_file()
    r = _invoke(["evaluate", "--split", "testB", "--out", "res/testB/metrics.json"], tmp_path, monkeypatch)
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "res/testB/metrics.json").read_text())
    for key in ("giou", "ciou", "precision@0.5", "precision@0.9", "format_rate", "n", "call_box_iou",
                "point_in_target", "distinct_calls", "distinct_call_ratio", "prompt_adherence", "call_box_area_ratio",
                "oracle_giou"):
        assert key in metrics
    assert 0 <= metrics["oracle_giou"] <= 100 and 0 <= metrics["call_box_iou"] <= 1
    assert metrics["n"] == 6
    rows = [json.loads(line) for line in (tmp_path / "res/testB/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"id", "completion", "status", "iou", "mask", "call_box_iou",
                               "point_in_target"} <= set(rows[0])
    assert metrics["call_box_iou"] == pytest.approx(sum(r["call_box_iou"] for r in rows) / 6)
    # gIoU is the mean of the per-sample IoUs the predictions file reports.
    assert abs(metrics["giou"] - 100 * sum(r["iou"] for r in rows) / 6) < 1e-6
    # Per query kind: each kind's own means, over that kind's rows of the predictions file.
    kinds = {json.loads(line)["id"]: json.loads(line)["meta"]["query_kind"]
             for line in (tmp_path / "data/prepared/synthetic/testB.jsonl").read_text().splitlines()}
    by_kind = metrics["by_query_kind"]
    assert sum(v["n"] for v in by_kind.values()) == 6
    for kind, v in by_kind.items():
        mine = [r for r in rows if kinds[r["id"]] == kind]
        assert all(r["query_kind"] == kind for r in mine)  # each prediction row names its record's kind
        assert v["n"] == len(mine)
        assert v["point_in_target"] == pytest.approx(sum(r["point_in_target"] for r in mine) / len(mine))
        assert v["giou"] == pytest.approx(100 * sum(r["iou"] for r in mine) / len(mine))
    assert (tmp_path / "res/testB/overlays.png").stat().st_size > 0
    assert (tmp_path / "plots" / "metrics").exists() is False  # nothing stray in the cwd
    assert (tmp_path / "results/pretrain/policy/plots/metrics/sft/loss.tsv").is_file()


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    r = _invoke(["evaluate", "--data", "nowhere"], tmp_path, monkeypatch)
    assert r.exit_code == 2
    assert "manifest not found" in r.output and "nowhere" in r.output


def test_unknown_override_is_refused_by_name(tmp_path, monkeypatch):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    r = _invoke(["evaluate", "--set", "evaluate.batchsize=3"], tmp_path, monkeypatch)
    assert r.exit_code == 2 and "batchsize" in r.output


def test_pretrain_is_deterministic_given_a_seed(tmp_path, monkeypatch):
    import hashlib

    shutil.copy(PARAMS, tmp_path / "params.yaml")
    assert _invoke(["prepare", "synthetic", "--set", "prepare.sizes={train: 12, val: 2, testA: 2, testB: 2}"],
                   tmp_path, monkeypatch).exit_code == 0
    digests = []
    for out in ("a", "b"):
        r = _invoke(["pretrain", "--out", out, "--set", "pretrain.sam.steps=2", "--set", "pretrain.sft.steps=2",
                     "--set", "pretrain.sam.batch_size=2", "--set", "pretrain.sft.batch_size=2"], tmp_path, monkeypatch)
        assert r.exit_code == 0, r.output
        digests.append([hashlib.sha256((tmp_path / out / f).read_bytes()).hexdigest()
                        for f in ("tool/sam.pt", "policy/model.safetensors")])
    assert digests[0] == digests[1]


def test_pretrain_side_by_side_trains_what_one_process_does(tmp_path, monkeypatch):
    """pretrain.parallel runs SAM's warm-up in a spawned process: same seed, same tool and policy
    as the one-process run, up to the rounding of another thread count (which AdamW's normalised
    steps can carry to a few lr-sized differences after 3 steps; another seed moves every weight)."""
    from safetensors.torch import load_file

    shutil.copy(PARAMS, tmp_path / "params.yaml")
    assert _invoke(["prepare", "synthetic", "--set", "prepare.sizes={train: 12, val: 2, testA: 2, testB: 2}"],
                   tmp_path, monkeypatch).exit_code == 0
    for out, parallel in (("one", "false"), ("two", "true")):
        r = _invoke(["pretrain", "--out", out, "--set", f"pretrain.parallel={parallel}", "--set", "pretrain.sam.steps=3",
                     "--set", "pretrain.sft.steps=3", "--set", "pretrain.sam.batch_size=2",
                     "--set", "pretrain.sft.batch_size=2"], tmp_path, monkeypatch)
        assert r.exit_code == 0, r.output
    tools = [torch.load(tmp_path / out / "tool/sam.pt", weights_only=True) for out in ("one", "two")]
    policies = [load_file(tmp_path / out / "policy/model.safetensors") for out in ("one", "two")]
    torch.manual_seed(0)  # pretrain.seed: SAM's initial weights
    untrained = build_sam(tiny_sam_arch()).state_dict()
    for a, b in ((tools[0], tools[1]), (policies[0], policies[1])):
        assert a.keys() == b.keys()
        diffs = torch.cat([(a[key].float() - b[key].float()).abs().flatten() for key in a])
        assert diffs.max() < 5e-3 and diffs.mean() < 1e-4, (diffs.max(), diffs.mean())
    assert any(not torch.equal(tools[1][k], untrained[k]) for k in untrained)  # the child did train it
    assert (tmp_path / "results/pretrain/sam/plots/metrics").is_dir()


def test_enumerated_options_are_refused_before_anything_loads(tmp_path, monkeypatch):
    """In an empty folder (no data, no models): the bad option is what gets reported, with the
    allowed values, not a missing file found later."""
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    for args, allowed in ((["train", "--set", "train.tool_loss=dice"], "dice_bce"),
                          (["train", "--method", "ppo"], "b-grto"),
                          (["train", "--set", "train.loss_mode=mean"], "token_mean"),
                          (["train", "--set", "train.tool_weighting=best"], "softmax"),
                          (["bootstrap", "--set", "bootstrap.loss=l2"], "focal"),
                          (["evaluate", "--set", "evaluate.on_bad_record=ignore"], "skip"),
                          (["evaluate", "--set", "policy.coord_convention=pixels"], "relative1000")):
        r = _invoke(args, tmp_path, monkeypatch)
        assert r.exit_code == 2, (args, r.output)
        assert allowed in r.output and "not found" not in r.output, (args, r.output)


def test_params_are_typed_by_the_stage_config(tmp_path):
    """PyYAML reads `1e-5` as a string: a float field takes it as a float; a value of the wrong type
    is an error that names the key, the value and the type."""
    from grto_cli.stages.params import ConfigError, stage_config
    from grto_cli.stages.train import TrainConfig

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  policy_lr: 1e-5\n  steps: 7\n  clip_high: null\n  sampling: {temperature: 1}\n")
    cfg = stage_config(TrainConfig, params, "train")
    assert cfg.rl.policy_lr == 1e-5 and isinstance(cfg.rl.policy_lr, float)
    assert cfg.rl.sampling.temperature == 1.0 and isinstance(cfg.rl.sampling.temperature, float)
    assert cfg.schedule.steps == 7 and cfg.rl.clip_high is None
    for override, message in (("train.steps=abc", "train.steps: expected int, got 'abc'"),
                              ("train.steps=2.5", "train.steps: expected int, got 2.5"),
                              ("train.sampling.temperature=hot", "train.sampling.temperature: expected float, got 'hot'"),
                              ("train.scale_by_std=maybe", "train.scale_by_std: expected bool, got 'maybe'"),
                              ("train.policy_lr=null", "train.policy_lr: expected float, got null")):
        with pytest.raises(ConfigError) as err:
            stage_config(TrainConfig, params, "train", [override])
        assert message in str(err.value), str(err.value)
    # the CLI turns it into one line and exit code 2, before anything loads
    result = CliRunner().invoke(app, ["train", "--params", str(params), "--set", "train.steps=abc"])
    assert result.exit_code == 2 and "train.steps: expected int" in result.output


def test_each_process_takes_its_share_of_the_cpu(monkeypatch):
    """OMP_NUM_THREADS (set per process by launchers) wins over the core count; unset, every core
    this process may run on; nonsense falls back to the cores."""
    import os

    from grto_cli.stages.runtime import cpu_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3
    for unset in ("", "0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert cpu_threads() == len(os.sched_getaffinity(0)) >= 1


def test_progress_prints_plain_lines_where_no_terminal_draws_the_bar(monkeypatch):
    """A job's log (DVC, a batch system, `> log`) gets no live bar: it gets a line after the first
    update, then at most one per interval, and one at the end."""
    from grto_cli.stages import console as common

    monkeypatch.setattr(common.console, "_force_terminal", False)
    now = [0.0]
    with common.console.capture() as captured:
        with common.progress_bar("train grpo", 5, log_every=30.0, clock=lambda: now[0]) as advance:
            for t in (1.0, 10.0, 35.0, 40.0, 41.0):  # lines at 1 (first), 35 (30 s later) and 41 (last)
                now[0] = t
                advance(1, info=f"reward {t:.0f}")
    lines = [line for line in captured.get().splitlines() if line.startswith("train grpo ") and "/5," in line]
    assert lines == ["train grpo 1/5, 1 s, reward 1", "train grpo 3/5, 35 s, reward 35", "train grpo 5/5, 41 s, reward 41"]
