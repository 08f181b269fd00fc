"""What an RL step can teach a policy: its greedy answers against G sampled answers to the same queries.

    python benchmarks/rl_headroom.py --system models/base --data data/prepared/synthetic --split val \
        [--limit 200] [--group-size 8] [--temperature 1.0] [--seed 7] [--params params.yaml]

RL moves the greedy answer only where a group holds a better answer than the greedy one. For each
query this scores the greedy call (as ``grto evaluate`` makes it) and G samples drawn as the trainer
draws them (``rollout.sample_completions``, keys ``sampling.rollout_key(seed, i)``), by point in
target (the share of the call's points inside the target mask) and the call's box IoU, and reports:
- greedy and sampled point in target and box IoU, and pass@G (some sample's point in the target);
- on the queries the greedy call misses (point outside the target): the share of their samples that
  land in the target, and the share of those queries with at least 1 and at least 3 samples in it:
  the errors a group can correct;
- on the queries the greedy call gets right: the share of their samples that miss: what RL spends
  its advantage sharpening without moving the greedy answer;
- the same per kind of query (the record's ``QUERY_KIND``).
The last line is JSON. Nothing is timed; the numbers depend only on the system, the split and the seed.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

from grto_cli.core.checkpoint import load_system, system_paths
from grto_cli.core.data.images import load_rgb
from grto_cli.core.data.records import QUERY_KIND, read_manifest
from grto_cli.core.inference import predict_batch
from grto_cli.core.metrics import call_box_iou, point_in_target
from grto_cli.core.rollout import SamplingParams, sample_completions
from grto_cli.core.sampling import rollout_key
from grto_cli.stages.params import Params
from grto_cli.stages.sections import PolicyParams


def headroom(greedy_hit: np.ndarray, sample_hits: np.ndarray) -> dict:
    """Summary of greedy hits (Q,) in {0, 1} against sample hits (Q, G) in [0, 1].

    >>> h = headroom(np.array([1.0, 0.0, 0.0]), np.array([[1, 0], [1, 0], [0, 0]], float))
    >>> h["greedy_misses"], h["miss_samples_in_target"], h["misses_with_1_in_target"], h["hit_samples_missing"]
    (2, 0.25, 0.5, 0.5)
    """
    miss = greedy_hit < 0.5
    counts = (sample_hits >= 0.5).sum(axis=1)  # (Q,) samples whose point lands in the target

    def mean(x):
        return float(np.mean(x)) if len(x) else float("nan")
    return {"queries": int(len(greedy_hit)), "greedy_point_in_target": mean(greedy_hit),
            "sampled_point_in_target": mean(sample_hits), "pass_at_g": mean(counts >= 1),
            "greedy_misses": int(miss.sum()), "miss_samples_in_target": mean(sample_hits[miss]),
            "misses_with_1_in_target": mean(counts[miss] >= 1), "misses_with_3_in_target": mean(counts[miss] >= 3),
            "hit_samples_missing": mean(1 - sample_hits[~miss])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--system", required=True, help="system directory (policy/, tool/)")
    ap.add_argument("--data", required=True, help="prepared dataset directory")
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=200, help="the split's first N queries")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--batch", type=int, default=20, help="queries per generation batch")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--params", default=None,
                    help="params file whose policy section (prompt, coordinates) the system answers in "
                         "(default: ./params.yaml, else grto's packaged defaults)")
    args = ap.parse_args(argv)

    root = Path(args.data)
    records, _ = read_manifest(root / f"{args.split}.jsonl")
    records = records[:args.limit]
    settings = Params(args.params).section(PolicyParams, "policy")
    policy, tool = load_system(system_paths(args.system), settings.prompt_template,
                               coord_convention=settings.coord_convention)
    sampling = SamplingParams(group_size=args.group_size, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens)
    G = args.group_size
    greedy_hit, greedy_box, sample_hits, sample_box, kinds = [], [], [], [], []
    for s in track(range(0, len(records), args.batch), description="greedy + sampled answers"):
        chunk = records[s:s + args.batch]
        images = [load_rgb(r.image_path(root)) for r in chunk]
        queries = [r.query for r in chunk]
        greedy = predict_batch(policy, tool, images, queries, args.max_new_tokens)
        keys = [rollout_key(args.seed, s + i) for i in range(len(chunk))]
        *_, parsed = sample_completions(policy, images, queries, sampling, keys)
        for i, r in enumerate(chunk):
            target = r.decode_mask()
            greedy_hit.append(point_in_target(greedy[i][1].call, target))
            greedy_box.append(call_box_iou(greedy[i][1].call, r.bbox))
            group = [p.call for p in parsed[i * G:(i + 1) * G]]
            sample_hits.append([point_in_target(c, target) for c in group])
            sample_box.append([call_box_iou(c, r.bbox) for c in group])
            kinds.append(r.meta.get(QUERY_KIND, "all"))
    greedy_hit, sample_hits = np.array(greedy_hit), np.array(sample_hits)  # (Q,), (Q, G)
    result = {"system": args.system, "split": args.split, "group_size": G, "temperature": args.temperature,
              "seed": args.seed, **headroom(greedy_hit, sample_hits),
              "greedy_box_iou": float(np.mean(greedy_box)), "sampled_box_iou": float(np.mean(sample_box))}
    by_kind = defaultdict(list)
    for q, kind in enumerate(kinds):
        by_kind[kind].append(q)
    result["by_kind"] = {k: headroom(greedy_hit[idx], sample_hits[idx]) for k, idx in sorted(by_kind.items())}
    print(f"{len(records)} {args.split} queries, G={G}, T={args.temperature}: greedy point in target "
          f"{result['greedy_point_in_target']:.3f}, sampled {result['sampled_point_in_target']:.3f}, "
          f"pass@{G} {result['pass_at_g']:.3f}; greedy box IoU {result['greedy_box_iou']:.3f}, "
          f"sampled {result['sampled_box_iou']:.3f}")
    print(f"greedy misses {result['greedy_misses']}: {result['miss_samples_in_target']:.1%} of their samples in the "
          f"target; >=1 in target {result['misses_with_1_in_target']:.1%}, >=3 {result['misses_with_3_in_target']:.1%}; "
          f"greedy hits: {result['hit_samples_missing']:.1%} of their samples miss")
    for kind, h in result["by_kind"].items():
        print(f"  {kind:12s} n={h['queries']:4d} greedy {h['greedy_point_in_target']:.3f} pass@{G} {h['pass_at_g']:.3f} "
              f"misses {h['greedy_misses']:3d}, >=1 in target {h['misses_with_1_in_target']:.1%}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
