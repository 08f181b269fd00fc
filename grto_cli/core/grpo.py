"""GRPO's policy objective: group-relative advantages, the clipped surrogate, k3 KL, loss aggregation.

Shapes: N rollouts (sequences) by L completion tokens. ``mask`` is 1 for completion tokens up to and
including the first EOS (see ``policy.completion_mask``), 0 after. Everything here is pure tensor
math so the training loop can be checked against hand-computed numbers.

Standard deviation convention: **population** std (``unbiased=False``, divide by G). TRL uses the
unbiased estimate (divide by G - 1); the two differ by sqrt(G / (G - 1)), a constant per group size
that a learning rate absorbs. Population std is defined for G = 1 (giving advantage 0) where the
unbiased one is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grto_cli.core.metrics import LOSS_CLIP_FRAC, LOSS_KL, LOSS_POLICY, LOSS_RATIO_MEAN, LOSS_TOTAL

AGGREGATION_MODES = ("sequence_mean", "token_mean", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4, min_spread: float = 0.0) -> tuple[torch.Tensor, float]:
    """Advantages (N,) from rewards (N,) laid out as contiguous groups of ``group_size``.

    ``A_i = (r_i - mean_g) / (std_g + eps)`` with population std, or ``r_i - mean_g`` (Dr.GRPO)
    when ``scale_by_std`` is False. A group whose rewards are all equal, or whose spread
    (max - min) is below ``min_spread``, gets advantage 0: with continuous rewards, std scaling
    would otherwise give a group that differs by a pixel of jitter the same +-1 weights as a group
    that splits a right answer from a wrong one. Returns the advantages and the fraction of such
    groups (they carry no learning signal; a high fraction means wasted rollouts).

    >>> adv, flat = group_advantages(torch.tensor([0.50, 0.51, 0.0, 1.0]), 2, min_spread=0.05)
    >>> adv.tolist(), flat
    ([0.0, 0.0, -0.9998000264167786, 0.9998000264167786], 0.5)
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if min_spread < 0:
        raise ValueError(f"min_spread must be >= 0, got {min_spread}")
    groups = rewards.detach().double().view(-1, group_size)
    # Test equality directly, not std == 0: the float mean of equal values can differ from them by
    # one ulp, which with eps = 0 would turn a no-signal group into advantages of +-1.
    spread = groups.amax(dim=1) - groups.amin(dim=1)  # (groups,)
    flat = (spread == 0) | (spread < min_spread)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = groups.std(dim=1, unbiased=False, keepdim=True)
        centred = centred / torch.where(flat[:, None], torch.ones_like(std), std + eps)
    advantages = torch.where(flat[:, None], torch.zeros_like(centred), centred).view(-1)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return advantages.to(out_dtype), float(flat.float().mean()) if flat.numel() else 0.0


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Elementwise k3 estimate of KL(pi || ref): with d = ref_logp - logp, exp(d) - d - 1.

    ``expm1`` keeps precision for small d (and is exactly 0 at d = 0); the clamp only removes
    rounding below zero, the true value is never negative.
    """
    d = ref_logp - logp
    return (torch.expm1(d) - d).clamp_min(0.0)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip_low: float = 0.2, clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO/GRPO clipped loss (N, L) and where the clip was active (N, L) bool.

    loss = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A), ratio = exp(logp - old_logp);
    ``clip_high`` None means symmetric clipping. Masked tokens give 0 and are never flagged.
    """
    clip_high = clip_low if clip_high is None else clip_high
    keep = mask.bool()
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.detach()[:, None].to(ratio.dtype)
    unclipped = ratio * adv
    clipped_obj = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    objective = torch.minimum(unclipped, clipped_obj)
    # The clipped branch is the active min and changes the value: those tokens get no gradient.
    clipped = (clipped_obj < unclipped) & keep
    per_token = torch.where(keep, -objective, torch.zeros_like(objective))
    return per_token, clipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, normaliser: float | None = None) -> torch.Tensor:
    """Reduce per-token losses (N, L) to a scalar.

    - ``sequence_mean`` (GRPO paper): sum over sequences of each one's token mean, / number of sequences.
    - ``token_mean`` (DAPO): sum of all tokens / number of tokens.
    - ``dr_grpo`` (Dr.GRPO): sum of all tokens / (number of sequences * max completion length).

    ``normaliser`` is the denominator for the WHOLE optimisation batch (all micro-batches, all ranks),
    so that under gradient accumulation the sum of micro-batch losses is the full-batch loss in every
    mode; dividing each micro-batch by its own count would weigh tokens unequally. The default is
    this tensor's own count (one micro-batch is the whole batch).
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGGREGATION_MODES}")
    m = mask.to(per_token.dtype)
    masked = per_token * m
    n_seq, length = per_token.shape
    if mode == "sequence_mean":
        total = (masked.sum(dim=1) / m.sum(dim=1).clamp_min(1.0)).sum()  # a 0-token sequence adds 0
        default = float(n_seq)
    elif mode == "token_mean":
        total, default = masked.sum(), float(m.sum())
    else:
        total, default = masked.sum(), float(n_seq * length)
    if normaliser is None:
        return total / max(default, 1.0)  # an all-masked batch gives 0, not NaN
    if normaliser <= 0:
        raise ValueError(f"normaliser must be positive, got {normaliser}")
    return total / float(normaliser)


def batch_normaliser(mask: torch.Tensor, mode: str, max_new_tokens: int) -> float:
    """``aggregate``'s denominator for a whole optimisation batch of completion masks (N, L): its
    token count (token_mean), its sequence count (sequence_mean), or N * max_new_tokens (dr_grpo).
    Computed once per batch and passed to every micro-batch's loss."""
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGGREGATION_MODES}")
    n = mask.shape[0]
    return {"token_mean": float(mask.sum()), "sequence_mean": float(n),
            "dr_grpo": float(n * max_new_tokens)}[mode]


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, what to backward
    stats: dict[str, float]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(x.dtype)
    return float((x * m).sum() / m.sum().clamp_min(1.0))


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                ref_logp: torch.Tensor | None = None, beta: float = 0.0, clip_low: float = 0.2,
                clip_high: float | None = None, mode: str = "token_mean",
                normaliser: float | None = None) -> PolicyLossOutput:
    """Clipped surrogate + beta * k3 KL to the reference, aggregated with ``aggregate``.

    With ``beta == 0`` the reference is not needed (pass None and skip its forward pass).
    ``old_logp``, ``ref_logp`` and ``advantages`` are treated as constants.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"shape mismatch: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, "
                         f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the frozen reference's log-probs)")
    keep = mask.bool()
    # Zero the padding before exp(): garbage there (e.g. -inf log-probs) would give NaN gradients
    # even though the loss masks it out.
    zero = torch.zeros_like(logp)
    logp = torch.where(keep, logp, zero)
    old_logp = torch.where(keep, old_logp.detach(), zero)
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, mask, clip_low, clip_high)
    per_token, kl = surrogate, None
    if beta > 0:
        kl = k3_kl(logp, torch.where(keep, ref_logp.detach(), zero))  # type: ignore[union-attr]
        per_token = surrogate + beta * torch.where(keep, kl, zero)
    loss = aggregate(per_token, mask, mode, normaliser)
    with torch.no_grad():
        stats = {
            LOSS_TOTAL: float(loss),
            LOSS_POLICY: float(aggregate(surrogate, mask, mode, normaliser)),
            LOSS_KL: _masked_mean(kl, mask) if kl is not None else 0.0,
            LOSS_CLIP_FRAC: _masked_mean(clipped.to(logp.dtype), mask),
            LOSS_RATIO_MEAN: _masked_mean(torch.exp(logp - old_logp), mask),
        }
    return PolicyLossOutput(loss=loss, stats=stats)
