"""`grto train --method grpo|grto|b-grto`: RL of policy (and tool), checkpointed and resumable.

Each configuration gets its own checkpoint directory, ``<checkpoints>/<run id>``, where the id is a
hash of what defines the run (algorithm config, policy settings, content hashes of data and initial
models) and nothing about where outputs go. A killed run started again resumes from its own
directory; a run of another configuration never touches it; ``--fresh`` moves it aside.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from grto_cli.core.checkpoint import TOOL_DIR, RunDir, copy_system, input_fingerprint, system_paths
from grto_cli.core.data.records import DataError, read_manifest
from grto_cli.core.io import atomic_dir, write_json
from grto_cli.core.metrics import ROLLOUT_IOU, ROLLOUT_REWARD_MEAN
from grto_cli.core.trainer import MemoryParams, RLConfig, Schedule, Trainer
from grto_cli.stages.console import console, progress_bar, summary_table
from grto_cli.stages.params import FLAT, ConfigError, Params
from grto_cli.stages.record import write_run_record
from grto_cli.stages.runtime import join_processes, pick_device, pick_dtype, quiet_transformers, set_threads
from grto_cli.stages.sections import PolicyParams, ToolParams, training_records
from grto_cli.stages.live import NoLogger, StepLogger
from grto_cli.stages.system import load_stage_system


@dataclass
class TrainConfig:
    rl: RLConfig = field(default_factory=RLConfig, metadata=FLAT)  # what defines the run
    schedule: Schedule = field(default_factory=Schedule, metadata=FLAT)  # how long, how often
    memory: MemoryParams = field(default_factory=MemoryParams, metadata=FLAT)  # memory for compute, same math
    # where things come from and go to
    data: str = "data/prepared/synthetic"
    base: str | None = "models/base"  # initial system: policy/ + tool/
    bootstrap: str = "models/bootstrap"  # b-grto starts from <bootstrap>/tool
    policy: str | None = None  # explicit initial policy (path or hub id), overrides <base>/policy
    tool: str | None = None  # explicit initial tool file/dir, overrides <base>/tool (grpo, grto)
    tool_arch: str | None = None  # Meta's bare files: vit_b|vit_l|vit_h (SAM), sam2{,.1}_hiera_{t,s,b+,l} (SAM2)
    out: str = "models/trained"  # the best-on-val system
    last_out: str | None = None  # also the last step's system here (the study evaluates both); null: not written
    checkpoints: str = "checkpoints/train"  # <run id>/last (resume) and <run id>/best
    live: str = "results/train"

    def validate(self) -> None:
        self.rl.validate()
        self.memory.validate()


def _initial_tool(cfg: TrainConfig) -> str | None:
    if cfg.rl.method != "b-grto":
        return cfg.tool
    path = Path(cfg.bootstrap) / TOOL_DIR
    if not path.is_dir():
        raise DataError(f"b-grto starts from the bootstrapped tool, but {path} does not exist: "
                        f"run `grto bootstrap` first (or `dvc repro`)")
    return str(path)


def training_policy_params(pol: PolicyParams, rl) -> PolicyParams:
    """``policy.dtype: auto`` for training: a full fine-tune (``train.lora: null``) trains float32
    weights on any device (the trainer refuses AdamW on bf16 weights, whose small updates round
    away); LoRA keeps auto's choice (bf16 base on CUDA, float32 adapters).

    >>> from grto_cli.core.trainer import LoraParams, RLConfig
    >>> training_policy_params(PolicyParams(dtype="auto", device="cuda"), RLConfig(lora=None)).dtype
    'float32'
    >>> training_policy_params(PolicyParams(dtype="auto", device="cuda"), RLConfig(lora=LoraParams())).dtype
    'auto'
    """
    if pol.dtype == "auto" and rl.lora is None:
        return replace(pol, dtype="float32")
    return pol


def resume_key(cfg: TrainConfig, pol: PolicyParams, inputs: dict[str, str | Path | None]) -> dict:
    """What must match for a checkpoint to be resumed: the algorithm, the policy settings that
    change what is trained, and the contents of every input. Never output paths or cadences."""
    return {"algorithm": asdict(cfg.rl),
            "policy": {"prompt_template": pol.prompt_template, "require_think": pol.require_think,
                       "coord_convention": pol.coord_convention, "min_pixels": pol.min_pixels,
                       "max_pixels": pol.max_pixels,
                       "dtype": pick_dtype(pol.dtype, pick_device(pol.device))},  # (run() resolves auto first)
            "inputs": {name: input_fingerprint(p) for name, p in inputs.items()}}


def run(params: str | None, overrides: list[str] | None = None, fresh: bool = False, **explicit) -> dict:
    read = Params(params, overrides)  # read once
    cfg = read.section(TrainConfig, "train", **explicit)  # validated: nothing loaded yet
    pol_cfg = training_policy_params(read.section(PolicyParams, "policy"), cfg.rl)
    tool_cfg = read.section(ToolParams, "tool")
    set_threads()
    quiet_transformers()
    processes = join_processes(pol_cfg.device)
    root = Path(cfg.data)
    train_records = training_records(root / "train.jsonl")
    val_records, _ = read_manifest(root / "val.jsonl")
    paths = system_paths(cfg.base, cfg.policy, _initial_tool(cfg), cfg.tool_arch)
    inputs = {"train_manifest": root / "train.jsonl", "val_manifest": root / "val.jsonl",
              "policy": paths.policy, "tool": paths.tool}
    run_dir = RunDir(Path(cfg.checkpoints), resume_key(cfg, pol_cfg, inputs))
    moved = run_dir.open(fresh=fresh) if processes.is_main else None
    processes.barrier()  # the run directory exists (and --fresh moved the old one) before anyone reads it
    if moved:
        console.print(f"--fresh: the earlier checkpoints of this configuration were moved to {moved}")
    policy, tool = load_stage_system(paths, pol_cfg, tool_cfg, processes)
    try:
        trainer = Trainer(cfg.rl, policy, tool, train_records, val_records, root, pol_cfg.require_think, cfg.memory,
                          processes)
    except ValueError as exc:  # a configuration the trainer refuses (e.g. AdamW on bf16 weights)
        raise ConfigError(str(exc)) from None

    resume_step = run_dir.resume_step()
    console.print(f"run {run_dir.id}: checkpoints and live curves in {run_dir.path}" +
                  (f" ([green]resuming[/green] at step {resume_step})" if resume_step is not None else "") +
                  (f", {processes.world_size} processes" if processes.distributed else "") +
                  (f", policy sharded ({trainer.engine.label}: "
                   f"{trainer.engine.sharded_fraction():.0%} of its weights on this process)"
                   if trainer.engine.sharded else ""))
    # Curves go to the run's own directory (so two configurations never write into one file) and
    # are published to `train.live` when the run ends.
    started = time.perf_counter()
    logger = StepLogger(run_dir.live, resume_step, title=f"train {cfg.rl.method}: {cfg.live}") if processes.is_main \
        else NoLogger()
    with logger as log, \
            progress_bar(f"train {cfg.rl.method}", cfg.schedule.steps) as bar:
        def progress(step: int, metrics: dict | None) -> None:
            info = f"reward {metrics[ROLLOUT_REWARD_MEAN]:.3f} iou {metrics[ROLLOUT_IOU]:.3f}" if metrics else ""
            bar(completed=step, info=info)

        state = trainer.fit(cfg.schedule, run_dir, log.log, progress)
    # This invocation's wall time (a resumed run counts only the steps it ran itself).
    seconds = round(time.perf_counter() - started, 1)
    if not processes.is_main:
        return asdict(state)  # outputs are the main process's to write

    with atomic_dir(cfg.live) as tmp:
        shutil.copytree(run_dir.live, tmp, dirs_exist_ok=True)
    source = run_dir.best if run_dir.best.is_dir() else run_dir.last
    with atomic_dir(cfg.out) as tmp:
        copy_system(source, tmp)
        write_json(tmp / "train_state.json", asdict(state))
        write_run_record(tmp / "run.json", "train", {"train": asdict(cfg), "policy": asdict(pol_cfg)},
                         inputs, {**asdict(state), "run_id": run_dir.id, "seconds": seconds})
    if cfg.last_out:
        with atomic_dir(cfg.last_out) as tmp:
            copy_system(run_dir.last, tmp)
            write_json(tmp / "train_state.json", asdict(state))
    summary_table(f"train {cfg.rl.method}", {"run": run_dir.id, "steps": state.step, "resumed_from": state.resumed_from,
                                             "best_step": state.best_step, "best_val_giou": state.best_val_giou,
                                             "out": cfg.out})
    return asdict(state)
