"""`grto prepare DATASET`: raw data on local disk -> normalised JSONL manifests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from grto_cli.core.data.records import DataError, Record, SkipReport, write_manifest
from grto_cli.core.data.synthetic import LOOKS, SPLITS, generate_split
from grto_cli.core.io import atomic_dir, write_json
from grto_cli.stages.console import console, progress_bar, summary_table
from grto_cli.stages.params import stage_config
from grto_cli.stages.record import write_run_record


@dataclass
class PrepareConfig:
    dataset: str = "synthetic"
    out: str | None = None  # default data/prepared/<dataset> (synthetic in a look other than plain: synthetic-<look>)
    raw: str | None = None  # raw data root (real datasets)
    seed: int = 0
    strict: bool = False  # any skipped item fails the stage
    image_size: int = 64  # synthetic
    # synthetic: how the scenes are drawn: plain, or camo (the same scenes, queries and masks, each
    # shape blended into a texture of the scene's colours: a tool trained on plain must adapt)
    look: str = "plain"
    # synthetic: records asked of each scene, per split (1 where a split is not named): several
    # queries on one image, about different shapes, teach the policy to read the query
    queries_per_image: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=lambda: {"train": 3000, "val": 200, "testA": 300, "testB": 300})
    query_kind: str = "all"  # reasonseg: short | long | all
    instruction: str = "Segment the camouflaged object in the image."  # cod10k / nc4k query
    threshold: int = 128  # cod10k / nc4k mask threshold
    splits: list[str] | None = None  # restrict to these splits
    first_query_only: bool = False  # reasonseg/earthreason: one record per image, as LISA/SegEarth-R1 evaluate
    # earthreason: keep the deliberate no-target samples as empty-target records (evaluation scores
    # them by LISA's rule and counts them; train and bootstrap leave them out) instead of skipping them
    keep_empty: bool = False


def _synthetic(cfg: PrepareConfig, out: Path) -> dict[str, tuple[list[Record], SkipReport]]:
    unknown = sorted((set(cfg.sizes) | set(cfg.queries_per_image)) - set(SPLITS))
    if unknown:
        raise DataError(f"unknown synthetic split(s) {unknown}; expected {list(SPLITS)}")
    result = {}
    wanted = [s for s in SPLITS if s in cfg.sizes and (cfg.splits is None or s in cfg.splits)]
    with progress_bar("generating synthetic scenes", len(wanted)) as advance:
        for split in wanted:
            records = generate_split(split, int(cfg.sizes[split]), cfg.seed, cfg.image_size, out,
                                     queries_per_image=int(cfg.queries_per_image.get(split, 1)), look=cfg.look)
            report = SkipReport(kept=len(records))
            result[split] = (records, report)
            advance(1, split)
    return result


def _real(cfg: PrepareConfig) -> dict[str, tuple[list[Record], SkipReport]]:
    from grto_cli.core.data.sources import read_source

    if not cfg.raw:
        raise DataError(f"`grto prepare {cfg.dataset}` needs --raw PATH (the dataset's root on local disk); "
                        f"see docs/datasets.md for each dataset's layout")
    options = {"query_kind": cfg.query_kind, "instruction": cfg.instruction, "threshold": cfg.threshold,
               "splits": cfg.splits, "first_query_only": cfg.first_query_only, "keep_empty": cfg.keep_empty}
    console.print(f"reading {cfg.dataset} from {cfg.raw}")
    return read_source(cfg.dataset, Path(cfg.raw), options)


def _fail_on_skips(dataset: str, result: dict[str, tuple[list[Record], SkipReport]]) -> None:
    lines = [f"  {split}: {rid}: {reason}" for split, (_, rep) in result.items()
             for reason, ids in rep.skipped.items() for rid in ids[:20]]
    if lines:
        raise DataError(f"--strict: {len(lines)} item(s) of {dataset} could not be used:\n" + "\n".join(lines))


def default_out(cfg: PrepareConfig) -> Path:
    name = cfg.dataset if cfg.look == "plain" else f"{cfg.dataset}-{cfg.look}"
    return Path(f"data/prepared/{name}")


def run(params: str | None, overrides: list[str] | None = None, **explicit) -> dict:
    cfg = stage_config(PrepareConfig, params, "prepare", overrides, **explicit)
    if cfg.look not in LOOKS:
        raise DataError(f"prepare.look {cfg.look!r}: expected one of {list(LOOKS)}")
    if cfg.look != "plain" and cfg.dataset != "synthetic":
        raise DataError(f"prepare.look {cfg.look!r} draws synthetic scenes; {cfg.dataset} is read as it is on disk "
                        f"(use look: plain)")
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    with atomic_dir(out) as tmp:
        result = _synthetic(cfg, tmp) if cfg.dataset == "synthetic" else _real(cfg)
        if cfg.strict:
            _fail_on_skips(cfg.dataset, result)
        if not result:
            raise DataError(f"no splits found for {cfg.dataset} under {cfg.raw}")
        summary = {}
        for split, (records, report) in result.items():
            write_manifest(tmp / f"{split}.jsonl", records)
            summary[split] = report.to_dict()
        write_json(tmp / "report.json", summary)
        write_run_record(tmp / "run.json", "prepare", cfg, {"raw": cfg.raw} if cfg.raw else {},
                         results={s: {"kept": r["kept"], "skipped": r["skipped"]} for s, r in summary.items()})
    row = {"dataset": cfg.dataset + (f" ({cfg.look})" if cfg.look != "plain" else ""), "out": str(out)}
    row.update({split: f"{r['kept']} (+{r['skipped']} skipped)" if r["skipped"] else r["kept"]
                for split, r in summary.items()})
    summary_table("prepare", row)
    for split, r in summary.items():
        for reason, n in r["skipped_by_reason"].items():
            console.print(f"[yellow]{split}: skipped {n} ({reason})")
    return summary
