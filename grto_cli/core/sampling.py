"""Sampling whose noise belongs to the rollout, not to the batch it was generated in.

Every sampled row has a key (a group's key and the row's index in the group). The token at
completion position t is ``argmax(logits / T + g)``, where ``g`` is Gumbel noise drawn from a
generator seeded by (row key, t) alone. By the Gumbel-max trick this draws exactly from
softmax(logits / T), and a group gets the same completions whether it is generated alone, beside
other groups, in another order or on another process: what N processes sample is what one samples,
and a resumed run retraces an uninterrupted one. (``generate``'s own ``do_sample`` draws from one
generator stream for the whole batch, so a row's tokens depend on its neighbours.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor


def rollout_key(*parts: int) -> int:
    """A 63-bit key from integers (seed, step, group index, ...): ``SeedSequence`` mixes them, so
    nearby tuples give unrelated keys.

    >>> rollout_key(0, 1, 2) == rollout_key(0, 1, 2) != rollout_key(0, 2, 1)
    True
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def row_keys(group_keys: Sequence[int], group_size: int) -> list[int]:
    """One key per sampled row, rows of a group next to each other (as ``policy.expand_prompts`` lays them)."""
    return [rollout_key(k, j) for k in group_keys for j in range(group_size)]


def gumbel_noise(key: int, position: int, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(vocab,) standard Gumbel noise for one row at one completion position; a function of
    (key, position) only."""
    generator = torch.Generator(device=device)
    generator.manual_seed(rollout_key(key, position))
    u = torch.rand(vocab, generator=generator, device=device, dtype=torch.float32)
    return -torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float32).tiny)))


class GumbelSampler(LogitsProcessor):
    """The last logits processor of a greedy ``generate``: scores / T + per-row Gumbel noise, so the
    greedy argmax is a sample from softmax(scores / T) (tokens other processors set to -inf stay
    impossible)."""

    def __init__(self, keys: Sequence[int], temperature: float, prompt_length: int):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
        self.keys, self.temperature, self.prompt_length = list(keys), float(temperature), int(prompt_length)

    def noise(self, position: int, vocab: int, device: torch.device | str) -> torch.Tensor:
        return torch.stack([gumbel_noise(k, position, vocab, device) for k in self.keys])  # (N, V)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != len(self.keys):
            raise ValueError(f"{input_ids.shape[0]} rows to sample but {len(self.keys)} rollout keys")
        position = input_ids.shape[1] - self.prompt_length
        noise = self.noise(position, scores.shape[-1], scores.device)
        return scores.float() / self.temperature + noise
