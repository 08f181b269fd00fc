"""GRPO objective pieces against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from grto_cli.core.grpo import aggregate, clipped_surrogate, group_advantages, k3_kl, policy_loss
from grto_cli.core.metrics import LOSS_CLIP_FRAC, LOSS_KL, LOSS_POLICY, LOSS_RATIO_MEAN

# ----------------------------------------------------------------------------- advantages

# Three groups of 3: [0, 1, 2] (mean 1, population std sqrt(2/3)), a flat group, [4, 0, 2] (mean 2,
# population std sqrt(8/3)).
REWARDS = torch.tensor([0.0, 1.0, 2.0, 0.7, 0.7, 0.7, 4.0, 0.0, 2.0])


def test_advantages_hand_computed_eps0():
    adv, frac = group_advantages(REWARDS, 3, eps=0.0)
    # 1 / sqrt(2/3) = 2 / sqrt(8/3) = 1.2247449
    expected = [-1.2247449, 0.0, 1.2247449, 0.0, 0.0, 0.0, 1.2247449, -1.2247449, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert frac == pytest.approx(1 / 3)


def test_advantages_hand_computed_default_eps():
    adv, _ = group_advantages(REWARDS, 3)  # eps = 1e-4 added to the std
    # 1 / (sqrt(2/3) + 1e-4) = 1.2245949; 2 / (sqrt(8/3) + 1e-4) = 1.2246699
    expected = [-1.2245949, 0.0, 1.2245949, 0.0, 0.0, 0.0, 1.2246699, -1.2246699, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_flat_group_is_exactly_zero(dtype, eps):
    # In float64, mean([0.7] * 3) != 0.7 by one ulp, so (r - mean) / std would give +-1, not 0.
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=dtype)
    adv, frac = group_advantages(rewards, 3, eps=eps)
    assert torch.equal(adv, torch.zeros(9, dtype=dtype))
    assert not torch.isnan(adv).any()
    assert frac == 1.0


def test_a_near_flat_group_gets_near_zero_advantages_not_plus_minus_one():
    """Rewards that differ by far less than eps (a pixel of jitter in a continuous IoU): eps keeps
    them from being blown up to +-1 like a group that splits right from wrong."""
    jitter = torch.tensor([0.5, 0.5 + 1e-7, 0.5 - 1e-7, 0.5], dtype=torch.float64)
    split = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    adv, frac = group_advantages(torch.cat([jitter, split]), 4)
    assert frac == 0.0  # not flat: the rewards differ
    assert adv[:4].abs().max() < 1e-2, adv[:4].tolist()  # (r - mean) / (std + eps): about 1e-3 at most
    assert adv[4:].abs().tolist() == pytest.approx([1.0] * 4, abs=1e-3)
    # The group's order is kept: the higher reward still gets the higher advantage.
    assert adv[1] > adv[0] > adv[2]


def test_zero_std_fraction():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.2, 0.3])
    _, frac = group_advantages(rewards, 2)
    assert frac == 0.5  # groups [1, 1] and [0.5, 0.5] of four


def test_a_group_spread_below_the_minimum_carries_no_advantage():
    """``min_spread``: a group whose rewards differ by less gets 0 (and counts as flat); a group at
    or above it keeps its std-scaled advantages; the default (0) leaves near-flat groups as they are."""
    near = torch.tensor([0.50, 0.52, 0.49, 0.51])  # spread 0.03
    split = torch.tensor([0.0, 1.0, 0.0, 1.0])  # spread 1
    rewards = torch.cat([near, split])
    adv, frac = group_advantages(rewards, 4, min_spread=0.05)
    assert torch.equal(adv[:4], torch.zeros(4)) and frac == 0.5
    assert adv[4:].abs().tolist() == pytest.approx([1.0] * 4, abs=1e-3)
    plain, plain_frac = group_advantages(rewards, 4)
    assert plain_frac == 0.0 and plain[:4].abs().max() > 0.5  # std scaling blows the jitter up
    assert torch.equal(plain[4:], adv[4:])
    at, _ = group_advantages(rewards, 4, min_spread=0.03 - 1e-6)  # just under the spread: kept
    assert at[:4].abs().max() > 0.5
    with pytest.raises(ValueError, match="min_spread"):
        group_advantages(rewards, 4, min_spread=-0.1)


def test_dr_grpo_advantages_are_centred_only():
    adv, frac = group_advantages(REWARDS, 3, scale_by_std=False)
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0, -2.0, 0.0], abs=1e-6)
    assert frac == pytest.approx(1 / 3)


def test_group_of_one_gets_zero_advantage():
    adv, frac = group_advantages(torch.tensor([0.3, 0.9]), 1, eps=0.0)
    assert torch.equal(adv, torch.zeros(2)) and frac == 1.0


def test_advantages_reject_bad_group_size():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), 2)


# ----------------------------------------------------------------------------- clipped surrogate


def _reference_surrogate(ratio: float, adv: float, low: float, high: float) -> tuple[float, bool]:
    unclipped = ratio * adv
    clipped = min(max(ratio, 1 - low), 1 + high) * adv
    return -min(unclipped, clipped), clipped < unclipped


def _logps(ratios: list[list[float]], old: float = -1.3) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.tensor(ratios, dtype=torch.float64)
    return torch.log(r) + old, torch.full_like(r, old)


def test_clipped_surrogate_hand_cases():
    # seq 0 (A=+2): ratio 1.1 inside -> -2.2; ratio 1.5 above 1+eps -> clipped to 1.2*2 -> -2.4;
    #               ratio 0.5 below, A>0 -> min(1.0, 1.6) = 1.0 unclipped -> -1.0
    # seq 1 (A=-1): ratio 0.5 below 1-eps -> min(-0.5, -0.8) = -0.8 clipped -> 0.8;
    #               ratio 1.5 above, A<0 -> min(-1.5, -1.2) = -1.5 unclipped -> 1.5; last token masked
    logp, old = _logps([[1.1, 1.5, 0.5], [0.5, 1.5, 3.0]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, clipped = clipped_surrogate(logp, old, adv, mask, clip_low=0.2)
    assert loss.tolist()[0] == pytest.approx([-2.2, -2.4, -1.0], abs=1e-9)
    assert loss.tolist()[1] == pytest.approx([0.8, 1.5, 0.0], abs=1e-9)
    assert clipped.tolist() == [[False, True, False], [True, False, False]]


def test_clipped_surrogate_asymmetric_clip_high():
    logp, old = _logps([[1.5, 0.5]])
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 2),
                                      clip_low=0.2, clip_high=0.28)
    # 1.5 -> clipped at 1.28 * 2 = 2.56; 0.5 with A>0 is never clipped (min picks 0.5 * 2 = 1.0)
    assert loss.tolist()[0] == pytest.approx([-2.56, -1.0], abs=1e-9)
    assert clipped.tolist() == [[True, False]]


def test_clipped_surrogate_matches_elementwise_formula():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(6, 7, generator=g, dtype=torch.float64) * 0.4 - 2
    old = logp + torch.randn(6, 7, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 7, generator=g) > 0.3).long()
    loss, clipped = clipped_surrogate(logp, old, adv, mask, clip_low=0.2, clip_high=0.3)
    n_clipped = 0
    for i in range(6):
        for t in range(7):
            ratio = math.exp(float(logp[i, t] - old[i, t]))
            want, want_clip = _reference_surrogate(ratio, float(adv[i]), 0.2, 0.3)
            if not mask[i, t]:
                want, want_clip = 0.0, False
            assert float(loss[i, t]) == pytest.approx(want, abs=1e-12)
            assert bool(clipped[i, t]) == want_clip
            n_clipped += want_clip
    assert 0 < n_clipped < int(mask.sum())  # the case exercises both branches


# ----------------------------------------------------------------------------- k3


def test_k3_zero_when_equal_and_positive_otherwise():
    logp = torch.tensor([-0.3, -2.0, -7.5])
    assert torch.equal(k3_kl(logp, logp.clone()), torch.zeros(3))
    ref = logp + torch.tensor([1e-3, -0.5, 2.0])
    assert (k3_kl(logp, ref) > 0).all()


def test_k3_values():
    logp = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    # d = [-0.5, 1]: exp(-0.5) + 0.5 - 1 = 0.1065307, e - 2 = 0.7182818
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.10653066, 0.71828183], abs=1e-8)


# ----------------------------------------------------------------------------- aggregation

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("mode,expected", [
    ("sequence_mean", (1.5 + 4.0) / 2),  # per-sequence means 3/2 and 4/1
    ("token_mean", 7.0 / 3),  # 1 + 2 + 4 over 3 tokens
    ("dr_grpo", 7.0 / 6),  # over 2 sequences * 3 max tokens
])
def test_aggregate_hand_cases(mode, expected):
    assert float(aggregate(PER_TOKEN, MASK, mode)) == pytest.approx(expected)


def test_aggregate_explicit_normaliser_and_errors():
    assert float(aggregate(PER_TOKEN, MASK, "token_mean", normaliser=7.0)) == pytest.approx(1.0)
    assert float(aggregate(PER_TOKEN, MASK, "dr_grpo", normaliser=14.0)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        aggregate(PER_TOKEN, MASK, "mean")
    with pytest.raises(ValueError):
        aggregate(PER_TOKEN, MASK, "token_mean", normaliser=0)


def test_aggregate_all_masked_is_zero_not_nan():
    for mode in ("sequence_mean", "token_mean", "dr_grpo"):
        assert float(aggregate(PER_TOKEN, torch.zeros_like(MASK), mode)) == 0.0


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean", "dr_grpo"])
def test_gradient_accumulation_invariance(mode):
    g = torch.Generator().manual_seed(1)
    n, length = 5, 6
    values = torch.randn(n, length, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 3, 2, 5])  # unequal, so per-micro-batch normalisers would be wrong
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    normaliser = {"sequence_mean": n, "token_mean": float(mask.sum()), "dr_grpo": n * length}[mode]

    full_x = values.clone().requires_grad_(True)
    full = aggregate(full_x, mask, mode, normaliser)
    full.backward()

    micro_x = values.clone().requires_grad_(True)
    # Split 2 + 3 sequences; the second micro-batch is trimmed to its own longest completion, as a
    # collator padding per micro-batch would do; the constant Dr.GRPO normaliser must not care.
    first = aggregate(micro_x[:2], mask[:2], mode, normaliser)
    second = aggregate(micro_x[2:, :5], mask[2:, :5], mode, normaliser)
    (first + second).backward()

    assert float(first + second) == pytest.approx(float(full), abs=1e-12)
    assert torch.allclose(micro_x.grad, full_x.grad, atol=1e-12)
    # The test can fail: each micro-batch normalising by itself gives a different loss.
    naive = aggregate(values[:2], mask[:2], mode) + aggregate(values[2:, :5], mask[2:, :5], mode)
    assert float(naive) != pytest.approx(float(full), abs=1e-6)


# ----------------------------------------------------------------------------- policy loss


def _batch(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 3
    adv = torch.tensor([1.5, -0.5, 0.25], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    return logp, adv, mask


def test_policy_loss_without_reference():
    logp, adv, mask = _batch()
    out = policy_loss(logp, logp + 0.1, adv, mask, ref_logp=None, beta=0.0)
    assert out.stats[LOSS_KL] == 0.0
    assert out.stats[LOSS_RATIO_MEAN] == pytest.approx(math.exp(-0.1))
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError):
        policy_loss(logp, logp, adv, mask, ref_logp=None, beta=0.04)


def test_policy_loss_on_policy_gradient_is_minus_advantage_over_normaliser():
    logp, adv, mask = _batch()
    n_tokens = float(mask.sum())  # 9
    x = logp.clone().requires_grad_(True)
    # beta > 0 with ref == logp: k3 and its gradient are 0 at d = 0, so only the surrogate remains.
    out = policy_loss(x, logp.clone(), adv, mask, ref_logp=logp.clone(), beta=0.1, mode="token_mean")
    out.loss.backward()
    expected = torch.where(mask.bool(), -adv[:, None] / n_tokens, torch.zeros_like(logp))
    assert torch.allclose(x.grad, expected, atol=1e-12)
    assert x.grad[0, 0].item() == pytest.approx(-1.5 / 9)
    assert out.stats[LOSS_RATIO_MEAN] == pytest.approx(1.0)
    assert out.stats[LOSS_KL] == 0.0 and out.stats[LOSS_CLIP_FRAC] == 0.0
    # Loss value at ratio 1: -(sum over tokens of A) / 9 = -(3 * 1.5 - 2 * 0.5 + 4 * 0.25) / 9
    assert float(out.loss) == pytest.approx(-4.5 / 9)


def test_policy_loss_kl_term_and_stats():
    logp, adv, mask = _batch()
    ref = logp - 0.5  # d = -0.5 on every token
    out = policy_loss(logp, logp.clone(), adv, mask, ref_logp=ref, beta=0.2, mode="token_mean")
    k = math.exp(-0.5) + 0.5 - 1
    assert out.stats[LOSS_KL] == pytest.approx(k)
    assert float(out.loss) == pytest.approx(-4.5 / 9 + 0.2 * k)
    assert out.stats[LOSS_POLICY] == pytest.approx(-4.5 / 9)


def test_policy_loss_clip_fraction():
    # Two real tokens, one pushed past 1 + 0.2 with A > 0 (clipped), one inside; one padding token.
    logp, old = _logps([[1.5, 1.0, 9.0]])
    out = policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), torch.tensor([[1, 1, 0]]))
    assert out.stats[LOSS_CLIP_FRAC] == pytest.approx(0.5)
    assert float(out.loss) == pytest.approx(-(1.2 + 1.0) / 2)


def test_policy_loss_padding_garbage_gives_no_nan():
    logp, adv, mask = _batch()
    logp = logp.masked_fill(~mask.bool(), float("-inf"))
    x = logp.clone().requires_grad_(True)
    out = policy_loss(x, torch.zeros_like(logp), adv, mask, ref_logp=torch.zeros_like(logp), beta=0.1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    assert (x.grad[~mask.bool()] == 0).all()
