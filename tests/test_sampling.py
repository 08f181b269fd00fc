"""Sampling noise belongs to the rollout: the same group draws the same completions alone, beside
other groups or in another order, and the draws follow softmax(logits / T)."""

import numpy as np
import pytest
import torch

from grto_cli.core.data.images import load_rgb
from grto_cli.core.data.records import read_manifest
from grto_cli.core.policy import load_policy
from grto_cli.core.rollout import SamplingParams, sample_completions
from grto_cli.core import sampling
from grto_cli.core.sampling import GumbelSampler, rollout_key, row_keys


def test_a_groups_completions_do_not_depend_on_what_else_is_generated(tiny_system, synthetic_data):
    policy = load_policy(tiny_system / "policy", prompt_template="Locate: {query}.")
    records, _ = read_manifest(synthetic_data / "train.jsonl")
    records = records[:3]
    images = [load_rgb(r.image_path(synthetic_data)) for r in records]
    queries = [r.query for r in records]
    assert len({len(q) for q in queries}) > 1  # prompts of different lengths: padding differs by batch
    sampling = SamplingParams(group_size=4, temperature=1.0, max_new_tokens=12)
    keys = [rollout_key(0, 5, g) for g in range(3)]

    _, together, _, _, _ = sample_completions(policy, images, queries, sampling, keys)  # (12, L)
    groups = together.view(3, 4, -1)
    assert len({tuple(row) for row in together.tolist()}) > 3  # really sampled
    for g in range(3):  # alone (as on another process, which generates only its own groups)
        _, alone, _, _, _ = sample_completions(policy, images[g:g + 1], queries[g:g + 1], sampling, keys[g:g + 1])
        assert torch.equal(_trim(alone), _trim(groups[g]))
    order = [2, 0, 1]  # another order, other neighbours
    _, shuffled, _, _, _ = sample_completions(policy, [images[i] for i in order], [queries[i] for i in order],
                                              sampling, [keys[i] for i in order])
    for pos, g in enumerate(order):
        assert torch.equal(_trim(shuffled.view(3, 4, -1)[pos]), _trim(groups[g]))
    # Another key is another draw.
    _, other, _, _, _ = sample_completions(policy, images[:1], queries[:1], sampling, [rollout_key(0, 6, 0)])
    assert not torch.equal(_trim(other), _trim(groups[0]))


def _trim(ids: torch.Tensor) -> torch.Tensor:
    """Completions less the all-padding columns a longer batch-mate added at the end."""
    return ids[:, :12]


def test_draws_follow_softmax_of_logits_over_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, float("-inf")])
    temperature = 0.7
    n = 20000
    sampler = GumbelSampler(range(n), temperature, prompt_length=3)
    scores = sampler(torch.zeros(n, 3, dtype=torch.long), logits.expand(n, -1).clone())  # position 0
    counts = np.bincount(scores.argmax(-1).numpy(), minlength=len(logits)) / n
    expected = torch.softmax(logits / temperature, -1).numpy()
    assert counts[-1] == 0  # a suppressed token is never drawn
    # 20000 draws: each frequency's standard error is < 0.0036; 0.015 is over four of them.
    assert np.abs(counts - expected).max() < 0.015, (counts, expected)
    # The next position is a fresh draw for the same rows.
    later = sampler(torch.zeros(n, 4, dtype=torch.long), logits.expand(n, -1).clone())
    assert (later.argmax(-1) != scores.argmax(-1)).float().mean() > 0.2


def _lowbias32(x: int) -> int:
    """The hash in exact integer arithmetic (the reference the int32 tensor version must equal)."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_the_hash_is_exact_integer_arithmetic_on_int32_tensors():
    """int32 multiplication must wrap modulo 2^32 and every right shift act as a logical one (the
    sign bit never smeared into the word): checked against Python's integers over the whole range."""
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (4000,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    words = torch.cat([words, torch.tensor([0, -1, -2 ** 31, 2 ** 31 - 1], dtype=torch.int32)])
    kept = words.clone()
    got = sampling._mix32(words)
    assert torch.equal(words, kept)  # the caller's tensor is never written
    assert [g & 0xFFFFFFFF for g in got.tolist()] == [_lowbias32(w & 0xFFFFFFFF) for w in words.tolist()]


@pytest.mark.parametrize("vocab", [1200, sampling.CPU_BLOCK + 37])
def test_a_rows_noise_is_a_function_of_its_key_position_and_token_only(vocab):
    """Alone or beside other rows, in any order, whatever block of rows the CPU hashes it in: the
    same bits. Another position or another key is another draw."""
    keys = row_keys([rollout_key(0, 1, g) for g in range(5)], 3)  # 15 rows
    together = GumbelSampler(keys, 1.0, 0).noise(4, vocab, "cpu")  # (15, V)
    for i in (0, 7, 14):
        assert torch.equal(GumbelSampler(keys[i:i + 1], 1.0, 0).noise(4, vocab, "cpu")[0], together[i])
    order = list(reversed(range(len(keys))))
    assert torch.equal(GumbelSampler([keys[i] for i in order], 1.0, 0).noise(4, vocab, "cpu"), together[order])
    later = GumbelSampler(keys, 1.0, 0).noise(5, vocab, "cpu")
    assert (later != together).float().mean() > 0.99
    assert (together[0] != together[1]).float().mean() > 0.99


def test_the_noise_is_standard_gumbel_and_uncorrelated_across_rows_positions_and_tokens():
    keys = row_keys([rollout_key(3, g) for g in range(4)], 8)  # 32 rows, as 4 groups of 8
    sampler = GumbelSampler(keys, 1.0, 0)
    noise = sampler.noise(2, 50000, "cpu")  # (32, V): 1.6M draws
    assert torch.isfinite(noise).all()
    assert noise.mean().item() == pytest.approx(np.euler_gamma, abs=0.005)
    assert noise.var().item() == pytest.approx(np.pi ** 2 / 6, abs=0.01)
    # Rows of one group (keys that differ in their last part), the next position, neighbouring tokens.
    pairs = [(noise[0], noise[1]), (noise[0], sampler.noise(3, 50000, "cpu")[0]), (noise[0, :-1], noise[0, 1:])]
    for a, b in pairs:
        assert abs(np.corrcoef(a.numpy(), b.numpy())[0, 1]) < 0.02  # 50,000 pairs: the standard error is 0.0045


def test_the_draws_are_pinned():
    """A few draws written down: a change to the hash, the key split or the uniform's bits changes
    every completion a run samples (docs/method.md, "Sampling" says so), so it must be deliberate."""
    noise = GumbelSampler([rollout_key(1, 2), rollout_key(3, 4)], 1.0, 0).noise(5, 1200, "cpu")
    got = noise[:, [0, 1, 1199]].flatten().tolist()
    assert got == pytest.approx(PINNED, abs=1e-5), got


PINNED = [-0.17553, 0.576999, 0.971087, -0.003741, 2.902877, 0.459673]  # rows x tokens 0, 1, 1199


def test_the_noise_costs_the_same_ops_for_any_number_of_rows():
    """On an accelerator (here the meta device, which runs the same code with no data) the noise
    is the same handful of tensor ops for 4 rows or 256: no per-row loop, no per-row generator."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (4, 256):
        sampler = GumbelSampler(range(n), 1.0, 0)
        sampler.noise(0, 151936, "meta")  # the key and token tensors are built once per sampler
        with Count() as count:
            sampler.noise(1, 151936, "meta")
        counts.append(count.ops)
    assert counts[0] == counts[1] < 100, counts  # 62 today, most of them on (N,) or (V,) tensors
