"""Scoring a split: the one place `grto evaluate` and val during training get their numbers from.

Ignore pixels (ReasonSeg's "ignore" shapes, a record's ``meta["ignore"]``) are removed from the
target, the prediction and the oracle's prediction before anything is counted, so the val gIoU a
run selects its checkpoint by is the gIoU `grto evaluate` reports on the same records.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from grto_cli.core.data.masks import decode_rle
from grto_cli.core.data.records import QUERY_KIND, Record
from grto_cli.core.distributed import Processes
from grto_cli.core.inference import Prediction, predict_records
from grto_cli.core.metrics import GroundingMeter, SegmentationMeter, by_group, call_box_iou, point_in_target
from grto_cli.core.policy import Generating, Policy
from grto_cli.core.tool import Tool

CAMOUFLAGE_DATASETS = {"cod10k", "nc4k"}


@dataclass
class Scored:
    """One prediction as it was counted: pixels after ignore regions are removed."""

    prediction: Prediction
    target: np.ndarray  # (H, W) bool
    mask: np.ndarray  # (H, W) bool
    iou: float
    intersection: int
    union: int
    call_box_iou: float
    point_in_target: float


def scored_pixels(pred: Prediction) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Ground truth, prediction and oracle prediction with the record's ignore pixels removed."""
    target, mask, oracle = pred.record.decode_mask(), pred.mask, pred.oracle
    ignore = pred.record.meta.get("ignore")
    if ignore:
        keep = ~decode_rle(ignore)
        target, mask = target & keep, mask & keep
        oracle = oracle & keep if oracle is not None else None
    return target, mask, oracle


class SplitScore:
    """Every metric of a split, one prediction at a time: segmentation (gIoU, cIoU, precision@k,
    format rate), the policy / tool diagnostics, camouflage measures for COD sets, parse statuses
    and, where records name a query kind, the means per kind."""

    def __init__(self, records: Sequence[Record]):
        self.meter, self.grounding = SegmentationMeter(), GroundingMeter()
        self.camouflage = None
        if any(r.dataset in CAMOUFLAGE_DATASETS for r in records):
            from grto_cli.core.cod_metrics import CamouflageMeter

            self.camouflage = CamouflageMeter()
        self.statuses: Counter = Counter()
        self.kinds: list[str | None] = []
        self.gious: list[float] = []
        self.box_ious: list[float] = []
        self.points: list[float] = []

    def add(self, pred: Prediction) -> Scored:
        target, mask, oracle = scored_pixels(pred)
        call = pred.parsed.call
        iou = self.meter.add(mask, target, pred.parsed.format_ok)
        self.grounding.add(call, mask, target, pred.record.bbox, oracle)
        if self.camouflage is not None:
            self.camouflage.add((pred.probability * 255).round().astype(np.uint8), target)
        self.statuses[pred.parsed.status] += 1
        self.kinds.append(pred.record.meta.get(QUERY_KIND))
        self.gious.append(100 * iou)
        self.box_ious.append(call_box_iou(call, pred.record.bbox))
        self.points.append(point_in_target(call, target))
        return Scored(pred, target, mask, iou, self.meter.intersections[-1], self.meter.unions[-1], self.box_ious[-1],
                      self.points[-1])

    def summary(self) -> dict:
        metrics = {**self.meter.summary(), **self.grounding.summary(), "parse_status": dict(self.statuses)}
        if self.camouflage is not None:
            metrics.update(self.camouflage.summary())
        if any(k is not None for k in self.kinds):  # where the policy is right or wrong, kind by kind
            metrics["by_query_kind"] = by_group(self.kinds, giou=self.gious, call_box_iou=self.box_ious,
                                                point_in_target=self.points)
        return metrics


def evaluate_split(policy: Policy, tool: Tool, records: Sequence[Record], root: Path, batch_size: int,
                   max_new_tokens: int, require_think: bool = False, processes: Processes | None = None,
                   generating: Generating | None = None,
                   each: Callable[[Scored], None] | None = None) -> dict:
    """Greedy predictions for ``records`` (with the tool on each record's ground-truth prompt, for the
    oracle gIoU), scored in record order; ``each(scored)`` sees every prediction as it is counted."""
    score = SplitScore(records)
    for pred in predict_records(policy, tool, records, root, batch_size, max_new_tokens, require_think, oracle=True,
                                processes=processes, generating=generating):
        scored = score.add(pred)
        if each is not None:
            each(scored)
    return score.summary()
