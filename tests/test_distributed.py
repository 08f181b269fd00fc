"""N processes compute what one does: `accelerate launch --multi_gpu --num_processes 2` on a machine
without GPUs (torchrun + gloo, accelerate's MULTI_CPU) against a
plain one-process run, for train (weights, resume), evaluate (predictions, metrics) and bootstrap
(rollout cache, tool)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grto_cli.core.curves import read_curve
from grto_cli.core.distributed import Processes

SMALL = ["--set", "train.queries_per_step=4", "--set", "train.sampling.group_size=4",
         "--set", "train.sampling.max_new_tokens=24", "--set", "train.eval_every=2", "--set", "train.eval_limit=6",
         "--set", "train.eval_batch_size=2", "--set", "train.checkpoint_every=2", "--set", "train.micro_batch=4",
         "--set", "train.method=grto", "--set", "train.beta=0.04"]  # beta: the reference pass runs too
# float32: the processes' batches are padded differently, so sums round differently, and AdamW's
# m / sqrt(v) magnifies that where a gradient is near 0. Each part's tolerance is a third of one
# AdamW step at its learning rate (an update moves a weight by at most about lr), so a run that
# loses or repeats one step, or resumes with the wrong optimiser state, fails it.
# Measured policy differences after 3 steps (lr 3e-5, tolerance 1e-5): DDP and FSDP 3.2e-7, ZeRO-3
# 2.9e-7; ZeRO-3 resuming without its float32 master weights 6.0e-5, without AdamW's moments 5.3e-5,
# with AdamW's step count reset 1.7e-5, and with its loss not scaled by N 1.5e-5.


def _tolerances(project: Path) -> dict[str, float]:
    train = yaml.safe_load((project / "params.yaml").read_text())["train"]
    return {"policy": train["policy_lr"] / 3, "tool": train["tool_lr"] / 3}


@pytest.fixture(scope="module")
def project(make_project) -> Path:
    return make_project("dist")


def _grto(project: Path, processes: int, *args: str) -> subprocess.CompletedProcess:
    # CPU processes (gloo) even on a machine with a GPU: one GPU cannot host ranks 0 and 1.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    if processes == 1:
        cmd = [sys.executable, "-m", "grto_cli", *args]
    else:
        # accelerate's --cpu runs one process (or MPI); --multi_gpu on a machine without GPUs is
        # torchrun with gloo: what the CPU test needs.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "grto_cli", *args]
    out = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-20000:]
    return out


def _weights(system: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(system / "policy/model.safetensors"))
    sam = torch.load(system / "tool/sam.pt", map_location="cpu", weights_only=True)
    weights.update({f"tool.{k}": v for k, v in (sam.get("model", sam)).items() if isinstance(v, torch.Tensor)})
    return weights


def _last(checkpoints: Path) -> Path:
    (run,) = [p for p in checkpoints.iterdir() if p.is_dir()]
    return run / "last"


@pytest.fixture(scope="module")
def one_process_run(project) -> Path:
    """A plain one-process run of 3 steps (checkpoints in ck1, curves in live1)."""
    _grto(project, 1, "train", "--set", "train.steps=3", "--set", f"train.checkpoints={project / 'ck1'}",
          "--set", f"train.out={project / 'out1'}", "--set", f"train.live={project / 'live1'}", *SMALL)
    return project / "ck1"


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["none", "fsdp", "zero3"])
def test_two_processes_train_what_one_does_and_resume(project, one_process_run, sharding):
    """DDP (a whole policy per process), FSDP2 and DeepSpeed ZeRO-3 (the full fine-tune's weights,
    gradients and AdamW states sharded over the processes) all train what one process does, and
    resume."""
    two, out, live = project / f"ck2_{sharding}", project / f"out2_{sharding}", project / f"live2_{sharding}"
    # Two processes, stopped after the checkpoint at step 2, then resumed (still two) to step 3.
    common = ["--set", f"train.checkpoints={two}", "--set", f"train.out={out}", "--set", f"train.live={live}",
              "--set", f"train.sharding={sharding}", *SMALL]
    if sharding != "none":  # the real pipelines' memory setting, which leaves the math as it is
        common += ["--set", "train.gradient_checkpointing=true"]
    first = _grto(project, 2, "train", "--set", "train.steps=2", *common)
    said = " ".join((first.stdout + first.stderr).split())  # (the console wraps long lines)
    engine = {"fsdp": "FSDP", "zero3": "ZeRO-3"}.get(sharding)
    assert (f"policy sharded ({engine}: 50% of its weights on this process)" in said) == (engine is not None)
    assert json.loads((_last(two) / "state.json").read_text())["state"]["world_size"] == 2
    _grto(project, 2, "train", "--set", "train.steps=3", *common)
    assert json.loads((out / "train_state.json").read_text())["resumed_from"] == 2
    _assert_same_weights(project, _last(one_process_run), _last(two), steps=3)
    # The AdamW states were saved whole (a sharded run's too): the same as one process's.
    opt_a = torch.load(_last(one_process_run) / "optim.pt", weights_only=True)["policy"]["state"]
    opt_b = torch.load(_last(two) / "optim.pt", weights_only=True)["policy"]["state"]
    exp_avg = lambda states: sorted(float(v["exp_avg"].abs().sum()) for v in states.values())  # noqa: E731
    assert len(opt_a) == len(opt_b) and exp_avg(opt_a) == pytest.approx(exp_avg(opt_b), rel=1e-3, abs=1e-6)
    # Every logged curve agrees step by step: the same rollouts (exactly), and the same losses and
    # gradient norm (to float rounding): a normaliser off by the process count shows in grad_norm,
    # which AdamW's scale invariance would hide from the weights.
    # (perf/: wall clock and memory, which no two runs share)
    live1 = project / "live1"
    curves = sorted(c for c in (live1 / "plots/metrics").rglob("*.tsv") if c.parent.name != "perf")
    assert len(curves) > 10
    for one_curve in curves:
        two_curve = live / one_curve.relative_to(live1)
        x, y = _curve(one_curve), _curve(two_curve)
        assert x.keys() == y.keys() == {1, 2, 3} or x.keys() == y.keys() == {0, 2, 3}, one_curve
        for step in x:
            assert x[step] == pytest.approx(y[step], rel=1e-3, abs=1e-6), (one_curve.name, step, x[step], y[step])
        if one_curve.parent.name == "rollout":
            assert x == y, one_curve  # the very same completions and calls
    # One set of curves and one output, written by the main process.
    assert (out / "policy").is_dir() and live.is_dir()
    if sharding != "none":
        # Another process count and no sharding: one process takes the sharded run's checkpoint
        # (whole states) from step 3 to 4, as it takes its own one-process checkpoint.
        _continue_on_one_process(project, two, sharding)
        _assert_same_weights(project, _last(one_process_continued(project, one_process_run)),
                             _last(project / f"ck4_{sharding}"), steps=4)


def _continue_on_one_process(project: Path, run: Path, name: str) -> Path:
    """A copy of checkpoints ``run`` taken from step 3 to 4 by one process (ck4_<name>)."""
    shutil.copytree(run, project / f"ck4_{name}")
    _grto(project, 1, "train", "--set", "train.steps=4", "--set", f"train.checkpoints={project / f'ck4_{name}'}",
          "--set", f"train.out={project / f'out4_{name}'}", "--set", f"train.live={project / f'live4_{name}'}", *SMALL)
    assert json.loads((project / f"out4_{name}/train_state.json").read_text())["resumed_from"] == 3
    return project / f"ck4_{name}"


def one_process_continued(project: Path, one_process_run: Path) -> Path:
    """The one-process run taken from step 3 to 4, once for every sharded case that compares with it."""
    done = project / "ck4_one"
    return done if done.is_dir() else _continue_on_one_process(project, one_process_run, "one")


def _assert_same_weights(project: Path, one: Path, other: Path, steps: int) -> None:
    """Policy and tool weights of two systems equal to each part's tolerance, after ``steps`` steps
    that really moved them."""
    a, b, base = _weights(one), _weights(other), _weights(project / "models/base")
    assert a.keys() == b.keys() == base.keys()
    for part, tolerance in _tolerances(project).items():
        keys = [k for k in a if k.startswith("tool.") == (part == "tool")]
        moved = max((a[k] - base[k]).abs().max().item() for k in keys)
        assert moved > steps * tolerance, (part, moved)  # the runs really trained (over lr / 3 a step)
        diff = max((a[k] - b[k]).abs().max().item() for k in keys)
        assert diff < tolerance, f"{other}: {part} weights differ from {one}'s by {diff}"


def _curve(path: Path) -> dict[int, float]:
    return dict(read_curve(path))


@pytest.mark.slow
def test_two_processes_evaluate_and_bootstrap_what_one_does(project):
    for n in (1, 2):
        _grto(project, n, "evaluate", "--set", "evaluate.split=val", "--set", "evaluate.batch_size=3",
              "--set", f"evaluate.out={project / f'eval{n}/metrics.json'}")
        _grto(project, n, "bootstrap", "--set", "bootstrap.max_queries=10", "--set", "bootstrap.rollouts_per_query=4",
              "--set", "bootstrap.generation_batch=3", "--set", "bootstrap.steps=3", "--set", "bootstrap.batch_size=2",
              "--set", f"bootstrap.cache={project / f'cache{n}.jsonl'}", "--set", f"bootstrap.out={project / f'boot{n}'}",
              "--set", f"bootstrap.live={project / f'bootlive{n}'}")
    assert (project / "eval1/predictions.jsonl").read_text() == (project / "eval2/predictions.jsonl").read_text()
    assert json.loads((project / "eval1/metrics.json").read_text()) == json.loads((project / "eval2/metrics.json").read_text())
    assert (project / "cache1.jsonl").read_text() == (project / "cache2.jsonl").read_text()
    t1 = torch.load(project / "boot1/tool/sam.pt", weights_only=True)
    t2 = torch.load(project / "boot2/tool/sam.pt", weights_only=True)
    flat1 = {k: v for k, v in t1.get("model", t1).items() if isinstance(v, torch.Tensor)}
    flat2 = {k: v for k, v in t2.get("model", t2).items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(flat1[k], flat2[k]) for k in flat1)


class _SecondOfTwo(Processes):
    """Rank 1 of 2 without a process group: collectives are the identity."""

    def __init__(self):
        super().__init__()
        self.rank, self.world_size = 1, 2

    def sum(self, value):
        return value

    def gather(self, items):
        return list(items)

    def barrier(self):
        pass

    def wrap(self, module):
        return module


def test_only_the_main_process_writes_checkpoints(tiny_system, synthetic_data, tmp_path):
    from grto_cli.core.data.records import read_manifest
    from grto_cli.core.checkpoint import load_system, system_paths
    from grto_cli.core.trainer import RLConfig, Trainer

    records, _ = read_manifest(synthetic_data / "train.jsonl")
    policy, tool = load_system(system_paths(str(tiny_system), None, None, None), "Locate: {query}.")
    trainer = Trainer(RLConfig(method="grto", queries_per_step=2), policy, tool, records, records[:2], synthetic_data,
                      processes=_SecondOfTwo())
    trainer.save_checkpoint(tmp_path / "last")
    assert not (tmp_path / "last").exists()
    trainer.processes = Processes()
    trainer.save_checkpoint(tmp_path / "last")
    assert (tmp_path / "last/state.json").is_file()


def test_shipped_accelerate_configs_load_and_are_supported():
    from accelerate.commands.config.config_args import load_config_from_file

    from grto_cli.core.distributed import check_supported

    folder = Path(__file__).resolve().parents[1] / "grto_cli/configs/accelerate"
    configs = sorted(folder.glob("*.yaml"))
    assert {p.stem for p in configs} == {"one_gpu", "ddp"}
    for path in configs:
        cfg = load_config_from_file(str(path))
        assert str(cfg.mixed_precision) == "no", path
        if cfg.num_processes > 1:
            check_supported(str(cfg.distributed_type), str(cfg.mixed_precision))


def test_unsupported_engines_and_accelerate_mixed_precision_are_refused():
    from grto_cli.core.distributed import check_supported

    for engine in ("DistributedType.FSDP", "DistributedType.DEEPSPEED"):
        with pytest.raises(ValueError, match="train.sharding: fsdp or zero3"):
            check_supported(engine, "no")
    with pytest.raises(ValueError, match="mixed_precision no"):
        check_supported("DistributedType.MULTI_GPU", "bf16")


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    second = _SecondOfTwo()
    assert second.block(8) == slice(4, 8)
    with pytest.raises(ValueError, match="multiple of 2"):
        second.block(7, "queries per step (train.queries_per_step)")
    assert list(Processes().in_order(3, lambda i: i * 10)) == [0, 10, 20]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_gpu_accelerate_launch_trains_on_cuda_as_plain_grto_does(project):
    """The shipped one_gpu.yaml on a GPU: the same run as a plain `grto train` there (the same
    rollouts; losses to rounding), on CUDA (a peak GPU memory is logged), with its checkpoint."""
    config = Path(__file__).resolve().parents[1] / "grto_cli/configs/accelerate/one_gpu.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    runs = {}
    for name, launcher in (("plain", [sys.executable, "-m", "grto_cli"]),
                           ("accelerate", [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                           str(config), "-m", "grto_cli"])):
        out = subprocess.run([*launcher, "train", "--set", "train.steps=2", *SMALL,
                              "--set", f"train.checkpoints={project / ('gpu_ck_' + name)}",
                              "--set", f"train.out={project / ('gpu_out_' + name)}",
                              "--set", f"train.live={project / ('gpu_live_' + name)}"],
                             cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        runs[name] = project / f"gpu_live_{name}/plots/metrics"
    for run in runs.values():
        peak = _curve(run / "perf/peak_gpu_mem_gib.tsv")
        assert peak.keys() == {1, 2} and min(peak.values()) > 0  # the steps ran on the GPU
    # Step 1 samples from the same weights with the same keys; later steps start from weights that
    # CUDA's non-deterministic kernels (attention's backward) may have moved by a rounding error.
    for curve in sorted((runs["plain"] / "rollout").glob("*.tsv")):
        assert _curve(curve)[1] == _curve(runs["accelerate"] / "rollout" / curve.name)[1], curve.name
    loss = _curve(runs["plain"] / "loss/total.tsv")[1]
    assert loss == pytest.approx(_curve(runs["accelerate"] / "loss/total.tsv")[1], rel=1e-3, abs=1e-6)
    assert (_last(project / "gpu_ck_accelerate") / "state.json").is_file()
