"""Stages 3: bootstrap -> train (killed and resumed) -> evaluate -> export -> predict, via the CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from grto_cli.cli import app
from grto_cli.core.data.masks import decode_rle

TRAIN_SMALL = ["--set", "train.queries_per_step=2", "--set", "train.sampling.group_size=4",
               "--set", "train.sampling.max_new_tokens=32", "--set", "train.eval_every=2", "--set", "train.eval_limit=2",
               "--set", "train.checkpoint_every=1", "--set", "train.micro_batch=4"]


@pytest.fixture(scope="module")
def project(make_project) -> Path:
    """A project directory laid out as `dvc repro` leaves it after prepare + pretrain."""
    return make_project("project")


def _cli(args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args, catch_exceptions=False)
    finally:
        os.chdir(old)


def test_bootstrap_writes_cache_and_tool(project):
    r = _cli(["bootstrap", "--set", "bootstrap.max_queries=6", "--set", "bootstrap.rollouts_per_query=4",
              "--set", "bootstrap.steps=2", "--set", "bootstrap.batch_size=2"], project)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (project / "rollouts/bootstrap.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(row["calls"]) == 4 and len(row["rewards"]) == 4 for row in rows)
    assert (project / "models/bootstrap/tool/sam.pt").is_file()


def _train(project, *args, background=False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "grto_cli.cli", "train", *args, *TRAIN_SMALL]
    if background:
        return subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)


def _curve(live: Path, name: str) -> list[tuple[int, str]]:
    rows = (live / f"plots/metrics/{name}.tsv").read_text().splitlines()[1:]
    return [(int(r.split("\t")[0]), r.split("\t")[-1]) for r in rows]


def _latest_run(project) -> Path:
    return project / "checkpoints/train" / (project / "checkpoints/train/latest").read_text().strip()


def test_killed_run_resumes_after_another_configuration_ran(project):
    """b-grto is killed after a checkpoint; a grpo run with the default paths comes and goes; the
    b-grto run started again resumes from its own checkpoint, and nothing of either is deleted."""
    proc = _train(project, "--steps", "6", background=True)
    try:
        deadline = time.monotonic() + 600
        state = None
        while time.monotonic() < deadline and proc.poll() is None:
            if (project / "checkpoints/train/latest").is_file():
                state = _latest_run(project) / "last/state.json"
                if state.is_file() and json.loads(state.read_text())["state"]["step"] >= 2:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "train finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    bgrto = state.parent.parent
    killed_at = json.loads(state.read_text())["state"]["step"]
    assert 2 <= killed_at < 6
    assert not (project / "models/trained").exists()
    before_kill = _curve(bgrto / "live", "rollout/reward_mean")

    other = _train(project, "--method", "grpo", "--steps", "2", "--out", "models/grpo")
    assert other.returncode == 0, other.stderr[-2000:]
    grpo = _latest_run(project)
    assert grpo != bgrto and (grpo / "last/state.json").is_file()
    assert json.loads(state.read_text())["state"]["step"] == killed_at  # the b-grto run is untouched

    done = _train(project, "--steps", "6")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr and bgrto.name in done.stderr
    final = json.loads((project / "models/trained/train_state.json").read_text())
    assert final["step"] == 6 and final["resumed_from"] == killed_at
    assert (grpo / "last/state.json").is_file()  # the grpo run is untouched too
    # Val ran (eval_every 2 on 2 val records) and the output is the best-on-val system, not the last.
    best, last = bgrto / "best", bgrto / "last"
    out_sam = (project / "models/trained/tool/sam.pt").read_bytes()
    assert out_sam == (best / "tool/sam.pt").read_bytes()
    if final["best_step"] != final["step"]:
        assert out_sam != (last / "tool/sam.pt").read_bytes()
    losses = [float(line.split("\t")[-1]) for line in
              (project / "results/train/plots/metrics/loss/policy.tsv").read_text().splitlines()[1:]]
    assert losses and np.isfinite(losses).all()
    # The published curves are this run's alone: one row per step (what the killed process logged
    # past its last checkpoint was dropped and logged again), its own rows before the kill, and
    # nothing of the grpo run that came in between.
    published = _curve(project / "results/train", "rollout/reward_mean")
    assert published == _curve(bgrto / "live", "rollout/reward_mean")
    assert [step for step, _ in published] == [1, 2, 3, 4, 5, 6]
    assert published[:killed_at] == before_kill[:killed_at]
    # grpo logs no tool loss: had its fresh run taken over the curves, b-grto's would start at the kill.
    assert [step for step, _ in _curve(project / "results/train", "tool/loss")] == [1, 2, 3, 4, 5, 6]
    assert not (grpo / "live/plots/metrics/tool/loss.tsv").exists()


def test_same_configuration_with_other_output_paths_resumes(project):
    """Where outputs go is not part of what defines a run: a finished run asked for again with
    another --out resumes at its last step (nothing to train) and writes the same system there."""
    r = _train(project, "--steps", "6", "--out", "other/trained", "--set", "train.last_out=other/last")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr
    state = json.loads((project / "other/trained/train_state.json").read_text())
    assert state["step"] == 6 and state["resumed_from"] == 6
    assert (project / "other/trained/tool/sam.pt").read_bytes() == \
        (project / "models/trained/tool/sam.pt").read_bytes()
    # train.last_out: the last step's system beside the best-on-val one (the study evaluates both)
    run = _latest_run(project)
    for part in ("tool/sam.pt", "policy/model.safetensors"):
        assert (project / "other/last" / part).read_bytes() == (run / "last" / part).read_bytes()


def test_fresh_moves_the_old_run_aside(project):
    run = _latest_run(project)
    r = _train(project, "--method", "grpo", "--steps", "2", "--out", "models/grpo", "--fresh")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" not in r.stderr
    moved = [p for p in run.parent.iterdir() if p.name.startswith(_latest_run(project).name + ".moved-")]
    assert moved and (moved[0] / "last/state.json").is_file()


def test_predict_on_exported_bundle_reproduces_evaluate(project):
    # evaluate and export the trained system (from the previous test) ...
    r = _cli(["evaluate", "--split", "testA", "--checkpoint", "models/trained", "--out", "res/testA/metrics.json",
              "--set", "evaluate.batch_size=1"], project)
    assert r.exit_code == 0, r.output
    r = _cli(["export", "--checkpoint", "models/trained", "--out", "bundles/grto"], project)
    assert r.exit_code == 0, r.output
    spec = (project / "bundles/grto/grto.yaml").read_text()
    assert "prompt_template" in spec and "coord_convention" in spec and "checkpoint_sha256" in spec
    # ... then predict each sample from the bundle alone and compare masks pixel for pixel.
    rows = [json.loads(line) for line in (project / "res/testA/predictions.jsonl").read_text().splitlines()]
    manifest = {json.loads(line)["id"]: json.loads(line)
                for line in (project / "data/prepared/synthetic/testA.jsonl").read_text().splitlines()}
    bundle = project / "bundles/grto"
    shutil.move(str(project / "models/trained"), str(project / "models/trained.moved"))  # the bundle stands alone
    for row in rows[:3]:
        image = project / "data/prepared/synthetic" / manifest[row["id"]]["image"]
        out = project / f"pred/{row['id']}.png"
        r = _cli(["predict", "--bundle", str(bundle), "--image", str(image), "--query", row["query"],
                  "--out", str(out)], project)
        assert r.exit_code == 0, r.output
        predicted = np.asarray(Image.open(out)) > 127
        assert np.array_equal(predicted, decode_rle(row["mask"])), row["id"]
        assert out.with_name(out.stem + ".overlay.png").is_file()


def test_a_refused_configuration_is_one_clear_error(project):
    """Full fine-tuning of bfloat16 weights is refused by the trainer: the command says why and
    what to do, in one line with exit code 2, not a traceback."""
    r = _cli(["train", "--method", "grpo", "--set", "policy.dtype=bfloat16", "--set", "train.steps=1",
              "--out", "models/refused", *TRAIN_SMALL], project)
    said = " ".join(r.output.split())  # the console wraps long lines
    assert r.exit_code == 2, r.output
    assert "bfloat16" in said and "policy.dtype: float32" in said and "Traceback" not in said
    assert not (project / "models/refused").exists()


def test_auto_dtype_trains_float32_weights_in_a_full_fine_tune():
    """`policy.dtype: auto` is bf16 on CUDA, which the trainer refuses for a full fine-tune (the
    embedded default's `train.lora: null` failed so on an H200): train resolves auto to float32 there,
    keeps auto with LoRA, and leaves an explicit dtype to the trainer's check."""
    import grto_cli.stages.train as train_stage
    from grto_cli.core.trainer import LoraParams, RLConfig
    from grto_cli.stages.sections import PolicyParams

    full, lora = RLConfig(lora=None), RLConfig(lora=LoraParams())
    assert train_stage.training_policy_params(PolicyParams(dtype="auto", device="cuda"), full).dtype == "float32"
    assert train_stage.training_policy_params(PolicyParams(dtype="auto", device="cuda"), lora).dtype == "auto"
    assert train_stage.training_policy_params(PolicyParams(dtype="bfloat16"), full).dtype == "bfloat16"
