"""Sampling noise belongs to the rollout: the same group draws the same completions alone, beside
other groups or in another order, and the draws follow softmax(logits / T)."""

import numpy as np
import torch

from grto_cli.core.data.images import load_rgb
from grto_cli.core.data.records import read_manifest
from grto_cli.core.policy import load_policy
from grto_cli.core.rollout import SamplingParams, sample_completions
from grto_cli.core.sampling import GumbelSampler, rollout_key


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
