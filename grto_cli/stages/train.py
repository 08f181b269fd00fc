"""`grto train --method grpo|grto|b-grto`: RL of policy (and tool), checkpointed and resumable."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from grto_cli.core.data.records import DataError, read_manifest
from grto_cli.core.io import atomic_dir, recover_dir, write_json
from grto_cli.core.system import TOOL_DIR, checkpoint_paths
from grto_cli.core.trainer import RLConfig, Trainer, checkpoint_matches
from grto_cli.stages.common import (ConfigError, console, policy_params, progress_bar, quiet_transformers,
                                    set_threads, stage_config, summary_table, write_run_record)
from grto_cli.stages.live import StepLogger
from grto_cli.stages.system import load_stage_system


@dataclass
class TrainConfig(RLConfig):
    data: str = "data/prepared/synthetic"
    base: str = "models/base"  # initial system: policy/ + tool/
    bootstrap: str = "models/bootstrap"  # b-grto starts from <bootstrap>/tool
    policy: str | None = None  # explicit initial policy (path or hub id), overrides <base>/policy
    tool: str | None = None  # explicit initial tool file/dir, overrides <base>/tool (grpo, grto)
    tool_arch: str | None = None  # vit_b | vit_l | vit_h for Meta's bare .pth files
    out: str = "models/trained"  # the best-on-val system
    checkpoints: str = "checkpoints/train"  # last/ (resume) and best/
    live: str = "results/train"


def _initial_tool(cfg: TrainConfig) -> str | None:
    if cfg.method != "b-grto":
        return cfg.tool
    path = Path(cfg.bootstrap) / TOOL_DIR
    if not path.is_dir():
        raise DataError(f"b-grto starts from the bootstrapped tool, but {path} does not exist: "
                        f"run `grto bootstrap` first (or `dvc repro`)")
    return str(path)


def run(params: str, overrides: list[str] | None = None, **explicit) -> dict:
    cfg = stage_config(TrainConfig, params, "train", overrides, **explicit)
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(f"train: {exc}") from None
    pol_cfg = policy_params(params, overrides)
    set_threads()
    quiet_transformers()
    root = Path(cfg.data)
    train_records, _ = read_manifest(root / "train.jsonl")
    val_records, _ = read_manifest(root / "val.jsonl")
    paths = checkpoint_paths(cfg.base, cfg.policy, _initial_tool(cfg), cfg.tool_arch)
    policy, tool = load_stage_system(paths, pol_cfg)
    trainer = Trainer(cfg, policy, tool, train_records, val_records, root, pol_cfg.require_think)

    ckpt = Path(cfg.checkpoints)
    last, best = recover_dir(ckpt / "last"), recover_dir(ckpt / "best")
    resumed = checkpoint_matches(last, cfg)
    if resumed:
        trainer.load_checkpoint(last)
        console.print(f"[green]resuming[/green] from {last} at step {trainer.state.step}")
    elif ckpt.exists():
        shutil.rmtree(ckpt)  # checkpoints of another configuration: start clean

    with StepLogger(cfg.live, resume=resumed) as log, \
            progress_bar(f"train {cfg.method}", cfg.steps) as advance:
        advance(trainer.state.step)
        if trainer.state.step == 0 and cfg.eval_every:
            _evaluate(trainer, log, best)  # the starting point competes for "best" too
        while trainer.state.step < cfg.steps:
            metrics = trainer.step()
            step = trainer.state.step
            log.log(step, metrics)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                metrics.update(_evaluate(trainer, log, best))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                trainer.save_checkpoint(last)
            advance(1, f"reward {metrics['reward_mean']:.3f} iou {metrics['iou']:.3f}")

    source = best if best.is_dir() else last
    with atomic_dir(cfg.out) as tmp:
        shutil.copytree(source / "policy", tmp / "policy")
        shutil.copytree(source / TOOL_DIR, tmp / TOOL_DIR)
        state = asdict(trainer.state)
        write_json(tmp / "train_state.json", state)
        write_run_record(tmp / "run.json", "train", {"train": asdict(cfg), "policy": asdict(pol_cfg)},
                         {"train_manifest": root / "train.jsonl", "val_manifest": root / "val.jsonl",
                          "policy": paths.policy, "tool": paths.tool}, state)
    summary_table(f"train {cfg.method}", {"steps": trainer.state.step, "resumed_from": trainer.state.resumed_from,
                                          "best_step": trainer.state.best_step,
                                          "best_val_giou": trainer.state.best_val_giou, "out": cfg.out})
    return asdict(trainer.state)


def _evaluate(trainer: Trainer, log: StepLogger, best: Path) -> dict:
    val = trainer.evaluate_val()
    log.log(trainer.state.step, val)
    state = trainer.state
    if state.best_val_giou is None or val["val_giou"] > state.best_val_giou:
        state.best_val_giou, state.best_step = val["val_giou"], state.step
        with atomic_dir(best) as tmp:
            trainer.save_system(tmp)
    return val
