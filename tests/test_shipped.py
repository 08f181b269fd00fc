"""The base shipped with grto (core/shipped.py) is what today's `pretrain` params would build, and
`grto pretrain` copies it only then."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from dataclasses import asdict

import pytest
from typer.testing import CliRunner

from grto_cli.cli import app
from grto_cli.core.checkpoint import load_system, system_paths
from grto_cli.core.shipped import SHIPPED_BASE, mismatches, shipped_record
from grto_cli.stages.params import Params
from grto_cli.stages.pretrain import PretrainConfig
from grto_cli.stages.sections import PolicyParams

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The embedded default's data as `dvc repro` prepares it, from the repository's params.yaml."""
    project = tmp_path_factory.mktemp("shipped")
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    old = os.getcwd()
    os.chdir(project)
    try:
        r = CliRunner().invoke(app, ["prepare", "synthetic"], catch_exceptions=False)
    finally:
        os.chdir(old)
    assert r.exit_code == 0, r.output
    return project


def test_the_shipped_base_is_what_todays_pretrain_params_train(prepared):
    read = Params(ROOT / "params.yaml")
    pretrain, policy_params = read.section(PretrainConfig, "pretrain"), read.section(PolicyParams, "policy")
    record = shipped_record()
    assert record is not None and record["stage"] == "pretrain"
    why = mismatches(record, asdict(pretrain), asdict(policy_params), prepared / "data/prepared/synthetic/train.jsonl")
    assert why == [], "params.yaml no longer builds the shipped base: rebuild it with `grto pretrain " \
                      "--set pretrain.shipped=false` and copy models/base (and results/pretrain as live/) into " \
                      f"grto_cli/assets/base: {why}"
    assert pretrain.shipped is True
    policy, tool = load_system(system_paths(SHIPPED_BASE), policy_params.prompt_template)  # loads as any base
    assert sum(p.numel() for p in policy.model.parameters()) == record["results"]["policy_parameters"]


def run_bounded(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` whose time limit kills the command's whole process group: a pretrain that
    trains instead of copying starts SAM's warm-up in a child process, which must not outlive the test."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_pretrain_copies_the_shipped_base_only_when_it_matches(prepared):
    def pretrain(*sets):
        old = os.getcwd()
        os.chdir(prepared)
        try:
            return CliRunner().invoke(app, ["pretrain", *sets], catch_exceptions=False)
        finally:
            os.chdir(old)

    # In a subprocess with a time limit: a copy takes seconds, a stage that trained instead would
    # take the 33 minutes of the real warm-up.
    copied = run_bounded([sys.executable, "-m", "grto_cli.cli", "pretrain", "--set", "pretrain.out=models/copied",
                          "--set", "pretrain.live=live/copied"], prepared, timeout=180)
    assert copied.returncode == 0, copied.stderr[-2000:]
    for f in ("policy/model.safetensors", "tool/sam.pt", "run.json"):
        assert (prepared / "models/copied" / f).read_bytes() == (SHIPPED_BASE / f).read_bytes()
    assert (prepared / "live/copied/policy/plots/metrics/sft/loss.tsv").is_file()  # the stage's plots exist
    # Another config is trained, not copied (a tiny one, so this stays quick); the reason is said.
    r = pretrain("--set", "pretrain.out=models/trained", "--set", "pretrain.live=live/trained",
                 "--set", "pretrain.sft.steps=2", "--set", "pretrain.sam.steps=2", "--set", "pretrain.parallel=false")
    assert r.exit_code == 0, r.output
    assert "training from scratch" in r.output and "pretrain.sft" in r.output
    assert (prepared / "models/trained/policy/model.safetensors").read_bytes() != \
        (SHIPPED_BASE / "policy/model.safetensors").read_bytes()
    assert json.loads((prepared / "models/trained/run.json").read_text())["params"]["pretrain"]["sft"]["steps"] == 2
