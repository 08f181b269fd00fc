"""`grto report`: the method study's tables and curves, from the files each run wrote.

Reads, for every (method, seed) of the `study` section: the evaluated splits' metrics.json, the
train stage's curves and run record, and for b-grto the bootstrap's run record (its rollouts and
wall time count toward the method's cost). Writes a Markdown report and PNG charts beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from grto_cli.core.config import METHODS, check_choice
from grto_cli.core.data.records import read_manifest
from grto_cli.core.io import write_text
from grto_cli.core.metrics import ROLLOUT_REWARD_MEAN, VAL_GIOU, GroundingMeter
from grto_cli.core.report import (MIN_GAIN, POLICY_METRICS, REPORT_METRICS, RunResult, against_rollouts, by_method,
                                  constant_call, fmt, gain, is_gain, markdown_table, mean_std, ordering,
                                  plot_methods, split_stats, steps_to_reach)
from grto_cli.core.curves import curve_path, read_curve
from grto_cli.stages.console import console, summary_table
from grto_cli.stages.params import ConfigError, stage_config

BEST_FIRST = ("b-grto", "grto", "grpo")  # the ordering the paper claims, checked (not assumed) below


@dataclass
class StudyConfig:
    methods: list[str] = field(default_factory=lambda: list(reversed(BEST_FIRST)))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    splits: list[str] = field(default_factory=lambda: ["testA", "testB"])
    target_val_giou: float = 45.5  # "steps to reach": first val evaluation at or above this gIoU
    # paths relative to the study's folder (pipelines/study), which is its own DVC project
    runs: str = "results"  # <runs>/<method>/s<seed>/{train/, <split>/metrics.json, last/<split>/metrics.json}
    last: bool = True  # also report the last step's system (<runs>/<method>/s<seed>/last/<split>/metrics.json)
    models: str = "models"  # <models>/<method>/s<seed>/run.json, <models>/bootstrap/s<seed>/run.json
    base: str | None = "../../results/base"  # <base>/<split>/metrics.json: the starting system, for reference
    data: str | None = "../../data/prepared/synthetic"  # for the "same box for every query" baseline
    out: str = "reports/synthetic.md"
    plots: str = "reports/plots"

    def validate(self) -> None:
        for method in self.methods:
            check_choice("study.methods", method, METHODS)


def run_dir(cfg: StudyConfig, method: str, seed: int) -> Path:
    return Path(cfg.runs) / method / f"s{seed}"


def system_dir(cfg: StudyConfig, method: str, seed: int) -> Path:
    return Path(cfg.models) / method / f"s{seed}"


def last_system_dir(cfg: StudyConfig, method: str, seed: int) -> Path:
    """Where the run's last-step system goes (``train.last_out``); its metrics under run_dir/last."""
    return Path(cfg.models) / "last" / method / f"s{seed}"


def bootstrap_dir(cfg: StudyConfig, seed: int) -> Path:
    return Path(cfg.models) / "bootstrap" / f"s{seed}"


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"report: {path} does not exist ({what}); run the study first: "
                          f"cd pipelines/study && dvc repro")
    return json.loads(path.read_text())


def read_run(cfg: StudyConfig, method: str, seed: int) -> RunResult:
    rdir = run_dir(cfg, method, seed)
    metrics = {split: _read_json(rdir / split / "metrics.json", f"{method} seed {seed} on {split}")
               for split in cfg.splits}
    record = _read_json(system_dir(cfg, method, seed) / "run.json", f"{method} seed {seed}'s train record")
    last = {split: _read_json(rdir / "last" / split / "metrics.json", f"{method} seed {seed}'s last system on {split}")
            for split in cfg.splits} if cfg.last else None
    rl = record["params"]["train"]["rl"]
    curves = {}
    for name in (VAL_GIOU, ROLLOUT_REWARD_MEAN):
        tsv = curve_path(rdir / "train", name)
        if not tsv.is_file():
            raise ConfigError(f"report: {tsv} does not exist ({method} seed {seed}'s {name} curve)")
        curves[name] = read_curve(tsv)
    result = RunResult(method=method, seed=seed, metrics=metrics, curves=curves,
                       rollouts_per_step=int(rl["queries_per_step"]) * int(rl["sampling"]["group_size"]),
                       steps=int(record["results"]["step"]), best_val_giou=float(record["results"]["best_val_giou"]),
                       train_seconds=record["results"].get("seconds"), last_metrics=last)
    if method == "b-grto":
        boot = _read_json(bootstrap_dir(cfg, seed) / "run.json", f"seed {seed}'s bootstrap record")["results"]
        result.bootstrap_rollouts = int(boot["rollouts"])
        if "sampling_seconds" in boot:
            result.bootstrap_seconds = float(boot["sampling_seconds"]) + float(boot["tool_seconds"])
    return result


def _seconds(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return fmt(*mean_std(known), digits=0) if known else "n/a"


def constant_baseline(data: Path, splits: list[str]) -> dict[str, dict]:
    """Split -> the policy diagnostics (box IoU, point in target, distinct calls) of the one call
    fitted to the train targets, scored by the same meter as any policy's calls."""
    train, _ = read_manifest(data / "train.jsonl", check_images=False)
    call = constant_call([r.bbox for r in train])
    out = {}
    for split in splits:
        records, _ = read_manifest(data / f"{split}.jsonl", check_images=False)
        meter = GroundingMeter()
        for r in records:
            target = r.decode_mask()
            meter.add(call, np.zeros_like(target), target, r.bbox)  # no tool: only the policy terms
        summary = meter.summary()
        out[split] = {k: summary[k] for k in ("call_box_iou", "point_in_target", "distinct_calls")}
    return out


def render(cfg: StudyConfig, runs: list[RunResult], base: dict[str, dict],
           constant: dict[str, dict] | None = None) -> str:
    groups = by_method(runs)
    methods = [m for m in cfg.methods if m in groups]
    first = runs[0]
    lines = ["# Method study: GRPO, GRTO and B-GRTO on the synthetic setting", "",
             "Written by `grto report` at the end of the study (`cd pipelines/study && dvc repro`); do not edit by hand.", "",
             f"Every method starts from the same base system and gets the same RL budget: "
             f"{first.steps} steps of {first.rollouts_per_step} rollouts each. Seeds: "
             f"{', '.join(map(str, cfg.seeds))}; each cell is the mean ± sample std over seeds. The system "
             f"evaluated is each run's best on val (test splits never choose it)"
             + ("; rows marked (last) are the same runs' last step." if cfg.last else "."), ""]
    keys = list(REPORT_METRICS)
    for split in cfg.splits:
        rows = []
        if split in base:
            rows.append(["base (no RL)", "-"] + [fmt(float(base[split][k]), None, _digits(k))
                                                 if base[split].get(k) is not None else "n/a" for k in keys])
        if constant and split in constant:
            rows.append(["same box for every query", "-"] + [fmt(constant[split][k], None, _digits(k))
                                                           if k in constant[split] else "-" for k in keys])
        for m in methods:
            rows.append([m, str(len(groups[m]))] + [fmt(*split_stats(groups[m], split, k), digits=_digits(k))
                                                    for k in keys])
        if cfg.last:
            for m in methods:
                last = [replace(r, metrics=r.last_metrics or {}) for r in groups[m]]
                rows.append([f"{m} (last)", str(len(last))] + [fmt(*split_stats(last, split, k), digits=_digits(k))
                                                               for k in keys])
        lines += [f"## {split}", "", markdown_table(["method", "seeds"] + [REPORT_METRICS[k] for k in keys], rows), ""]

    lines += _gains_section(cfg, groups, methods, base) + _kinds_section(cfg, groups, methods, base)

    lines += ["## Does B-GRTO > GRTO > GRPO hold?", ""]
    if set(BEST_FIRST) <= set(methods):
        for split in cfg.splits:
            stats = {m: split_stats(groups[m], split, "giou") for m in BEST_FIRST}
            means = {m: s[0] for m, s in stats.items()}
            spread = max(s[1] for s in stats.values())
            gaps = ", ".join(f"{a} − {b} = {means[a] - means[b]:+.2f}" for a, b in zip(BEST_FIRST, BEST_FIRST[1:]))
            verdict = "holds" if ordering(means, BEST_FIRST) else "does not hold"
            lines.append(f"- {split}: the ordering **{verdict}** on mean gIoU ({gaps}; the largest seed std "
                         f"is {spread:.2f}).")
    else:
        lines.append("- not all three methods are in this study.")
    lines.append("")

    threshold = cfg.target_val_giou
    rows = []
    for m in methods:
        rs = groups[m]
        reached = [steps_to_reach(r.curves[VAL_GIOU], threshold) for r in rs]
        hit = [s for s in reached if s is not None]
        rl_rollouts = [r.steps * r.rollouts_per_step for r in rs]
        rows.append([m, fmt(*mean_std(rl_rollouts), digits=0), fmt(*mean_std([r.bootstrap_rollouts for r in rs]), digits=0),
                     fmt(*mean_std([a + r.bootstrap_rollouts for a, r in zip(rl_rollouts, rs)]), digits=0),
                     _seconds([r.train_seconds for r in rs]),
                     _seconds([r.bootstrap_seconds for r in rs]) if m == "b-grto" else "0",
                     (fmt(*mean_std(hit), digits=0) if hit else "never") + f" ({len(hit)}/{len(rs)} seeds)",
                     fmt(*mean_std([r.best_val_giou for r in rs]))])
    lines += ["## Cost", "",
              markdown_table(["method", "RL rollouts", "bootstrap rollouts", "all rollouts", "train wall s",
                              "bootstrap wall s", f"steps to val gIoU ≥ {threshold:g}", "best val gIoU"], rows), "",
              "Wall times are those of the machine that ran the study (one process each; a resumed run counts "
              "only its last invocation).", "",
              "## Curves", "",
              "Mean over seeds, shaded from the lowest to the highest seed. Against rollouts, b-grto's curve "
              "starts after its bootstrap's rollouts.", ""]
    for name in _PLOTS:
        lines.append(f"![{name}](plots/{name}.png)")
    return "\n".join(lines) + "\n"


def _gains_section(cfg: StudyConfig, groups: dict[str, list[RunResult]], methods: list[str],
                   base: dict[str, dict]) -> list[str]:
    """Per split and method, the policy's gain over the base system: mean ± std over seeds, marked
    where it is a gain (``is_gain``: at least MIN_GAIN and more than twice the seed std)."""
    if not all(split in base for split in cfg.splits):
        return []
    header = ["method"] + [f"{split} {REPORT_METRICS[k]} − base" for split in cfg.splits for k in POLICY_METRICS]
    rows = []
    for last in ((False, True) if cfg.last else (False,)):
        for m in methods:
            cells = []
            for split in cfg.splits:
                for k in POLICY_METRICS:
                    mean, std = gain(groups[m], base, split, k, last)
                    text = "n/a" if np.isnan(mean) else f"{mean:+.3f} ± {std:.3f}"
                    cells.append(f"**{text}**" if is_gain(mean, std) else text)
            rows.append([m + (" (last)" if last else "")] + cells)
    return ["## Does RL improve the policy over the base?", "",
            f"The policy's own grounding (its calls' box IoU and point in target), trained minus base, mean ± "
            f"std over seeds; **bold**: a gain (at least {MIN_GAIN:g} and more than twice the seed std).", "",
            markdown_table(header, rows), ""]


def _kinds_section(cfg: StudyConfig, groups: dict[str, list[RunResult]], methods: list[str],
                   base: dict[str, dict]) -> list[str]:
    """Per split, box IoU / point in target by query kind (``by_query_kind``), mean over seeds."""
    lines = ["## By query kind", "", "The policy's box IoU / point in target per kind of query (mean over seeds; "
             "n: queries of that kind).", ""]
    for split in cfg.splits:
        kinds = sorted({kind for rs in groups.values() for r in rs
                        for kind in r.metrics.get(split, {}).get("by_query_kind", {})})
        if not kinds:
            continue
        counts = next(r.metrics[split]["by_query_kind"] for rs in groups.values() for r in rs
                      if "by_query_kind" in r.metrics.get(split, {}))
        header = ["method"] + [f"{kind} (n={counts.get(kind, {}).get('n', 0)})" for kind in kinds]

        def cell(tables: list[dict], kind: str) -> str:
            values = [t[kind] for t in tables if kind in t]
            if not values:
                return "n/a"
            return " / ".join(f"{np.mean([v[k] for v in values]):.3f}" for k in POLICY_METRICS)

        rows = []
        if split in base and "by_query_kind" in base[split]:
            rows.append(["base (no RL)"] + [cell([base[split]["by_query_kind"]], kind) for kind in kinds])
        for m in methods:
            rows.append([m] + [cell([r.metrics[split].get("by_query_kind", {}) for r in groups[m]], kind)
                               for kind in kinds])
        lines += [f"### {split}", "", markdown_table(header, rows), ""]
    return lines if len(lines) > 4 else []


def _digits(key: str) -> int:
    """Decimals shown: three for fractions in [0, 1], none for counts, two for percentages."""
    return 3 if key in ("call_box_iou", "point_in_target", "prompt_adherence") else 0 if key == "distinct_calls" else 2


_PLOTS = ("val_giou_vs_step", "val_giou_vs_rollouts", "reward_vs_step", "reward_vs_rollouts")


def draw(cfg: StudyConfig, runs: list[RunResult]) -> list[Path]:
    groups = by_method(runs)
    out = Path(cfg.plots)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, label in ((VAL_GIOU, "val gIoU"), (ROLLOUT_REWARD_MEAN, "mean rollout reward")):
        short = "val_giou" if name == VAL_GIOU else "reward"
        by_step = {m: [r.curves[name] for r in rs] for m, rs in groups.items()}
        by_rollouts = {m: [against_rollouts(r.curves[name], r.rollouts_per_step, r.bootstrap_rollouts) for r in rs]
                       for m, rs in groups.items()}
        for suffix, series, xlabel in (("step", by_step, "RL step"),
                                       ("rollouts", by_rollouts, "rollouts generated (bootstrap included)")):
            path = out / f"{short}_vs_{suffix}.png"
            plot_methods(series, xlabel, label, f"{label} against {xlabel.split(' (')[0]}", path)
            written.append(path)
    return written


def build_study(params: str | Path | None, overrides: list[str] | None = None, **explicit) -> StudyConfig:
    return stage_config(StudyConfig, params, "study", overrides, **explicit)


def run(params: str | None, overrides: list[str] | None = None, **explicit) -> dict:
    cfg = build_study(params, overrides, **explicit)
    runs = [read_run(cfg, m, s) for m in cfg.methods for s in cfg.seeds]
    base = {}
    if cfg.base:
        for split in cfg.splits:
            path = Path(cfg.base) / split / "metrics.json"
            if path.is_file():
                base[split] = json.loads(path.read_text())
    constant = constant_baseline(Path(cfg.data), cfg.splits) if cfg.data else None
    plots = draw(cfg, runs)
    write_text(cfg.out, render(cfg, runs, base, constant))
    summary = {f"{m}/{split}/giou": fmt(*split_stats(rs, split, "giou"))
               for m, rs in by_method(runs).items() for split in cfg.splits}
    summary_table("report", {"runs": len(runs), **summary, "out": cfg.out, "plots": len(plots)})
    console.print(f"report written to {cfg.out}")
    return {"config": asdict(cfg), "runs": len(runs)}
