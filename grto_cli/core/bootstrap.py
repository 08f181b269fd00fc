"""B-GRTO's bootstrap: before RL, sample K rollouts per training query from the frozen initial
policy once (generation only: no reference model, no policy backward pass), then train the tool
on that cache with GRTO's objective, so RL starts from a tool matched to the policy's prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from grto_cli.core.answer import ToolCall
from grto_cli.core.config import check_choice
from grto_cli.core.data.images import load_rgb
from grto_cli.core.data.records import Record
from grto_cli.core.distributed import Processes
from grto_cli.core.grto import freeze_image_encoder, tool_loss, tool_optimizer
from grto_cli.core.metrics import TOOL_LOSS, TOOL_VALID_ROLLOUTS
from grto_cli.core.policy import Policy
from grto_cli.core.rollout import SamplingParams, sample_completions
from grto_cli.core.sampling import rollout_key
from grto_cli.core.tool import SEG_LOSSES, SamTool


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

    def validate(self) -> None:
        check_choice("loss", self.loss, SEG_LOSSES)


def collect_rollouts(policy: Policy, records: Sequence[Record], root: Path, cfg: BootstrapConfig, seed: int,
                     require_think: bool = False, processes: Processes | None = None) -> Iterator[dict]:
    """Sample K answers per query from the frozen policy. Yields one cache row per query, in record
    order: its completions, their parse statuses and their calls (``ToolCall.to_dict`` or None).
    Query i's noise is keyed by (seed, i), so the cache is the same however the generation batches
    are spread over processes (each process generates every world_size-th batch)."""
    sampling = SamplingParams(group_size=cfg.rollouts_per_query, temperature=cfg.temperature,
                              max_new_tokens=cfg.max_new_tokens)
    K = cfg.rollouts_per_query

    def batch(chunk: Sequence[Record], start: int) -> list[dict]:
        images = [load_rgb(r.image_path(root)) for r in chunk]
        keys = [rollout_key(seed, start + i) for i in range(len(chunk))]
        _, _, _, texts, parsed = sample_completions(policy, images, [r.query for r in chunk], sampling, keys,
                                                    require_think)
        rows = []
        for i, r in enumerate(chunk):
            group = parsed[i * K:(i + 1) * K]
            rows.append({"id": r.id, "completions": texts[i * K:(i + 1) * K], "status": [p.status for p in group],
                         "calls": [p.call.to_dict() if p.call else None for p in group]})
        return rows

    yield from (processes or Processes()).in_batches(records, cfg.generation_batch, batch)


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
        embeddings = tool.embed(images, [str(r.image_path(root)) for r in recs])  # (B, C, h, w)
        for r in recs:
            if r.id not in targets:
                targets[r.id] = torch.as_tensor(r.decode_mask(), device=tool.device)
        calls = [[ToolCall.from_dict(c) for c in row["calls"]] for row in rows]
        loss, n_valid = tool_loss(tool, embeddings, calls, [targets[r.id] for r in recs], cfg.loss)
        optim.zero_grad()
        loss.backward()
        optim.step()
        stats = {TOOL_LOSS: loss.item(), TOOL_VALID_ROLLOUTS: n_valid}
        if on_step:
            on_step(step, stats)
    return stats
