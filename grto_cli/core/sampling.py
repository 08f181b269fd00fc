"""Sampling whose noise belongs to the rollout, not to the batch it was generated in.

Every sampled row has a key (a group's key and the row's index in the group). The token at
completion position t is ``argmax(logits / T + g)``, where ``g`` is Gumbel noise that is a
function of (row key, t, token id) alone. By the Gumbel-max trick this draws exactly from
softmax(logits / T), and a group gets the same completions whether it is generated alone, beside
other groups, in another order or on another process: what N processes sample is what one samples,
and a resumed run retraces an uninterrupted one. (``generate``'s own ``do_sample`` draws from one
generator stream for the whole batch, so a row's tokens depend on its neighbours.)

The noise is counter-based: a 32-bit integer hash of (row key, position, token id), computed for
every row and token at once with a fixed number of elementwise tensor ops per decoding step,
whatever the number of rows (no per-row generator, no Python loop over rows). Its integer steps are
exact on every device, so CPU and CUDA draw the same uniforms. Until commit 5388d42 each row had its
own ``torch.Generator`` per position (N generator set-ups per step, and different draws on CPU and
CUDA); the change of draws changed every sampled completion, not the distribution they follow
(docs/method.md, "Sampling"; ``benchmarks/sampler_cost.py`` times the two).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters before hashing


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


def _s32(c: int) -> int:
    """A 32-bit constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with full avalanche (C. Wellons' "lowbias32") on int32
    tensors read as 32-bit words: multiplication wraps modulo 2^32 (two's complement, as on every
    device torch runs on; ``test_sampling`` checks it against exact integer arithmetic) and each
    right shift is masked to a logical one."""
    x = x ^ ((x >> 16) & 0xFFFF)  # a new tensor: the caller's is never written
    x.mul_(_s32(0x7FEB352D))
    x ^= (x >> 15).bitwise_and_(0x1FFFF)
    x.mul_(_s32(0x846CA68B))
    x ^= (x >> 16).bitwise_and_(0xFFFF)
    return x


def _words(values: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as the int32 words with the same bits (no out-of-range cast)."""
    return torch.where(values >= 1 << 31, values - (1 << 32), values).to(torch.int32)


def key_words(keys: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, 2) int32: the low and high 32 bits of each row's 63-bit key."""
    k = torch.tensor([int(key) for key in keys], dtype=torch.int64)
    return _words(torch.stack([k & _M32, k >> 32], dim=1)).to(device)


def row_states(keys: torch.Tensor, position: int) -> torch.Tensor:
    """(N,) int32 states, one per (row key, position), from ``key_words`` (N, 2): both halves of
    each key and the position go through the hash."""
    pos = _mix32(torch.full_like(keys[:, 1], _s32((int(position) * _GOLDEN + 0x7F4A7C15) & _M32)))
    return _mix32(keys[:, 0] ^ _mix32(keys[:, 1] ^ pos))


def token_counters(vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(V,) int32 hashed token ids, the per-token half of the counter (the same every step)."""
    return _mix32(_words((torch.arange(vocab, dtype=torch.int64) * _GOLDEN) & _M32)).to(device)


CPU_BLOCK = 1 << 16  # (rows x tokens) entries hashed at once on the CPU: the temporaries stay in cache


def gumbel_noise(keys: torch.Tensor, position: int, tokens: torch.Tensor) -> torch.Tensor:
    """(N, V) standard Gumbel noise for rows ``keys`` (``key_words``, (N, 2)) at one completion
    position, over the tokens whose ``token_counters`` are ``tokens`` (V,): entry (i, v) is a
    function of (row key i, position, token v) only, so a row's noise is the same in any batch.
    A fixed number of elementwise ops over all rows at once on an accelerator; on the CPU, blocks
    of rows small enough for the cache (the values are the same either way)."""
    states = row_states(keys, position)  # (N,)
    n, vocab = states.shape[0], tokens.shape[0]
    block = n if states.device.type != "cpu" else max(1, CPU_BLOCK // vocab)
    out = torch.empty(n, vocab, dtype=torch.float32, device=states.device)
    for start in range(0, n, block):
        bits = _mix32(states[start:start + block, None] ^ tokens[None, :])  # (b, V) int32
        u = out[start:start + block]
        torch.mul((bits & 0xFFFFFF).clamp_(min=1), 2.0 ** -24, out=u)  # uniform on (0, 1), 24 bits as torch.rand's
        u.log_().neg_().log_().neg_()  # -log(-log(u))
    return out


class GumbelSampler(LogitsProcessor):
    """The last logits processor of a greedy ``generate``: scores / T + per-row Gumbel noise, so the
    greedy argmax is a sample from softmax(scores / T) (tokens other processors set to -inf stay
    impossible)."""

    def __init__(self, keys: Sequence[int], temperature: float, prompt_length: int):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
        self.keys, self.temperature, self.prompt_length = list(keys), float(temperature), int(prompt_length)
        self._on: dict = {}  # (device, vocab) -> (key words (N, 2), token counters (V,)), built on first use

    def _tensors(self, vocab: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        where = (str(device), vocab)
        if where not in self._on:
            self._on[where] = (key_words(self.keys, device), token_counters(vocab, device))
        return self._on[where]

    def noise(self, position: int, vocab: int, device: torch.device | str) -> torch.Tensor:
        keys, tokens = self._tensors(vocab, device)
        return gumbel_noise(keys, position, tokens)  # (N, V)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != len(self.keys):
            raise ValueError(f"{input_ids.shape[0]} rows to sample but {len(self.keys)} rollout keys")
        position = input_ids.shape[1] - self.prompt_length
        noise = self.noise(position, scores.shape[-1], scores.device)
        return scores.float() / self.temperature + noise
