"""`grto bootstrap`: B-GRTO's cheap stage. Sample K rollouts per training query from the frozen
initial policy once (cached on disk, each with its reward under the `train` section's reward
weights), then train the tool on the cache for N steps."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from grto_cli.core.bootstrap import BootstrapConfig, collect_rollouts, sample_scenes, train_tool_on_cache
from grto_cli.core.checkpoint import TOOL_DIR, save_tool, system_paths
from grto_cli.core.io import atomic_dir, write_jsonl
from grto_cli.core.metrics import TOOL_LOSS
from grto_cli.core.rewards import RewardWeights
from grto_cli.stages.console import console, progress_bar, summary_table
from grto_cli.stages.params import ConfigError, Params
from grto_cli.stages.record import write_run_record
from grto_cli.stages.runtime import join_processes, quiet_transformers, set_threads
from grto_cli.stages.sections import PolicyParams, ToolParams, training_records
from grto_cli.stages.live import StepLogger
from grto_cli.stages.system import load_stage_system


@dataclass
class BootstrapStageConfig(BootstrapConfig):
    data: str = "data/prepared/synthetic"
    base: str | None = "models/base"
    policy: str | None = None
    tool: str | None = None
    tool_arch: str | None = None
    cache: str = "rollouts/bootstrap.jsonl"
    out: str = "models/bootstrap"
    live: str = "results/bootstrap"
    seed: int = 0


def run(params: str | None, overrides: list[str] | None = None, **explicit) -> dict:
    read = Params(params, overrides)  # read once
    cfg = read.section(BootstrapStageConfig, "bootstrap", **explicit)  # validated
    pol_cfg, tool_cfg = read.section(PolicyParams, "policy"), read.section(ToolParams, "tool")
    rewards = read.section(RewardWeights, "train.rewards")  # RL's reward weights, one copy of them
    set_threads()
    quiet_transformers()
    processes = join_processes(pol_cfg.device)
    import torch

    torch.manual_seed(cfg.seed)
    manifest = Path(cfg.data) / "train.jsonl"
    records = sample_scenes(training_records(manifest), cfg.max_queries, cfg.seed)
    paths = system_paths(cfg.base, cfg.policy, cfg.tool, cfg.tool_arch)
    policy, tool = load_stage_system(paths, pol_cfg, tool_cfg, processes)

    rows = []
    started = time.perf_counter()
    with progress_bar(f"sampling {cfg.rollouts_per_query} rollouts/query", len(records)) as advance:
        for row in collect_rollouts(policy, tool, records, manifest.parent, cfg, cfg.seed, rewards,
                                    pol_cfg.require_think, processes):
            rows.append(row)
            advance(1)
    if not processes.is_main:
        return {}  # every process gathered the whole cache; writing it and the tool steps are the main one's
    write_jsonl(cfg.cache, rows)
    sampling_seconds = time.perf_counter() - started
    n_calls = sum(len(r["calls"]) for r in rows)
    n_valid = sum(c is not None for r in rows for c in r["calls"])
    del policy  # generation only: the policy is not needed for the tool steps

    by_id = {r.id: r for r in records}
    started = time.perf_counter()
    with progress_bar("tool steps on the cache", cfg.steps) as advance, StepLogger(cfg.live) as log:
        try:
            stats = train_tool_on_cache(tool, rows, by_id, manifest.parent, cfg, cfg.seed,
                                        on_step=lambda s, m: (log.log(s, m), advance(1, f"loss {m[TOOL_LOSS]:.3f}")))
        except ValueError as exc:  # e.g. a base policy that never emits a parsable call
            raise ConfigError(f"bootstrap: {exc}") from None
    # Wall times: what the bootstrap costs on top of RL (the study's report counts them).
    results = {**stats, "rollouts": n_calls, "parsable_rollouts": n_valid,
               "sampling_seconds": round(sampling_seconds, 1), "tool_seconds": round(time.perf_counter() - started, 1)}
    with atomic_dir(cfg.out) as tmp:
        save_tool(tool, tmp)
        write_run_record(tmp / "run.json", "bootstrap", {"bootstrap": asdict(cfg), "policy": asdict(pol_cfg),
                                                         "rewards": asdict(rewards)},
                         {"train_manifest": manifest, "policy": paths.policy, "tool": paths.tool, "cache": cfg.cache},
                         results)
    summary_table("bootstrap", {"queries": len(rows), **results, "out": cfg.out})
    console.print(f"bootstrapped tool written to {Path(cfg.out) / TOOL_DIR}")
    return results
