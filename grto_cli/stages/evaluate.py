"""`grto evaluate`: policy -> parse -> tool -> mask on a split; metrics, predictions, overlays."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from grto_cli.core.checkpoint import system_paths
from grto_cli.core.config import check_choice
from grto_cli.core.data.masks import decode_rle, encode_rle
from grto_cli.core.data.records import QUERY_KIND, read_manifest
from grto_cli.core.inference import Prediction, predict_records
from grto_cli.core.io import write_json, write_jsonl
from grto_cli.core.metrics import GroundingMeter, SegmentationMeter, by_group, call_box_iou, point_in_target
from grto_cli.core.visualize import overlay_sheet
from grto_cli.stages.common import (console, join_processes, policy_params, progress_bar, quiet_transformers,
                                    set_threads, stage_config, summary_table, tool_params, write_run_record)
from grto_cli.stages.system import load_stage_system

CAMOUFLAGE_DATASETS = {"cod10k", "nc4k"}


@dataclass
class EvaluateConfig:
    data: str = "data/prepared/synthetic"
    split: str = "testA"
    checkpoint: str | None = "models/base"
    policy: str | None = None  # path or hub id; overrides <checkpoint>/policy
    tool: str | None = None  # SAM file or dir; overrides <checkpoint>/tool
    tool_arch: str | None = None  # vit_b | vit_l | vit_h for Meta's bare .pth files
    out: str | None = None  # metrics JSON; default results/<checkpoint name>/<split>/metrics.json
    batch_size: int = 32
    max_new_tokens: int = 48
    limit: int | None = None  # evaluate only the first N records (quick looks; never for reported numbers)
    n_visual: int = 8
    on_bad_record: str = "fail"  # fail | skip

    def validate(self) -> None:
        check_choice("on_bad_record", self.on_bad_record, ("fail", "skip"))


def _target_and_preds(pred: Prediction) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Ground truth, prediction and oracle prediction with ignore pixels (ReasonSeg's "ignore"
    shapes) removed from all of them."""
    target, mask, oracle = pred.record.decode_mask(), pred.mask, pred.oracle
    ignore = pred.record.meta.get("ignore")
    if ignore:
        keep = ~decode_rle(ignore)
        target, mask = target & keep, mask & keep
        oracle = oracle & keep if oracle is not None else None
    return target, mask, oracle


def _camouflage_meter(records):
    if not any(r.dataset in CAMOUFLAGE_DATASETS for r in records):
        return None
    from grto_cli.core.cod_metrics import CamouflageMeter

    return CamouflageMeter()


def default_out(cfg: EvaluateConfig) -> Path:
    name = Path(cfg.checkpoint).name if cfg.checkpoint else "model"
    return Path("results") / name / cfg.split / "metrics.json"


def run(params: str | None, overrides: list[str] | None = None, **explicit) -> dict:
    cfg = stage_config(EvaluateConfig, params, "evaluate", overrides, **explicit)
    pol_cfg = policy_params(params, overrides)
    tool_cfg = tool_params(params, overrides)
    set_threads()
    quiet_transformers()
    processes = join_processes(pol_cfg.device)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    manifest = Path(cfg.data) / f"{cfg.split}.jsonl"
    records, report = read_manifest(manifest, on_error=cfg.on_bad_record)
    if cfg.limit:
        records = records[:cfg.limit]
    paths = system_paths(cfg.checkpoint, cfg.policy, cfg.tool, cfg.tool_arch)
    policy, tool = load_stage_system(paths, pol_cfg, tool_cfg, processes)

    meter, grounding = SegmentationMeter(), GroundingMeter()
    cod_meter = _camouflage_meter(records)
    statuses: Counter = Counter()
    rows, visuals = [], []
    with progress_bar(f"evaluate {cfg.split}", len(records)) as advance:
        for pred in predict_records(policy, tool, records, manifest.parent, cfg.batch_size, cfg.max_new_tokens,
                                    pol_cfg.require_think, oracle=True, processes=processes):
            target, mask, oracle = _target_and_preds(pred)
            iou = meter.add(mask, target, pred.parsed.format_ok)
            grounding.add(pred.parsed.call, mask, target, pred.record.bbox, oracle)
            if cod_meter is not None:
                cod_meter.add((pred.probability * 255).round().astype(np.uint8), target)
            statuses[pred.parsed.status] += 1
            rows.append(_prediction_row(pred, iou, meter, target))
            if len(visuals) < cfg.n_visual:
                visuals.append(_visual_row(pred, target, iou, manifest.parent))
            advance(1, f"gIoU {100 * np.mean([r['iou'] for r in rows]):.1f}")
    metrics = {**meter.summary(), **grounding.summary()}
    if cod_meter is not None:
        metrics.update(cod_meter.summary())
    metrics.update({"split": cfg.split, "n_skipped_records": report.n_skipped, "parse_status": dict(statuses)})
    kinds = [row.get(QUERY_KIND) for row in rows]
    if any(k is not None for k in kinds):  # the synthetic set's query kinds: where the policy is right or wrong
        metrics["by_query_kind"] = by_group(kinds, giou=[100 * r["iou"] for r in rows],
                                            call_box_iou=[r["call_box_iou"] for r in rows],
                                            point_in_target=[r["point_in_target"] for r in rows])
    if not processes.is_main:
        return metrics  # every process saw every prediction; the main one writes
    write_jsonl(out.parent / "predictions.jsonl", rows)
    overlay_sheet(out.parent / "overlays.png", visuals)
    write_json(out, metrics)
    write_run_record(out.parent / "run.json", "evaluate", {"evaluate": asdict(cfg), "policy": asdict(pol_cfg)},
                     {"manifest": manifest, "policy": paths.policy, "tool": paths.tool}, metrics)
    shown = ("n", "giou", "ciou", "precision@0.5", "format_rate", "n_unparsed", "call_box_iou", "point_in_target",
             "distinct_calls", "prompt_adherence", "call_box_area_ratio", "oracle_giou")
    shown += ("n_empty_targets",) if meter.empty_targets else ()
    summary_table(f"evaluate {cfg.split}", {k: metrics[k] for k in shown})
    console.print(f"metrics written to {out}")
    return metrics


def _prediction_row(pred: Prediction, iou: float, meter: SegmentationMeter, target: np.ndarray) -> dict:
    call = pred.parsed.call
    return {"id": pred.record.id, "query": pred.record.query, "completion": pred.completion,
            "status": pred.parsed.status, "call": call.to_dict() if call else None,
            "iou": iou, "intersection": meter.intersections[-1], "union": meter.unions[-1],
            "call_box_iou": call_box_iou(call, pred.record.bbox), "point_in_target": point_in_target(call, target),
            "mask": encode_rle(pred.mask),
            **({QUERY_KIND: pred.record.meta[QUERY_KIND]} if QUERY_KIND in pred.record.meta else {})}


def _visual_row(pred: Prediction, target: np.ndarray, iou: float, root: Path) -> dict:
    from grto_cli.core.data.images import load_rgb

    return {"image": load_rgb(pred.record.image_path(root)), "target": target, "pred": pred.mask,
            "call": pred.parsed.call, "caption": f"{pred.record.query} | IoU {100 * iou:.0f}"}

