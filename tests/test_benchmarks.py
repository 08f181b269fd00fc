"""The benchmarks run end to end. Only exit codes and the shape of their output are checked, never
how long anything took: wall-clock numbers depend on the machine and what else runs on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REAL_SIZE_STEP = ROOT / "benchmarks" / "real_size_step.py"
REAL_PIPELINE_STEP = ROOT / "benchmarks" / "real_pipeline_step.py"
GENERATION_PROFILE = ROOT / "benchmarks" / "generation_profile.py"
VS_TRL = ROOT / "benchmarks" / "vs_trl.py"
PARTS = ("generation", "sam_encode", "sam_decode", "reference", "policy_forward", "policy_backward",
         "policy_optimizer", "tool_step")


def _run(*args: str, timeout: float, script: Path = REAL_SIZE_STEP) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, str(script), *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout[-3000:]
    return json.loads(lines[-1])


def _check_parts(result: dict) -> None:
    assert result["fits"] is True
    assert set(result["parts"]) == set(PARTS)
    for part in PARTS:
        value = result["parts"][part]
        assert isinstance(value, (int, float)) and value >= 0, (part, value)
    assert result["total_s"] >= 0
    assert result["rollouts"] == result["queries"] * result["group_size"]
    assert result["rollouts_per_second"] > 0


@pytest.mark.parametrize("mode, extra", [("lora", ["--gradient-checkpointing"]),
                                         ("full", ["--no-gradient-checkpointing"])])
def test_real_size_step_smoke(mode: str, extra: list[str]) -> None:
    # beta > 0: the reference pass runs too (LoRA: adapters disabled; full: a frozen copy).
    result = _result(_run("--smoke", "--mode", mode, "--beta", "0.04", *extra, timeout=300))
    _check_parts(result)
    assert result["mode"] == mode and result["smoke"] is True
    assert result["skipped"] == []  # grto with beta > 0: every part ran
    assert result["completion_tokens"] == 16  # forced length
    assert result["visual_tokens_per_image"] == 16  # 112 x 112 pixels: (112 / 28)^2
    assert result["params"]["policy_trainable"] > 0 and result["params"]["sam_trainable"] > 0
    if mode == "full":
        assert result["policy_dtype"] == "float32"  # grto refuses AdamW on half-precision weights


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_real_size_step_needs_cuda_without_smoke() -> None:
    proc = _run("--size", "3b", timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--smoke" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_size_step_3b_lora_on_gpu() -> None:
    result = _result(_run("--size", "3b", "--mode", "lora", "--queries", "1", "--group-size", "2", timeout=1200))
    _check_parts(result)
    assert result["visual_tokens_per_image"] == 400 and result["completion_tokens"] == 512
    assert result["params"]["policy"] > 3e9  # the real 3B architecture, not the smoke one
    for part in PARTS:
        if part not in result["skipped"]:
            assert result["peak_gpu_mem_gib"][part] > 0, part
    assert result["peak_gpu_mem_gib_step"] > 0


def test_real_pipeline_step_smoke(tmp_path) -> None:
    """The template's own prepare and train commands run on the checkpoints and raw data the script
    writes, with params.yaml changed only where it says."""
    result = _result(_run("--project", str(tmp_path / "project"), "--smoke", timeout=600, script=REAL_PIPELINE_STEP))
    assert result["ok"] is True and list(result["stages"]) == ["prepare_reasonseg", "train"]
    assert all(stage["returncode"] == 0 for stage in result["stages"].values())
    assert result["params_changed"]["train.steps"] == 1 and result["params_changed"]["train.method"] == "grto"
    assert result["train_step"]["step_seconds"] is not None and result["train_step"]["completion_tokens"] == 8
    assert (tmp_path / "project/models/reasonseg/trained/policy").is_dir()


def test_generation_profile_smoke() -> None:
    result = _result(_run("--smoke", timeout=300, script=GENERATION_PROFILE))
    assert set(result["ms_per_token"]) == {"greedy", "gumbel_generator", "gumbel", "lora_fp32", "lora", "lora_ckpt",
                                           "lora_static"}
    assert all(isinstance(v, float) for v in result["ms_per_token"].values()) and result["rows"] == 4


def test_vs_trl_smoke() -> None:
    """grto train and TRL's GRPOTrainer, each in its own process, on the tiny embedded default."""
    pytest.importorskip("trl")
    result = _result(_run("--smoke", "--threads", "1", timeout=600, script=VS_TRL))
    assert result["benchmark"] == "vs_trl" and result["smoke"] is True and result["device"] == "cpu"
    assert result["queries"] == 2 and result["group_size"] == 2 and result["rollouts_per_step"] == 4
    assert result["max_completion_tokens"] == 8 and result["steps"] == 1 and result["threads"] == 1
    for name in ("grto", "trl"):
        side = result[name]
        assert len(side["step_seconds"]) == 1 and side["seconds_per_step"] > 0, side
        assert side["rollouts_per_second"] > 0 and side["peak_rss_mib"] >= side["setup_rss_mib"] > 0, side
        assert 0 < side["completion_tokens_mean"] <= 8 and side["torch_threads"] == 1, side
    assert result["grto"]["trainable_params"] == result["trl"]["trainable_params"] > 0  # the same weights train
    assert result["trl"]["prompt_ids_match_grto"] is True  # the same prompt tokens
    assert result["trl"]["trl_version"]  # the extra pins 1.16.0
    grto, trl = result["grto"]["seconds_per_rollout"], result["trl"]["seconds_per_rollout"]
    assert result["ratio"] == pytest.approx(trl / grto, rel=0.01)


def test_sampler_cost_smoke() -> None:
    result = _result(_run("--smoke", timeout=300, script=ROOT / "benchmarks" / "sampler_cost.py"))
    assert result["benchmark"] == "sampler_cost" and len(result["results"]) == 1
    row = result["results"][0]
    assert row["rows"] == 4 and row["vocab"] == 1200 and row["generator_ms"] > 0 and row["counter_ms"] > 0


def test_tool_cost_smoke() -> None:
    """ViT-B (and SAM2.1 Hiera-T where the sam2 package is installed) at real size, random weights."""
    result = _result(_run("--smoke", timeout=300, script=ROOT / "benchmarks" / "tool_cost.py"))
    rows = {row["tool"]: row for row in result["rows"]}
    vit_b = rows["vit_b"]
    assert vit_b["cache_mib_per_image"] == 4.0  # fp32 256x64x64
    assert 0 < vit_b["trainable_params_m"] < vit_b["image_encoder_params_m"] < vit_b["params_m"]
    assert vit_b["encode_gflops"] > 100 * vit_b["decode_2_calls_gflops"] / 2 > 0  # encode once, decode per call
    if "sam2.1_hiera_t" in rows:  # three levels: 32x256x256 + 64x128x128 + 256x64x64 fp32
        assert rows["sam2.1_hiera_t"]["cache_mib_per_image"] == 16.0


def test_rl_headroom_smoke(tmp_path, tiny_system, synthetic_data) -> None:
    """Greedy against sampled answers on a few val queries: the counts add up and every share is one."""
    from conftest import TINY_SYSTEM_TEMPLATE

    params = tmp_path / "params.yaml"
    params.write_text(f'policy: {{prompt_template: "{TINY_SYSTEM_TEMPLATE}", coord_convention: absolute}}\n')
    result = _result(_run("--system", str(tiny_system), "--data", str(synthetic_data), "--split", "val",
                          "--limit", "6", "--group-size", "4", "--batch", "4", "--params", str(params),
                          timeout=300, script=ROOT / "benchmarks" / "rl_headroom.py"))
    assert result["queries"] == 6 and result["group_size"] == 4
    assert sum(k["queries"] for k in result["by_kind"].values()) == 6
    assert result["greedy_misses"] == sum(k["greedy_misses"] for k in result["by_kind"].values())
    assert round((1 - result["greedy_point_in_target"]) * 6) == result["greedy_misses"]  # one point per call
    for key in ("greedy_point_in_target", "sampled_point_in_target", "pass_at_g", "greedy_box_iou", "sampled_box_iou"):
        assert 0.0 <= result[key] <= 1.0, key
