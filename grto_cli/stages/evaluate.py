"""`grto evaluate`: policy -> parse -> tool -> mask on a split; metrics, predictions, overlays."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from grto_cli.core.checkpoint import system_paths
from grto_cli.core.config import check_choice
from grto_cli.core.data.masks import encode_rle
from grto_cli.core.data.records import QUERY_KIND, read_manifest
from grto_cli.core.evaluation import Scored, evaluate_split
from grto_cli.core.io import write_json, write_jsonl
from grto_cli.core.visualize import overlay_sheet
from grto_cli.stages.console import console, progress_bar, summary_table
from grto_cli.stages.params import Params
from grto_cli.stages.record import write_run_record
from grto_cli.stages.runtime import join_processes, quiet_transformers, set_threads
from grto_cli.stages.sections import PolicyParams, ToolParams
from grto_cli.stages.system import load_stage_system

@dataclass
class EvaluateConfig:
    data: str = "data/prepared/synthetic"
    split: str = "testA"
    checkpoint: str | None = "models/base"
    policy: str | None = None  # path or hub id; overrides <checkpoint>/policy
    tool: str | None = None  # SAM file or dir; overrides <checkpoint>/tool
    tool_arch: str | None = None  # Meta's bare files: vit_b|vit_l|vit_h (SAM), sam2{,.1}_hiera_{t,s,b+,l} (SAM2)
    out: str | None = None  # metrics JSON; default results/<checkpoint name>/<split>/metrics.json
    batch_size: int = 32
    max_new_tokens: int = 48
    limit: int | None = None  # evaluate only the first N records (quick looks; never for reported numbers)
    n_visual: int = 8
    on_bad_record: str = "fail"  # fail | skip

    def validate(self) -> None:
        check_choice("on_bad_record", self.on_bad_record, ("fail", "skip"))


def default_out(cfg: EvaluateConfig) -> Path:
    name = Path(cfg.checkpoint).name if cfg.checkpoint else "model"
    return Path("results") / name / cfg.split / "metrics.json"


def run(params: str | None, overrides: list[str] | None = None, **explicit) -> dict:
    read = Params(params, overrides)  # read once
    cfg = read.section(EvaluateConfig, "evaluate", **explicit)
    pol_cfg, tool_cfg = read.section(PolicyParams, "policy"), read.section(ToolParams, "tool")
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

    rows, visuals = [], []
    with progress_bar(f"evaluate {cfg.split}", len(records)) as advance:
        def each(scored: Scored) -> None:
            rows.append(_prediction_row(scored))
            if len(visuals) < cfg.n_visual:
                visuals.append(_visual_row(scored, manifest.parent))
            advance(1, f"gIoU {100 * np.mean([r['iou'] for r in rows]):.1f}")

        metrics = evaluate_split(policy, tool, records, manifest.parent, cfg.batch_size, cfg.max_new_tokens,
                                 pol_cfg.require_think, processes, each=each)
    metrics.update({"split": cfg.split, "n_skipped_records": report.n_skipped})
    if not processes.is_main:
        return metrics  # every process saw every prediction; the main one writes
    write_jsonl(out.parent / "predictions.jsonl", rows)
    overlay_sheet(out.parent / "overlays.png", visuals)
    write_json(out, metrics)
    write_run_record(out.parent / "run.json", "evaluate", {"evaluate": asdict(cfg), "policy": asdict(pol_cfg)},
                     {"manifest": manifest, "policy": paths.policy, "tool": paths.tool}, metrics)
    shown = ("n", "giou", "ciou", "precision@0.5", "format_rate", "n_unparsed", "call_box_iou", "point_in_target",
             "distinct_calls", "prompt_adherence", "call_box_area_ratio", "oracle_giou")
    shown += ("n_empty_targets",) if metrics["n_empty_targets"] else ()
    summary_table(f"evaluate {cfg.split}", {k: metrics[k] for k in shown})
    console.print(f"metrics written to {out}")
    return metrics


def _prediction_row(scored: Scored) -> dict:
    pred = scored.prediction
    call = pred.parsed.call
    return {"id": pred.record.id, "query": pred.record.query, "completion": pred.completion,
            "status": pred.parsed.status, "call": call.to_dict() if call else None,
            "iou": scored.iou, "intersection": scored.intersection, "union": scored.union,
            "call_box_iou": scored.call_box_iou, "point_in_target": scored.point_in_target,
            "mask": encode_rle(scored.mask),
            **({QUERY_KIND: pred.record.meta[QUERY_KIND]} if QUERY_KIND in pred.record.meta else {})}


def _visual_row(scored: Scored, root: Path) -> dict:
    from grto_cli.core.data.images import load_rgb

    pred = scored.prediction
    return {"image": load_rgb(pred.record.image_path(root)), "target": scored.target, "pred": scored.mask,
            "call": pred.parsed.call, "caption": f"{pred.record.query} | IoU {100 * scored.iou:.0f}"}
