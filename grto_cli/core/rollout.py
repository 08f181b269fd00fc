"""Group sampling: G completions per query, parsed calls, the tool's masks, rewards, log-probs.

Each image goes through the policy's vision tower once per generation and once per log-prob pass
(its output shared by the G completions, ``policy.expand_prompts``), and through the tool's image
encoder once; all G calls of that image go through the mask decoder in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from grto_cli.core.data.records import Record
from grto_cli.core.answer import ParsedAnswer, ToolCall, parse_answer
from grto_cli.core.grpo import group_advantages
from grto_cli.core.metrics import (ROLLOUT_BOX_IOU, ROLLOUT_COMPLETION_TOKENS, ROLLOUT_DISTINCT_CALLS, ROLLOUT_FORMAT_RATE,
                                   ROLLOUT_IOU, ROLLOUT_POINT_IN_TARGET, ROLLOUT_REWARD_MEAN, ROLLOUT_REWARD_STD,
                                   ROLLOUT_FLAT_GROUPS, ROLLOUT_ZERO_STD_GROUPS, distinct_calls)
from grto_cli.core.policy import (LOGPROB_CHUNK, Generating, Policy, completion_logprobs, decode_completions,
                                  encode_prompts, expand_prompts, generate, resized_sizes, sampling_config)
from grto_cli.core.rewards import RewardBreakdown, RewardWeights, compute_rewards
from grto_cli.core.sampling import GumbelSampler, row_keys
from grto_cli.core.tool import Embeddings, Tool


@dataclass
class SamplingParams:
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0  # anything < 1 would need the same filter reproduced in training log-probs
    max_new_tokens: int = 40


@dataclass
class RolloutBatch:
    records: list[Record]
    group_size: int
    prompts: dict  # model inputs, one prompt per record: completions i*G..(i+1)*G-1 answer prompt i
    completion_ids: torch.Tensor  # (N, L), N = len(records) * group_size
    completion_mask: torch.Tensor  # (N, L): up to and including the first EOS
    texts: list[str]
    parsed: list[ParsedAnswer]
    rewards: RewardBreakdown
    embeddings: Embeddings  # len(records) images' frozen image-encoder outputs (Tool.embed)
    targets: list[torch.Tensor]  # per record, (H, W) bool

    def prompt_rows(self, rows: slice) -> torch.Tensor:
        """The prompt each completion of ``rows`` answers."""
        return torch.arange(self.completion_ids.shape[0])[rows] // self.group_size

    @property
    def calls(self) -> list[ToolCall | None]:
        return [p.call for p in self.parsed]

    def group_calls(self, i: int) -> list[ToolCall | None]:
        return self.calls[i * self.group_size:(i + 1) * self.group_size]


def sample_completions(policy: Policy, images: Sequence[np.ndarray], queries: Sequence[str],
                       sampling: SamplingParams, keys: Sequence[int], require_think: bool = False,
                       generating: Generating | None = None
                       ) -> tuple[dict, torch.Tensor, torch.Tensor, list[str], list[ParsedAnswer]]:
    """G sampled answers per (image, query), parsed into tool calls in original-image pixels.
    ``keys[i]`` (``sampling.rollout_key`` of the run's seed and the query's place in it) alone
    decides query i's noise, whatever else is in the batch. ``generating``: the training engine's
    context around ``generate`` (``policy.generate``)."""
    G = sampling.group_size
    if len(keys) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(keys)} rollout keys")
    prompts = encode_prompts(policy, [Image.fromarray(im) for im in images], queries)
    sizes = resized_sizes(policy, prompts)
    sampler = GumbelSampler(row_keys(keys, G), sampling.temperature, prompts["input_ids"].shape[1])
    was_training = policy.model.training
    policy.model.eval()
    with torch.no_grad():
        inputs = expand_prompts(policy.model, prompts, torch.arange(len(queries)).repeat_interleave(G))
    completion_ids, mask = generate(policy, inputs, sampling_config(policy, sampling.max_new_tokens), sampler,
                                    generating)
    policy.model.train(was_training)
    texts = decode_completions(policy, completion_ids)
    parsed = [parse_answer(t, images[i // G].shape[:2], sizes[i // G], policy.coord_convention, require_think)
              for i, t in enumerate(texts)]
    return prompts, completion_ids, mask, texts, parsed


def rollout_group(policy: Policy, tool: Tool, records: Sequence[Record], images: Sequence[np.ndarray],
                  targets: Sequence[np.ndarray], sampling: SamplingParams, weights: RewardWeights,
                  keys: Sequence[int], require_think: bool = False,
                  image_keys: Sequence[str] | None = None, generating: Generating | None = None) -> RolloutBatch:
    G = sampling.group_size
    prompts, completion_ids, mask, texts, parsed = sample_completions(
        policy, images, [r.query for r in records], sampling, keys, require_think, generating)
    embeddings = tool.embed(images, image_keys)
    target_tensors = [torch.as_tensor(t, device=tool.device) for t in targets]
    rewards = score_groups(tool, embeddings, records, images, target_tensors, parsed, G, weights)
    return RolloutBatch(records=list(records), group_size=G, prompts=prompts, completion_ids=completion_ids,
                        completion_mask=mask, texts=texts, parsed=parsed, rewards=rewards,
                        embeddings=embeddings, targets=target_tensors)


@torch.no_grad()
def score_groups(tool: Tool, embeddings: Embeddings, records: Sequence[Record], images: Sequence[np.ndarray],
                 targets: Sequence[torch.Tensor], parsed: Sequence[ParsedAnswer], group_size: int,
                 weights: RewardWeights) -> RewardBreakdown:
    """Each query's G parsed calls decoded on its image's embedding and scored against its target."""
    rewards = []
    for i, record in enumerate(records):
        group = parsed[i * group_size:(i + 1) * group_size]
        logits = tool.decode(embeddings[i:i + 1], [p.call for p in group], images[i].shape[:2])
        rewards.append(compute_rewards(group, logits > 0, targets[i], record.bbox, weights))
    return concat_rewards(rewards)


def concat_rewards(parts: Sequence[RewardBreakdown]) -> RewardBreakdown:
    return RewardBreakdown(**{name: torch.cat([getattr(p, name) for p in parts])
                              for name in ("total", "format_ok", "iou", "box_iou", "point")})


def rollout_logprobs(model: torch.nn.Module, batch: RolloutBatch, rows: slice, temperature: float,
                     suppressed_ids: Sequence[int] = (), chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """Per-token log-probs of a slice of the rollouts' completions under ``model``."""
    return completion_logprobs(model, batch.prompts, batch.completion_ids[rows], batch.completion_mask[rows],
                               temperature, suppressed_ids, chunk, rows=batch.prompt_rows(rows))


class PolicyLogprobs(torch.nn.Module):
    """The policy's log-prob pass as a module (holding the model as ``.model``), so that an engine
    (DDP, FSDP2, ZeRO-3: ``core/engines``) wraps one forward: ``rollout_logprobs`` of some rows."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: RolloutBatch, rows: slice, temperature: float, suppressed_ids, chunk: int) -> torch.Tensor:
        return rollout_logprobs(self.model, batch, rows, temperature, suppressed_ids, chunk)  # (n, L)


def rollout_statistics(batch: RolloutBatch, gather: Callable[[list], list], scale_by_std: bool,
                       min_spread: float = 0.0) -> dict:
    """The step's rollout curves over the whole global batch: ``gather`` brings every process's
    groups, in order (``Processes.gather``; the identity for a lone process)."""
    r = batch.rewards
    rows = gather(list(zip(r.total.tolist(), r.format_ok.float().tolist(), r.iou.tolist(), r.box_iou.tolist(),
                           r.point.tolist(), batch.completion_mask.sum(1).float().tolist(), batch.calls)))
    total, format_ok, iou, box_iou, point, tokens, calls = zip(*rows)
    total = torch.tensor(total)  # (N,)
    _, zero_std = group_advantages(total, batch.group_size, scale_by_std)
    _, flat = group_advantages(total, batch.group_size, scale_by_std, min_spread=min_spread)
    return {ROLLOUT_REWARD_MEAN: total.mean().item(), ROLLOUT_REWARD_STD: total.std().item(),
            ROLLOUT_FORMAT_RATE: float(np.mean(format_ok)), ROLLOUT_IOU: float(np.mean(iou)),
            ROLLOUT_ZERO_STD_GROUPS: zero_std, ROLLOUT_FLAT_GROUPS: flat, ROLLOUT_COMPLETION_TOKENS: float(np.mean(tokens)),
            ROLLOUT_BOX_IOU: float(np.mean(box_iou)), ROLLOUT_POINT_IN_TARGET: float(np.mean(point)),
            ROLLOUT_DISTINCT_CALLS: distinct_calls(calls) / len(calls)}
