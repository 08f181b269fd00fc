"""Segmentation metrics as papers report them, and diagnostics that tell the policy's part from the tool's.

gIoU: mean of per-sample IoU. cIoU: total intersection over total union (large objects weigh more).
precision@k: fraction of samples with IoU > k. All in percent. A sample whose answer could not be
parsed counts with an empty prediction (IoU 0, its ground-truth area in cIoU's union); nothing is
skipped silently.

Policy and tool diagnostics (fractions in [0, 1], ``GroundingMeter``): does the policy's call point
at the target (``call_box_iou``, ``point_in_target``), does it answer differently for different
queries (``distinct_calls``), does the tool keep to the call it was given (``prompt_adherence``), and
how well does the tool do on ground-truth prompts for the same samples (``oracle_giou``, percent),
and how big are the call's boxes against the targets' (``call_box_area_ratio``, the median ratio).
A high gIoU with a low call box IoU and low adherence is a tool painting shapes whatever the box says;
high adherence with an area ratio well above 1 is a policy drawing loose boxes for the tool to fill
(a box over the whole image has adherence 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from grto_cli.core.answer import ToolCall

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)

# Names of the metrics logged per step (dvclive, run records, docs), namespaced by what they measure.
# rollout/: the sampled rollouts of a step; loss/: the policy objective; policy/, tool/: updates of
# each part; val/: the validation split during training; sft/: the embedded default's warm-up;
# perf/: cost of a step (wall clock and memory: they vary from run to run, unlike every other curve).
ROLLOUT_REWARD_MEAN = "rollout/reward_mean"
ROLLOUT_REWARD_STD = "rollout/reward_std"
ROLLOUT_FORMAT_RATE = "rollout/format_rate"
ROLLOUT_IOU = "rollout/iou"
ROLLOUT_ZERO_STD_GROUPS = "rollout/zero_std_groups"  # fraction of groups with equal rewards (no signal)
# fraction of groups given no advantage: equal rewards, or a spread below train.min_group_spread
ROLLOUT_FLAT_GROUPS = "rollout/flat_groups"
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
ROLLOUT_BOX_IOU = "rollout/box_iou"  # the policy's own localisation: its box against the target's
ROLLOUT_POINT_IN_TARGET = "rollout/point_in_target"
ROLLOUT_DISTINCT_CALLS = "rollout/distinct_calls"  # distinct calls / rollouts in the step
VAL_BOX_IOU = "val/box_iou"
VAL_POINT_IN_TARGET = "val/point_in_target"
VAL_DISTINCT_CALLS = "val/distinct_calls"  # distinct calls / queries
VAL_PROMPT_ADHERENCE = "val/prompt_adherence"
VAL_ORACLE_GIOU = "val/oracle_giou"
VAL_BOX_AREA_RATIO = "val/box_area_ratio"  # median of the call's box area over the target box's
SFT_LOSS = "sft/loss"
PERF_STEP_SECONDS = "perf/step_seconds"  # wall clock of one RL step (rollouts, policy update, tool update)
PERF_ROLLOUTS_PER_SECOND = "perf/rollouts_per_second"  # the global batch's rollouts over the step's seconds
PERF_PEAK_GPU_MEM_GIB = "perf/peak_gpu_mem_gib"  # CUDA only: the main process's peak allocated memory in the step


def box_area(box: Sequence[float]) -> float:
    """Area of an [x1, y1, x2, y2] box in pixel-edge coordinates; 0 for an empty or reversed one.

    >>> box_area([1, 1, 4, 3]), box_area([4, 1, 1, 3])
    (6.0, 0.0)
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def box_iou(box: Sequence[float], target_box: Sequence[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes in pixel-edge coordinates (area = (x2 - x1) * (y2 - y1)).

    >>> box_iou([0, 0, 4, 4], [2, 0, 6, 4])  # 8 shared of 24
    0.3333333333333333
    >>> box_iou([0, 0, 2, 2], [2, 2, 4, 4])  # touching corners share no area
    0.0
    """
    if not all(math.isfinite(float(v)) for v in (*box, *target_box)):
        return 0.0
    x1, y1, x2, y2 = (float(v) for v in box)
    tx1, ty1, tx2, ty2 = (float(v) for v in target_box)
    inter = max(0.0, min(x2, tx2) - max(x1, tx1)) * max(0.0, min(y2, ty2) - max(y1, ty1))
    union = box_area(box) + box_area(target_box) - inter
    if union <= 0:  # two empty boxes: a match only when they are the same box
        return 1.0 if tuple(map(float, box)) == tuple(map(float, target_box)) else 0.0
    return inter / union


def points_inside(points: Sequence[tuple[float, float]], mask) -> float:
    """Fraction of (x, y) points whose pixel mask[int(y), int(x)] (clamped to the image) is True; 0 for none.
    ``mask`` is a (H, W) boolean numpy array or torch tensor.

    >>> mask = np.zeros((4, 4), bool); mask[1:3, 1:3] = True
    >>> points_inside([(1.5, 1.5), (3.5, 0.2)], mask)
    0.5
    """
    if not points:
        return 0.0
    h, w = mask.shape[-2:]
    hits = 0
    for x, y in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            continue  # counts as outside
        # x == w is a legal pixel-edge coordinate (the parser allows it); it belongs to column w - 1.
        col, row = min(max(int(x), 0), w - 1), min(max(int(y), 0), h - 1)
        hits += bool(mask[row, col])
    return hits / len(points)


def call_box_iou(call: ToolCall | None, target_box: Sequence[float]) -> float:
    """The policy's own localisation: IoU of the call's box with the target's box; 0 with no box.

    >>> call_box_iou(ToolCall(box=(0, 0, 4, 4)), [0, 0, 4, 2])
    0.5
    >>> call_box_iou(None, [0, 0, 4, 2]), call_box_iou(ToolCall(points=((1, 1),)), [0, 0, 4, 2])
    (0.0, 0.0)
    """
    return box_iou(call.box, target_box) if call is not None and call.box is not None else 0.0


def box_area_ratio(call: ToolCall | None, target_box: Sequence[float]) -> float | None:
    """Area of the call's box over the target box's: 1 for a box of the target's size, above 1 for
    a looser one. None without a box or with a degenerate target box.

    >>> box_area_ratio(ToolCall(box=(0, 0, 4, 4)), [0, 0, 4, 2])
    2.0
    >>> box_area_ratio(ToolCall(points=((1, 1),)), [0, 0, 4, 2]) is None
    True
    """
    if call is None or call.box is None:
        return None
    target = box_area(target_box)
    return box_area(call.box) / target if target > 0 else None


def point_in_target(call: ToolCall | None, target: np.ndarray) -> float:
    """Share of the call's points that fall inside the target mask; 0 with no point (or no call).

    >>> target = np.zeros((4, 4), bool); target[:2] = True
    >>> point_in_target(ToolCall(points=((3.0, 1.0),)), target), point_in_target(None, target)
    (1.0, 0.0)
    """
    return points_inside(call.points, target) if call is not None else 0.0


def prompt_adherence(pred: np.ndarray, call: ToolCall | None) -> float | None:
    """Share of the predicted mask inside the call's box: does the tool keep to its prompt?
    None when there is no box or no predicted pixel (nothing to adhere, or nothing to judge).

    >>> pred = np.zeros((4, 8), bool); pred[:, :4] = True  # 16 pixels, left half
    >>> prompt_adherence(pred, ToolCall(box=(0, 0, 2, 4)))  # 8 of them inside the box
    0.5
    >>> prompt_adherence(pred, ToolCall(points=((1, 1),))) is None
    True
    """
    if call is None or call.box is None or not pred.any():
        return None
    x1, y1, x2, y2 = call.box
    h, w = pred.shape
    inside = np.zeros_like(pred)
    inside[max(0, math.floor(y1)):min(h, math.ceil(y2)), max(0, math.floor(x1)):min(w, math.ceil(x2))] = True
    return float((pred & inside).sum() / pred.sum())


def call_key(call: ToolCall | None) -> tuple | None:
    """A call at whole-pixel resolution, to count distinct answers (None stays None).

    >>> call_key(ToolCall(box=(1.2, 2.0, 9.7, 8.0), points=((4.4, 5.0),)))
    ((1, 2, 10, 8), ((4, 5),))
    """
    if call is None:
        return None
    box = tuple(round(v) for v in call.box) if call.box is not None else None
    return box, tuple((round(x), round(y)) for x, y in call.points)


def distinct_calls(calls: Sequence[ToolCall | None]) -> int:
    """How many different calls (at whole pixels) a set of answers holds; unparsable ones not counted.

    >>> same = ToolCall(box=(1, 1, 5, 5))
    >>> distinct_calls([same, same, ToolCall(box=(1, 1, 5, 6)), None])
    2
    """
    return len({call_key(c) for c in calls if c is not None})


@dataclass
class GroundingMeter:
    """Accumulates the policy and tool diagnostics of each sample (see the module docstring).

    Every sample with a target counts in the policy terms (an unparsable answer scores 0); an
    empty-target sample has no box to find and counts only in the oracle (no prompt: an empty
    mask). Adherence is averaged over the samples that have a box and a predicted mask
    (``prompt_adherence_n``), the area ratio is the median over the samples whose call has a box;
    the oracle is the tool's IoU on the ground-truth box and an interior point of the same sample.
    """

    box_ious: list[float] = field(default_factory=list)
    point_hits: list[float] = field(default_factory=list)
    adherence: list[float] = field(default_factory=list)
    area_ratios: list[float] = field(default_factory=list)
    keys: list[tuple | None] = field(default_factory=list)
    oracle: SegmentationMeter = field(default_factory=lambda: SegmentationMeter())

    def add(self, call: ToolCall | None, pred: np.ndarray, target: np.ndarray, target_box: Sequence[float],
            oracle_pred: np.ndarray | None = None) -> None:
        if oracle_pred is not None:
            self.oracle.add(oracle_pred, target)
        if not target.any():  # an empty target: no box or region to localise, nothing to adhere to
            return
        self.box_ious.append(call_box_iou(call, target_box))
        self.point_hits.append(point_in_target(call, target))
        a = prompt_adherence(pred, call)
        if a is not None:
            self.adherence.append(a)
        ratio = box_area_ratio(call, target_box)
        if ratio is not None:
            self.area_ratios.append(ratio)
        self.keys.append(call_key(call))

    def summary(self) -> dict:
        n = len(self.box_ious)
        distinct = len({k for k in self.keys if k is not None})
        out = {"call_box_iou": float(np.mean(self.box_ious)) if n else 0.0,
               "point_in_target": float(np.mean(self.point_hits)) if n else 0.0,
               "distinct_calls": distinct, "distinct_call_ratio": distinct / n if n else 0.0,
               "prompt_adherence": float(np.mean(self.adherence)) if self.adherence else None,
               "prompt_adherence_n": len(self.adherence),
               "call_box_area_ratio": float(np.median(self.area_ratios)) if self.area_ratios else None}
        if self.oracle.intersections:
            out["oracle_giou"] = self.oracle.summary()["giou"]
        return out


def val_metrics(summary: dict) -> dict:
    """The val curves of training (``val/...``) from a split's summary (``evaluation.SplitScore``):
    the same numbers `grto evaluate` reports for that split."""
    val = {VAL_GIOU: summary["giou"], VAL_CIOU: summary["ciou"], VAL_FORMAT_RATE: summary["format_rate"],
           VAL_BOX_IOU: summary["call_box_iou"], VAL_POINT_IN_TARGET: summary["point_in_target"],
           VAL_DISTINCT_CALLS: summary["distinct_call_ratio"], VAL_ORACLE_GIOU: summary.get("oracle_giou", 0.0)}
    if summary["prompt_adherence"] is not None:
        val[VAL_PROMPT_ADHERENCE] = summary["prompt_adherence"]
    if summary["call_box_area_ratio"] is not None:
        val[VAL_BOX_AREA_RATIO] = summary["call_box_area_ratio"]
    return val


def by_group(groups: Sequence[str | None], **values: Sequence[float]) -> dict[str, dict[str, float]]:
    """Per-group means of each named per-sample value, with each group's sample count ``n``; samples
    whose group is None are left out. Groups come out sorted by name.

    A mean over mixed query kinds hides a policy that gets better on one kind and worse on another:
    on the embedded default RL raised "the red circle" queries while "the largest ..." fell.

    >>> by_group(["a", "b", "a", None], hit=[1.0, 0.0, 0.0, 1.0])
    {'a': {'n': 2, 'hit': 0.5}, 'b': {'n': 1, 'hit': 0.0}}
    """
    for name, v in values.items():
        if len(v) != len(groups):
            raise ValueError(f"{name}: {len(v)} values for {len(groups)} samples")
    out: dict[str, dict[str, float]] = {}
    for g in sorted({g for g in groups if g is not None}):
        idx = [i for i, x in enumerate(groups) if x == g]
        out[g] = {"n": len(idx), **{name: float(np.mean([v[i] for i in idx])) for name, v in values.items()}}
    return out


def sample_iou(intersection: int, union: int) -> float:
    # Both masks empty: nothing to find and nothing found counts as a perfect match.
    return 1.0 if union == 0 else intersection / union


@dataclass
class SegmentationMeter:
    """Accumulates per-sample intersections/unions and answer-format outcomes."""

    intersections: list[int] = field(default_factory=list)
    unions: list[int] = field(default_factory=list)
    format_ok: list[bool] = field(default_factory=list)
    empty_targets: int = 0

    def add(self, pred: np.ndarray, target: np.ndarray, format_ok: bool = True) -> float:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
        self.empty_targets += int(not target.any())
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
            "n_empty_targets": self.empty_targets,  # scored by sample_iou's rule: 1 when nothing is predicted
        }
        for t in PRECISION_THRESHOLDS:
            out[f"precision@{t}"] = 100.0 * float((ious > t).mean())
        return out
