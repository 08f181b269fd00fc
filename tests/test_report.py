"""`grto report`: the study's numbers come from each run's files, and are the right numbers.

The study tree is built here in the layout the study pipeline writes (metrics.json per split,
dvclive curve files, train and bootstrap run records); nothing trains.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from PIL import Image

import numpy as np

from grto_cli.core import report
from grto_cli.core.data.records import record_from_mask, write_manifest
from grto_cli.stages import report as stage
from grto_cli.stages.params import ConfigError

METHODS = ["grpo", "grto", "b-grto"]
SEEDS = [0, 1]
# (method, seed) -> testA gIoU; b-grto best, grpo worst, with some seed spread
GIOU = {("grpo", 0): 20.0, ("grpo", 1): 22.0, ("grto", 0): 24.0, ("grto", 1): 27.0,
        ("b-grto", 0): 30.0, ("b-grto", 1): 31.0}
BOOTSTRAP_ROLLOUTS = 8000
B, G, STEPS = 8, 8, 40


def _curve(path: Path, name: str, rows: list[tuple[int, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"step\t{name}\n" + "".join(f"{s}\t{v}\n" for s, v in rows))


def make_study(root: Path, skip: tuple[str, int] | None = None) -> dict:
    cfg = {"methods": METHODS, "seeds": SEEDS, "splits": ["testA", "testB"], "target_val_giou": 25.0,
           "runs": str(root / "results/study"), "models": str(root / "models/study"),
           "base": str(root / "results/base"), "out": str(root / "reports/synthetic.md"),
           "plots": str(root / "reports/plots"), "data": str(root / "data")}
    # train targets whose median box is (2, 2, 6, 6); testA: one target there, one elsewhere
    def rec(split, i, y1, x1, y2, x2):
        mask = np.zeros((8, 8), bool)
        mask[y1:y2, x1:x2] = True
        return record_from_mask(f"{split}-{i}", "img.png", "q", mask, "synthetic", split)
    write_manifest(root / "data/train.jsonl", [rec("train", 0, 0, 0, 4, 4), rec("train", 1, 2, 2, 6, 6),
                                               rec("train", 2, 4, 4, 8, 8)])
    for split in ("testA", "testB"):
        write_manifest(root / f"data/{split}.jsonl", [rec(split, 0, 2, 2, 6, 6), rec(split, 1, 0, 6, 2, 8)])
    for split in ("testA", "testB"):
        (root / "results/base" / split).mkdir(parents=True)
        (root / "results/base" / split / "metrics.json").write_text(json.dumps(
            {"giou": 15.0, "ciou": 14.0, "call_box_iou": 0.4, "point_in_target": 0.5, "prompt_adherence": 0.8,
             "distinct_calls": 250}))
    for seed in SEEDS:
        boot = root / "models/study/bootstrap" / f"s{seed}"
        boot.mkdir(parents=True)
        (boot / "run.json").write_text(json.dumps({"results": {
            "rollouts": BOOTSTRAP_ROLLOUTS, "sampling_seconds": 30.0 + 2 * seed, "tool_seconds": 20.0}}))
    for method in METHODS:
        for seed in SEEDS:
            if (method, seed) == skip:
                continue
            g = GIOU[method, seed]
            run = root / "results/study" / method / f"s{seed}"
            for split, offset in (("testA", 0.0), ("testB", -2.0)):
                kinds = {"attribute": {"n": 3, "call_box_iou": g / 100, "point_in_target": 0.5},
                         "superlative": {"n": 2, "call_box_iou": 0.1 + seed, "point_in_target": 0.25}}
                for where, lower in ((run / split, 0.0), (run / "last" / split, 1.0)):  # last: 1 gIoU lower
                    where.mkdir(parents=True)
                    (where / "metrics.json").write_text(json.dumps(
                        {"giou": g + offset - lower, "ciou": g - 1, "call_box_iou": g / 50 - lower / 100,
                         "point_in_target": g / 40, "prompt_adherence": 0.9, "distinct_calls": 200 + seed,
                         "call_box_area_ratio": 1.1, "by_query_kind": kinds}))
            # val gIoU climbs linearly to the run's test gIoU; reward likewise
            _curve(run / "train/plots/metrics/val/giou.tsv", "giou",
                   [(s, 15.0 + (g - 15.0) * s / STEPS) for s in range(0, STEPS + 1, 10)])
            _curve(run / "train/plots/metrics/rollout/reward_mean.tsv", "reward_mean",
                   [(s, 0.5 + g / 100 * s / STEPS) for s in range(1, STEPS + 1)])
            system = root / "models/study" / method / f"s{seed}"
            system.mkdir(parents=True)
            (system / "run.json").write_text(json.dumps({
                "params": {"train": {"rl": {"queries_per_step": B, "sampling": {"group_size": G}}}},
                "results": {"step": STEPS, "best_step": STEPS, "best_val_giou": g, "seconds": 100.0 + seed}}))
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"study": cfg}))
    return cfg


def test_report_tables_hold_mean_and_std_over_seeds(tmp_path):
    cfg = make_study(tmp_path)
    stage.run(str(tmp_path / "params.yaml"))
    text = Path(cfg["out"]).read_text()
    testa = text.split("## testA")[1].split("##")[0]
    for method in METHODS:
        values = [GIOU[method, s] for s in SEEDS]
        cell = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        row = next(line for line in testa.splitlines() if line.startswith(f"| {method} |"))
        assert row.split(" | ")[2] == cell, row  # gIoU column, mean ± sample std
    assert "| base (no RL) | - | 15.00 |" in testa
    constant = next(line for line in testa.splitlines() if line.startswith("| same box for every query |"))
    assert constant.split(" | ")[4:6] == ["0.500", "0.500"]  # box IoU 1 and 0, point inside and not
    testb = text.split("## testB")[1].split("##")[0]
    row = next(line for line in testb.splitlines() if line.startswith("| grpo |"))
    assert row.split(" | ")[2] == "19.00 ± 1.41"  # testB is 2 below testA in the fixture
    # the ordering is stated, with the gaps
    assert "testA: the ordering **holds**" in text
    assert "b-grto − grto = +5.00" in text


def test_report_states_the_policys_gain_over_the_base_and_marks_only_real_gains(tmp_path):
    """Trained minus base, mean ± std over seeds, bold only where at least 0.03 and more than twice
    the seed std; the last step's systems get rows of their own; by query kind per split."""
    cfg = make_study(tmp_path)
    stage.run(str(tmp_path / "params.yaml"))
    text = Path(cfg["out"]).read_text()
    gains = text.split("## Does RL improve the policy over the base?")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in gains.splitlines() if line.startswith("| ")}
    # testA box IoU: base 0.4; grpo 20/50, 22/50 -> +0.000, +0.040: mean +0.020, std 0.028 (not a gain);
    # b-grto 30/50, 31/50 -> +0.200, +0.220: +0.210 ± 0.014 (a gain)
    assert rows["grpo"][0] == "+0.020 ± 0.028"
    assert rows["b-grto"][0] == "**+0.210 ± 0.014**"
    assert rows["b-grto (last)"][0] == "**+0.200 ± 0.014**"  # the last systems are 0.01 lower
    # point in target: base 0.5; grpo 0.5, 0.55 -> +0.025 ± 0.035, not a gain
    assert rows["grpo"][1] == "+0.025 ± 0.035"
    testa = text.split("## testA")[1].split("##")[0]
    assert any(line.startswith("| b-grto (last) | 2 | 29.50 ± 0.71 |") for line in testa.splitlines())
    assert "box area ratio" in testa
    kinds = text.split("### testA")[1].split("###")[0]
    assert "attribute (n=3)" in kinds and "superlative (n=2)" in kinds
    row = next(line for line in kinds.splitlines() if line.startswith("| grto |"))
    assert row.split(" | ")[1] == "0.255 / 0.500"  # (24 + 27) / 2 / 100


def test_report_counts_the_bootstrap_in_cost_and_in_the_rollout_axis(tmp_path):
    cfg = make_study(tmp_path)
    stage.run(str(tmp_path / "params.yaml"))
    text = Path(cfg["out"]).read_text()
    cost = text.split("## Cost")[1]
    rl = STEPS * B * G
    row = {m: next(line for line in cost.splitlines() if line.startswith(f"| {m} |")) for m in METHODS}
    assert f"| b-grto | {rl} ± 0 | {BOOTSTRAP_ROLLOUTS} ± 0 | {rl + BOOTSTRAP_ROLLOUTS} ± 0 |" in row["b-grto"]
    assert f"| grpo | {rl} ± 0 | 0 ± 0 | {rl} ± 0 |" in row["grpo"]
    assert "| 51 ± 1 |" in row["b-grto"] and row["grpo"].split(" | ")[5] == "0"  # bootstrap wall s: 50 and 52
    # steps to reach val gIoU >= 25: grpo never (max 22), grto only seed 1 (27 at 40: 25 reached at step 40),
    # b-grto: 15 + 15*s/40 >= 25 -> s >= 26.7 -> 30 (seed 0); 15 + 16*s/40 >= 25 -> s >= 25 -> 30 (seed 1)
    assert "never (0/2 seeds)" in row["grpo"]
    assert "40 ± 0 (1/2 seeds)" in row["grto"]
    assert "30 ± 0 (2/2 seeds)" in row["b-grto"]
    runs = [stage.read_run(stage.build_study(tmp_path / "params.yaml"), m, s) for m in METHODS for s in SEEDS]
    b = next(r for r in runs if r.method == "b-grto")
    shifted = report.against_rollouts(b.curves["val/giou"], b.rollouts_per_step, b.bootstrap_rollouts)
    assert shifted[0][0] == BOOTSTRAP_ROLLOUTS and shifted[1][0] == BOOTSTRAP_ROLLOUTS + 10 * B * G


def test_report_draws_the_four_charts(tmp_path):
    cfg = make_study(tmp_path)
    stage.run(str(tmp_path / "params.yaml"))
    text = Path(cfg["out"]).read_text()
    for name in ("val_giou_vs_step", "val_giou_vs_rollouts", "reward_vs_step", "reward_vs_rollouts"):
        png = Path(cfg["plots"]) / f"{name}.png"
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 300
        assert f"(plots/{name}.png)" in text


def test_ordering_that_fails_is_reported_as_failing(tmp_path):
    cfg = make_study(tmp_path)
    bad = Path(cfg["runs"]) / "grpo" / "s0" / "testA" / "metrics.json"
    m = json.loads(bad.read_text())
    m["giou"] = 99.0  # grpo now best on testA
    bad.write_text(json.dumps(m))
    stage.run(str(tmp_path / "params.yaml"))
    text = Path(cfg["out"]).read_text()
    assert "testA: the ordering **does not hold**" in text
    assert "testB: the ordering **holds**" in text


def test_a_missing_run_is_an_error_naming_its_file(tmp_path):
    make_study(tmp_path, skip=("grto", 1))
    with pytest.raises(ConfigError, match=r"grto/s1/testA/metrics\.json.*grto seed 1"):
        stage.run(str(tmp_path / "params.yaml"))


def test_unknown_method_is_refused_before_reading(tmp_path):
    make_study(tmp_path)
    with pytest.raises(ConfigError, match="expected one of"):
        stage.run(str(tmp_path / "params.yaml"), ["study.methods=[grpo, ppo]"])
