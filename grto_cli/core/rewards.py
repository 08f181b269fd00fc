"""Rewards for the rollouts of one query: format, mask IoU, and optional box / point terms.

r_i = w_format * format_ok + w_iou * IoU(mask_i, m*) + w_box * IoU(box_i, box*) + w_point * inside(points_i);
an unparsable answer gets -w_format_penalty and nothing else. Parse failures are rewards, never
exceptions. Boxes are [x1, y1, x2, y2] in pixel-edge coordinates, as ``masks.mask_bbox`` writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from grto_cli.core.answer import ParsedAnswer, ToolCall
from grto_cli.core.metrics import box_iou, points_inside


@dataclass
class RewardWeights:
    format: float = 0.5  # paid when the answer parses (ParsedAnswer.format_ok)
    format_penalty: float = 0.5  # subtracted when it does not
    iou: float = 1.0  # mask IoU of the tool's mask with ground truth
    box_iou: float = 0.0  # IoU of the answer's box with the ground-truth box
    point: float = 0.0  # fraction of the answer's points inside the ground-truth mask


@dataclass
class RewardBreakdown:
    total: torch.Tensor  # (N,) float32
    format_ok: torch.Tensor  # (N,) bool
    iou: torch.Tensor  # (N,) mask IoU, 0 for unparsable
    box_iou: torch.Tensor  # (N,)
    point: torch.Tensor  # (N,)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU (N,) of boolean masks pred (N, H, W) with target (H, W) or (N, H, W).

    Both empty counts as 1.0, as in ``metrics.sample_iou``: nothing to find and nothing found.
    """
    if pred.dtype != torch.bool or target.dtype != torch.bool:
        # Logits or probabilities here would silently count every nonzero pixel as foreground.
        raise TypeError(f"mask_iou needs bool masks (threshold logits with > 0), got {pred.dtype} and {target.dtype}")
    target = target.to(pred.device).expand_as(pred)
    inter = (pred & target).flatten(1).sum(1).float()
    union = (pred | target).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def _call_terms(call: ToolCall, iou: float, target_mask: torch.Tensor, target_box: Sequence[float],
                weights: RewardWeights) -> tuple[float, float, float]:
    """(total, box term, point term) of a parsed call."""
    b = box_iou(call.box, target_box) if call.box is not None else 0.0
    p = points_inside(call.points, target_mask)
    total = weights.format + weights.iou * iou + weights.box_iou * b + weights.point * p
    return total, b, p


def compute_rewards(parsed: Sequence[ParsedAnswer], pred_masks: torch.Tensor, target_mask: torch.Tensor,
                    target_box: Sequence[float], weights: RewardWeights) -> RewardBreakdown:
    """Rewards for the N rollouts of ONE query; ``pred_masks`` (N, H, W) bool is the tool's output.

    An unparsable answer (``call is None``) gets -format_penalty and every other term 0, whatever its
    mask holds.
    """
    if len(parsed) != pred_masks.shape[0]:
        raise ValueError(f"{len(parsed)} answers but {pred_masks.shape[0]} masks")
    if pred_masks.shape[-2:] != target_mask.shape[-2:]:
        raise ValueError(f"mask size {tuple(pred_masks.shape[-2:])} != target size {tuple(target_mask.shape[-2:])}")
    n = len(parsed)
    ious = mask_iou(pred_masks, target_mask).cpu() if n else torch.zeros(0)
    target_cpu = target_mask.cpu()
    total, ok, iou, box, point = (torch.zeros(n) for _ in range(5))
    for i, answer in enumerate(parsed):
        if answer.call is None:
            total[i] = -weights.format_penalty
            continue
        ok[i], iou[i] = 1.0, ious[i]
        total[i], box[i], point[i] = _call_terms(answer.call, float(ious[i]), target_cpu, target_box, weights)
    device = pred_masks.device
    return RewardBreakdown(total=total.to(device), format_ok=ok.bool().to(device), iou=iou.to(device),
                           box_iou=box.to(device), point=point.to(device))
