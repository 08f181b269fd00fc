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
