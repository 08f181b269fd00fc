"""GRTO: train the tool on the prompts the policy actually emits; B-GRTO: do it before RL too.

L_tool = mean over valid rollouts of seg_loss(tool(image, call), ground truth): a Monte-Carlo
estimate of E_{y~pi}[seg_loss], the differentiable surrogate of the expected IoU reward. Only the
prompt encoder and mask decoder receive gradients; image embeddings come from the frozen encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from grto_cli.core.data.images import load_rgb
from grto_cli.core.data.records import Record
from grto_cli.core.io import write_jsonl
from grto_cli.core.policy import Policy
from grto_cli.core.rollout import SamplingParams, sample_completions
from grto_cli.core.tool import SamTool, ToolCall, seg_loss, trainable_tool_parameters

TOOL_WEIGHTINGS = ("uniform", "positive", "softmax")


def rollout_weights(advantages: torch.Tensor, group_size: int, weighting: str) -> torch.Tensor:
    """How much each rollout counts in the tool loss. "uniform" is the method; the others are ablations."""
    if weighting == "uniform":
        return torch.ones_like(advantages)
    if weighting == "positive":
        return (advantages > 0).float()
    if weighting == "softmax":
        return torch.softmax(advantages.view(-1, group_size), dim=1).flatten() * group_size
    raise ValueError(f"unknown tool weighting {weighting!r}; expected one of {TOOL_WEIGHTINGS}")


def tool_loss(tool: SamTool, embeddings: torch.Tensor, calls: Sequence[Sequence[ToolCall | None]],
              targets: Sequence[torch.Tensor], kind: str = "dice_bce",
              weights: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Weighted mean seg loss over valid calls; ``calls[i]`` are image i's calls. Returns (loss, n_valid).

    Unparsable calls (None) have no mask to train and are left out of the mean, not counted as zero.
    """
    losses, w = [], []
    offset = 0
    for i, image_calls in enumerate(calls):
        valid = [j for j, c in enumerate(image_calls) if c is not None]
        if valid:
            target = targets[i]
            logits = tool.decode(embeddings[i:i + 1], [image_calls[j] for j in valid], tuple(target.shape))
            losses.append(seg_loss(logits, target[None].expand(len(valid), -1, -1), kind))
            w.append(weights[[offset + j for j in valid]] if weights is not None else torch.ones(len(valid)))
        offset += len(image_calls)
    if not losses:
        return torch.zeros((), device=embeddings.device, requires_grad=True), 0
    loss, weight = torch.cat(losses), torch.cat(w).to(embeddings.device)
    return (loss * weight).sum() / weight.sum().clamp_min(1e-8), int(len(loss))


def tool_optimizer(tool: SamTool, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable_tool_parameters(tool.sam), lr=lr, weight_decay=weight_decay)


def freeze_image_encoder(tool: SamTool) -> None:
    tool.sam.image_encoder.requires_grad_(False)
    tool.sam.image_encoder.eval()


# ----------------------------------------------------------------------------- B-GRTO bootstrap


@dataclass
class BootstrapConfig:
    rollouts_per_query: int = 8  # K
    max_queries: int | None = None  # None: the whole training split
    generation_batch: int = 16  # queries per generate call
    temperature: float = 1.0
    max_new_tokens: int = 40
    steps: int = 300  # N tool steps on the cache
    batch_size: int = 8  # queries per tool step (each with its K calls)
    lr: float = 1e-4
    loss: str = "dice_bce"


def collect_rollouts(policy: Policy, records: Sequence[Record], root: Path, cfg: BootstrapConfig,
                     require_think: bool = False) -> Iterator[dict]:
    """Sample K answers per query from the frozen policy: generation only (no reference model, no
    backward). Yields one cache row per query: its completions and their parsed calls."""
    sampling = SamplingParams(group_size=cfg.rollouts_per_query, temperature=cfg.temperature,
                              max_new_tokens=cfg.max_new_tokens)
    for start in range(0, len(records), cfg.generation_batch):
        chunk = records[start:start + cfg.generation_batch]
        images = [load_rgb(r.image_path(root)) for r in chunk]
        _, _, _, texts, parsed = sample_completions(policy, images, [r.query for r in chunk], sampling, require_think)
        K = cfg.rollouts_per_query
        for i, r in enumerate(chunk):
            group = parsed[i * K:(i + 1) * K]
            yield {"id": r.id, "completions": texts[i * K:(i + 1) * K], "status": [p.status for p in group],
                   "calls": [p.call.to_dict() if p.call else None for p in group]}


def write_rollout_cache(path: str | Path, rows: list[dict]) -> None:
    write_jsonl(path, rows)


def call_from_dict(d: dict | None) -> ToolCall | None:
    if d is None:
        return None
    box = tuple(d["bbox"]) if d.get("bbox") is not None else None
    return ToolCall(box=box, points=tuple(tuple(p) for p in d.get("points") or ()))


def train_tool_on_cache(tool: SamTool, cache: list[dict], records: dict[str, Record], root: Path,
                        cfg: BootstrapConfig, seed: int,
                        on_step: Callable[[int, dict], None] | None = None) -> dict:
    """N tool steps on cached rollouts: the tool learns the initial policy's prompt distribution."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    freeze_image_encoder(tool)
    optim = tool_optimizer(tool, cfg.lr)
    usable = [row for row in cache if any(c is not None for c in row["calls"])]
    if not usable:
        raise ValueError("no parsable rollout in the bootstrap cache: the initial policy never emitted a valid call")
    targets: dict[str, torch.Tensor] = {}
    stats: dict = {}
    for step in range(cfg.steps):
        rows = [usable[int(i)] for i in rng.integers(len(usable), size=cfg.batch_size)]
        recs = [records[row["id"]] for row in rows]
        images = [load_rgb(r.image_path(root)) for r in recs]
        embeddings = tool.embed(images, [str(r.image_path(root)) for r in recs])
        for r in recs:
            if r.id not in targets:
                targets[r.id] = torch.as_tensor(r.decode_mask(), device=tool.device)
        calls = [[call_from_dict(c) for c in row["calls"]] for row in rows]
        loss, n_valid = tool_loss(tool, embeddings, calls, [targets[r.id] for r in recs], cfg.loss)
        optim.zero_grad()
        loss.backward()
        optim.step()
        stats = {"tool_loss": loss.item(), "n_valid": n_valid}
        if on_step:
            on_step(step, stats)
    return stats
