"""`grto pretrain`: build and train the embedded default's tiny base models (policy + SAM).

Stands in for downloading pretrained checkpoints: the outputs have the real checkpoints' formats
and every later stage loads them through the same loaders.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from grto_cli.core.data.records import read_manifest
from grto_cli.core.checkpoint import POLICY_DIR, save_policy, save_tool
from grto_cli.core.config import check_choice
from grto_cli.core.io import atomic_dir
from grto_cli.core.metrics import SFT_LOSS, TOOL_LOSS
from grto_cli.core.policy import Policy, load_policy
from grto_cli.core.pretrain import PolicySftConfig, SamTrainConfig, train_policy_sft, train_sam
from grto_cli.core.tiny import TINY_FAMILIES, TinyVLMArch, build_tiny_vlm, tiny_sam_arch
from grto_cli.core.tool import SEG_LOSSES, SamTool, build_sam
from grto_cli.stages.common import (console, policy_params, progress_bar, set_threads, stage_config,
                                    summary_table, write_run_record)
from grto_cli.stages.live import StepLogger


@dataclass
class PretrainConfig:
    data: str = "data/prepared/synthetic"
    out: str = "models/base"
    live: str = "results/pretrain"
    seed: int = 0
    vlm: TinyVLMArch = field(default_factory=TinyVLMArch)
    sft: PolicySftConfig = field(default_factory=PolicySftConfig)
    sam: SamTrainConfig = field(default_factory=SamTrainConfig)

    def validate(self) -> None:
        check_choice("sam.loss", self.sam.loss, SEG_LOSSES)
        check_choice("vlm.family", self.vlm.family, tuple(TINY_FAMILIES))


def run(params: str | None, overrides: list[str] | None = None, **explicit) -> dict:
    cfg = stage_config(PretrainConfig, params, "pretrain", overrides, **explicit)
    pol_cfg = policy_params(params, overrides)
    set_threads()
    manifest = Path(cfg.data) / "train.jsonl"
    records, _ = read_manifest(manifest)
    root = manifest.parent
    with atomic_dir(cfg.out) as tmp:
        arch = tiny_sam_arch(cfg.vlm.image_size)
        torch.manual_seed(cfg.seed)  # SAM's initial weights come from the global RNG
        tool = SamTool(build_sam(arch), arch)
        with progress_bar("tiny SAM on ground-truth prompts", cfg.sam.steps) as advance, \
                StepLogger(Path(cfg.live) / "sam") as log:
            sam_stats = train_sam(tool, records, root, cfg.sam, cfg.seed,
                                  on_step=lambda s, m: (log.log(s, m), advance(1, f"loss {m[TOOL_LOSS]:.3f}")))
        save_tool(tool, tmp)

        # The untrained policy goes through save_pretrained/from_pretrained before training, so the
        # warm-up trains exactly what a real checkpoint load would give.
        model, processor = build_tiny_vlm(cfg.vlm, seed=cfg.seed)
        save_policy(Policy(model, processor, pol_cfg.coord_convention or "absolute", pol_cfg.prompt_template), tmp)
        policy = load_policy(tmp / POLICY_DIR, prompt_template=pol_cfg.prompt_template,
                             coord_convention=pol_cfg.coord_convention)
        with progress_bar("tiny VLM supervised warm-up", cfg.sft.steps) as advance, \
                StepLogger(Path(cfg.live) / "policy") as log:
            sft_stats = train_policy_sft(policy, records, root, cfg.sft, cfg.seed,
                                         on_step=lambda s, m: (log.log(s, m), advance(1, f"loss {m[SFT_LOSS]:.3f}")))
        save_policy(policy, tmp)
        results = {**sam_stats, **sft_stats,
                   "policy_parameters": sum(p.numel() for p in policy.model.parameters()),
                   "tool_parameters": sum(p.numel() for p in tool.sam.parameters())}
        write_run_record(tmp / "run.json", "pretrain", {"pretrain": asdict(cfg), "policy": asdict(pol_cfg)},
                         {"train_manifest": manifest}, results)
    summary_table("pretrain", {"out": cfg.out, **{k: v for k, v in results.items()}})
    console.print(f"base system written to {cfg.out}")
    return results
