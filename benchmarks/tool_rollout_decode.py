"""How much sharing one image embedding across G rollouts (and decoding the G calls in one batch)
saves over encoding and decoding each rollout on its own. Prints ratios measured in one run.

    python benchmarks/tool_rollout_decode.py [--arch tiny|vit_b|vit_h] [--group 8] [--repeats 5]

Random-init weights: speed does not depend on training. vit_b/vit_h are for a GPU machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from grto_cli.core.answer import ToolCall
from grto_cli.core.tiny import tiny_sam_arch
from grto_cli.core.tool import SAM_PRESETS, SamTool, build_sam


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny", choices=["tiny", *SAM_PRESETS])
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    arch = tiny_sam_arch() if args.arch == "tiny" else SAM_PRESETS[args.arch]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tool = SamTool(build_sam(arch).to(device).eval(), arch)
    size = 64 if args.arch == "tiny" else 512
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(args.images)]
    calls = [ToolCall(box=(size * 0.1, size * 0.2, size * 0.6, size * 0.7), points=((size * 0.3, size * 0.4),))
             for _ in range(args.group)]

    @torch.no_grad()
    def per_rollout() -> None:  # what a naive loop does: encode + decode every rollout on its own
        for image in images:
            for call in calls:
                tool.decode(tool.embed([image]), [call], image.shape[:2])

    @torch.no_grad()
    def shared() -> None:  # grto: one encoder pass per image, the G calls in one decoder batch
        embeddings = tool.embed(images)
        for i, image in enumerate(images):
            tool.decode(embeddings[i:i + 1], calls, image.shape[:2])

    naive, ours = _timed(per_rollout, args.repeats), _timed(shared, args.repeats)
    print(f"device={device} arch={args.arch} images={args.images} G={args.group}")
    print(f"per-rollout encode+decode: {naive * 1e3:.1f} ms   shared embedding + batched decode: {ours * 1e3:.1f} ms")
    print(f"speed-up: {naive / ours:.1f}x")


if __name__ == "__main__":
    main()
