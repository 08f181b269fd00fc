"""What the rollout sampler's noise costs per decoding step: the keyed per-row Gumbel draw as it
was until commit 5388d42 (one ``torch.Generator`` per row per position, a Python loop over rows) and as
``sampling.GumbelSampler`` draws it now (a counter-based hash of (row key, position, token) for all
rows at once), at the real vocabulary (Qwen's 151,936) and the tiny model's (1,200).

    python benchmarks/sampler_cost.py [--rows 32 256] [--vocab 151936 1200] [--repeats 20]
    python benchmarks/sampler_cost.py --smoke      # a few repeats: checks the script

Both are timed in the same run, interleaved, on CUDA when there is one (synchronised), else on the
CPU; prints one line per (rows, vocab) with milliseconds per step and the ratio, then a JSON line.
Only the noise is timed (``GumbelSampler.noise``), not the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from grto_cli.core.sampling import GumbelSampler, rollout_key, row_keys


def generator_noise(keys: list[int], position: int, vocab: int, device: torch.device) -> torch.Tensor:
    """(N, V): the draw before the counter-based sampler, one seeded generator per row."""
    rows = []
    for key in keys:
        generator = torch.Generator(device=device)
        generator.manual_seed(rollout_key(key, position))
        u = torch.rand(vocab, generator=generator, device=device, dtype=torch.float32)
        rows.append(-torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float32).tiny))))
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--vocab", type=int, nargs="+", default=[151936, 1200])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rows, args.vocab, args.repeats = [4], [1200], 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ms(fn) -> float:
        fn()  # warm-up: first launches, allocator
        sync()
        start = time.perf_counter()
        for position in range(args.repeats):
            fn(position)
        sync()
        return (time.perf_counter() - start) / args.repeats * 1000

    rows_out = []
    for n in args.rows:
        keys = row_keys([rollout_key(0, 0, g) for g in range(max(1, n // 8))], min(n, 8))
        for vocab in args.vocab:
            sampler = GumbelSampler(keys, 1.0, prompt_length=0)
            before = ms(lambda position=0: generator_noise(keys, position, vocab, device))
            after = ms(lambda position=0: sampler.noise(position, vocab, device))
            rows_out.append({"rows": len(keys), "vocab": vocab, "generator_ms": round(before, 3),
                             "counter_ms": round(after, 3), "ratio": round(before / after, 2)})
            print(f"rows {len(keys):4d} vocab {vocab:7d}: per-row generators {before:9.3f} ms/step, "
                  f"counter-based {after:9.3f} ms/step, {before / after:6.2f}x", flush=True)
    print(json.dumps({"benchmark": "sampler_cost", "device": torch.cuda.get_device_name(0) if device.type == "cuda"
                      else f"cpu ({torch.get_num_threads()} threads)", "results": rows_out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
