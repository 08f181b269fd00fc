"""B-GRTO's bootstrap: before RL, sample K rollouts per training query from the frozen initial
policy once (generation only: no reference model, no policy backward pass), then train the tool
on that cache with GRTO's objective, so RL starts from a tool matched to the policy's prompts.

The queries are the whole training split or a seeded sample of whole scenes (``sample_scenes``:
a split's records list each image's queries together, so its first records are few scenes).
Each cached rollout keeps its reward (from the initial tool, with RL's reward weights), so the
tool steps can weight rollouts the way RL's tool step does (``grto.rollout_weights``), and the
tool's gradient is clipped as in RL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from grto_cli.core.answer import ToolCall
from grto_cli.core.config import check_choice, check_positive
from grto_cli.core.data.images import load_rgb
from grto_cli.core.data.records import Record
from grto_cli.core.distributed import Processes
from grto_cli.core.grpo import group_advantages
from grto_cli.core.grto import TOOL_WEIGHTINGS, freeze_image_encoder, rollout_weights, tool_loss, tool_optimizer
from grto_cli.core.metrics import TOOL_LOSS, TOOL_VALID_ROLLOUTS
from grto_cli.core.policy import Policy
from grto_cli.core.rewards import RewardWeights
from grto_cli.core.rollout import SamplingParams, sample_completions, score_groups
from grto_cli.core.sampling import rollout_key
from grto_cli.core.tool import SEG_LOSSES, Tool


@dataclass
class BootstrapConfig:
    rollouts_per_query: int = 8  # K
    max_queries: int | None = None  # None: the whole training split; else whole scenes drawn by seed
    generation_batch: int = 16  # queries per generate call
    temperature: float = 1.0
    max_new_tokens: int = 40
    steps: int = 300  # N tool steps on the cache
    batch_size: int = 8  # queries per tool step (each with its K calls)
    lr: float = 1e-4
    loss: str = "dice_bce"
    tool_weighting: str = "uniform"  # as RL's train.tool_weighting: uniform | positive | softmax
    max_grad_norm: float = 1.0  # the tool's gradient clipped as in RL

    def validate(self) -> None:
        check_choice("loss", self.loss, SEG_LOSSES)
        check_choice("tool_weighting", self.tool_weighting, TOOL_WEIGHTINGS)
        for name in ("rollouts_per_query", "generation_batch", "steps", "batch_size"):
            check_positive(name, getattr(self, name))
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries must be at least 1 or null (the whole split), got {self.max_queries}")


def sample_scenes(records: Sequence[Record], max_queries: int | None, seed: int) -> list[Record]:
    """The bootstrap's queries: all of ``records``, or whole scenes (records sharing an image) in
    an order shuffled by ``seed`` until at least ``max_queries`` records are taken, each scene's
    records in their split order. A split lists a scene's queries together, so its first records
    would be a few scenes, not a sample of the split.

    >>> recs = [Record(f"q{i}", f"im{i // 2}.png", 4, 4, "q", {}, [0, 0, 1, 1], "d", "train") for i in range(8)]
    >>> [r.id for r in sample_scenes(recs, 3, seed=0)] == [r.id for r in sample_scenes(recs, 3, seed=0)]
    True
    >>> len(sample_scenes(recs, 3, seed=0)), len(sample_scenes(recs, None, seed=0))
    (4, 8)
    """
    if max_queries is None or max_queries >= len(records):
        return list(records)
    scenes: dict[str, list[Record]] = {}
    for r in records:
        scenes.setdefault(r.image, []).append(r)
    order = np.random.default_rng([seed, 0x5CE7E]).permutation(len(scenes))
    groups = list(scenes.values())
    chosen: list[Record] = []
    for i in order:
        if len(chosen) >= max_queries:
            break
        chosen.extend(groups[int(i)])
    return chosen


def collect_rollouts(policy: Policy, tool: Tool, records: Sequence[Record], root: Path, cfg: BootstrapConfig,
                     seed: int, rewards: RewardWeights, require_think: bool = False,
                     processes: Processes | None = None) -> Iterator[dict]:
    """Sample K answers per query from the frozen policy and score them with the initial tool.
    Yields one cache row per query, in record order: its completions, their parse statuses, their
    calls (``ToolCall.to_dict`` or None) and their rewards (total, as RL's ``rewards`` weigh them).
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
        # Not cached: a process scores only its share of the batches, and the tool steps must encode
        # the same images in the same batches whatever the number of processes.
        embeddings = tool.embed(images)  # (B, C, h, w)
        targets = [torch.as_tensor(r.decode_mask(), device=tool.device) for r in chunk]
        scored = score_groups(tool, embeddings, chunk, images, targets, parsed, K, rewards).total.tolist()  # (B*K,)
        rows = []
        for i, r in enumerate(chunk):
            group = parsed[i * K:(i + 1) * K]
            rows.append({"id": r.id, "completions": texts[i * K:(i + 1) * K], "status": [p.status for p in group],
                         "calls": [p.call.to_dict() if p.call else None for p in group],
                         "rewards": [round(v, 6) for v in scored[i * K:(i + 1) * K]]})
        return rows

    yield from (processes or Processes()).in_batches(records, cfg.generation_batch, batch)


def train_tool_on_cache(tool: Tool, cache: list[dict], records: dict[str, Record], root: Path,
                        cfg: BootstrapConfig, seed: int,
                        on_step: Callable[[int, dict], None] | None = None) -> dict:
    """N tool steps on cached rollouts: the tool learns the initial policy's prompt distribution.
    Each rollout counts with ``cfg.tool_weighting`` of its group's advantages (from the cached
    rewards, as RL's tool step weighs them); the gradient is clipped to ``cfg.max_grad_norm``."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    freeze_image_encoder(tool)
    optim = tool_optimizer(tool, cfg.lr)
    params = optim.param_groups[0]["params"]
    usable = [row for row in cache if any(c is not None for c in row["calls"])]
    if not usable:
        raise ValueError("no parsable rollout in the bootstrap cache: the initial policy never emitted a valid call")
    if cfg.tool_weighting != "uniform" and any("rewards" not in row for row in usable):
        raise ValueError(f"tool_weighting {cfg.tool_weighting!r} needs each cached rollout's reward, and the "
                         f"cache holds none (written by an older grto): sample it again")
    targets: dict[str, torch.Tensor] = {}
    stats: dict = {}
    for step in range(cfg.steps):
        rows = [usable[int(i)] for i in rng.integers(len(usable), size=cfg.batch_size)]
        recs = [records[row["id"]] for row in rows]
        images = [load_rgb(r.image_path(root)) for r in recs]
        embeddings = tool.embed(images, [str(r.image_path(root)) for r in recs])  # B images
        for r in recs:
            if r.id not in targets:
                targets[r.id] = torch.as_tensor(r.decode_mask(), device=tool.device)
        calls = [[ToolCall.from_dict(c) for c in row["calls"]] for row in rows]
        weights = None
        if cfg.tool_weighting != "uniform":
            rewards = torch.tensor([r for row in rows for r in row["rewards"]])  # (B*K,)
            K = len(rows[0]["calls"])
            weights = rollout_weights(group_advantages(rewards, K)[0], K, cfg.tool_weighting)  # (B*K,)
        loss, n_valid = tool_loss(tool, embeddings, calls, [targets[r.id] for r in recs], cfg.loss, weights)
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optim.step()
        stats = {TOOL_LOSS: loss.item(), TOOL_VALID_ROLLOUTS: n_valid}
        if on_step:
            on_step(step, stats)
    return stats
