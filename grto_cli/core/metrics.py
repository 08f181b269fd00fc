"""Segmentation metrics as papers report them.

gIoU: mean of per-sample IoU. cIoU: total intersection over total union (large objects weigh more).
precision@k: fraction of samples with IoU > k. All in percent. A sample whose answer could not be
parsed counts with an empty prediction (IoU 0, its ground-truth area in cIoU's union); nothing is
skipped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)

# Names of the metrics logged per step (dvclive, run records, docs), namespaced by what they measure.
# rollout/: the sampled rollouts of a step; loss/: the policy objective; policy/, tool/: updates of
# each part; val/: the validation split during training; sft/: the embedded default's warm-up.
ROLLOUT_REWARD_MEAN = "rollout/reward_mean"
ROLLOUT_REWARD_STD = "rollout/reward_std"
ROLLOUT_FORMAT_RATE = "rollout/format_rate"
ROLLOUT_IOU = "rollout/iou"
ROLLOUT_ZERO_STD_GROUPS = "rollout/zero_std_groups"  # fraction of groups with equal rewards (no signal)
ROLLOUT_COMPLETION_TOKENS = "rollout/completion_tokens"
LOSS_TOTAL = "loss/total"  # surrogate + beta * KL: what is back-propagated
LOSS_POLICY = "loss/policy"  # the clipped surrogate alone
LOSS_KL = "loss/kl"
LOSS_CLIP_FRAC = "loss/clip_frac"
LOSS_RATIO_MEAN = "loss/ratio_mean"
POLICY_GRAD_NORM = "policy/grad_norm"
TOOL_LOSS = "tool/loss"
TOOL_VALID_ROLLOUTS = "tool/valid_rollouts"
VAL_GIOU = "val/giou"
VAL_CIOU = "val/ciou"
VAL_FORMAT_RATE = "val/format_rate"
SFT_LOSS = "sft/loss"


def sample_iou(intersection: int, union: int) -> float:
    # Both masks empty: nothing to find and nothing found counts as a perfect match.
    return 1.0 if union == 0 else intersection / union


@dataclass
class SegmentationMeter:
    """Accumulates per-sample intersections/unions and answer-format outcomes."""

    intersections: list[int] = field(default_factory=list)
    unions: list[int] = field(default_factory=list)
    format_ok: list[bool] = field(default_factory=list)

    def add(self, pred: np.ndarray, target: np.ndarray, format_ok: bool = True) -> float:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
        inter = int(np.logical_and(pred, target).sum())
        union = int(np.logical_or(pred, target).sum())
        self.intersections.append(inter)
        self.unions.append(union)
        self.format_ok.append(bool(format_ok))
        return sample_iou(inter, union)

    def summary(self) -> dict:
        n = len(self.intersections)
        if n == 0:
            return {"n": 0, "giou": 0.0, "ciou": 0.0, "format_rate": 0.0,
                    **{f"precision@{t}": 0.0 for t in PRECISION_THRESHOLDS}}
        ious = np.array([sample_iou(i, u) for i, u in zip(self.intersections, self.unions)])
        total_union = sum(self.unions)
        out = {
            "n": n,
            "giou": 100.0 * float(ious.mean()),
            "ciou": 100.0 * (sum(self.intersections) / total_union if total_union else 1.0),
            "format_rate": 100.0 * float(np.mean(self.format_ok)),
            "n_unparsed": int(n - sum(self.format_ok)),
        }
        for t in PRECISION_THRESHOLDS:
            out[f"precision@{t}"] = 100.0 * float((ious > t).mean())
        return out
