"""What each real tool costs: SAM ViT-B/L/H (segment-anything) against SAM2 / SAM2.1 Hiera-T/S/B+/L
(Meta's sam2 package), at their real sizes with random weights (no checkpoint needed).

    python benchmarks/tool_cost.py [--tools vit_h sam2.1_hiera_l ...] [--calls 32] [--time]
    python benchmarks/tool_cost.py --smoke        # vit_b and sam2.1_hiera_t, no timing: checks the script

Per tool, one line and then a JSON line with:
- parameters: all, the image encoder's (frozen, run once per image), what GRTO trains (prompt
  encoder + mask decoder, as the tool's ``trainable_parameters``);
- encode GFLOPs for one 1024x1024 image and decode GFLOPs for ``--calls`` box+point calls on it
  (``torch.utils.flop_counter`` over a real pass: it counts the matmuls, attention and convolutions
  that dominate, not the element-wise ops);
- the bytes one image's cached features take (``tool.cache_bytes`` counts these; SAM2 caches three
  levels) and the bf16 weight bytes a GPU holds;
- with ``--time`` (or on CUDA): seconds per encode of one image, measured in this run (CPU fp32, or
  CUDA under the bf16 autocast the tools use there, synchronised) and CUDA's peak memory.

The SAM2 rows need ``grto[sam2]``; where it is missing they are skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from grto_cli.core.answer import ToolCall
from grto_cli.core.tool import SAM_PRESETS, SamTool, _nbytes, build_sam, resolve_arch

SAM2_TOOLS = ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l")
DEFAULT_TOOLS = ("vit_b", "vit_l", "vit_h") + SAM2_TOOLS
SIZE = 1024


def _build(name: str):
    """The tool at real size with random weights."""
    if name in SAM_PRESETS:
        return SamTool(build_sam(name), resolve_arch(name))
    from grto_cli.core.sam2_meta import Sam2Tool, build_sam2_model, preset_config

    config = preset_config(name)
    return Sam2Tool(build_sam2_model(config, name).eval(), config)


def _gflops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def measure(name: str, calls: int, timed: bool, device: torch.device) -> dict:
    tool = _build(name)
    model = tool.module
    encoder = model.image_encoder
    n_all = sum(p.numel() for p in model.parameters())
    n_encoder = sum(p.numel() for p in encoder.parameters())
    n_trainable = sum(p.numel() for p in tool.trainable_parameters())
    tool.freeze()  # inference only (the flop counter's module hooks want no autograd state)
    model.to(device)
    image = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        embedded = []
        encode_gflops = _gflops(lambda: embedded.append(tool.embed([image])))
        embedding = embedded[0]
        prompts = [ToolCall(box=(100 + i, 120, 700, 800 - i), points=((400, 450),)) for i in range(calls)]
        decode_gflops = _gflops(lambda: tool.decode(embedding, prompts, (SIZE, SIZE)))
    row = {"tool": name, "kind": tool.kind, "params_m": round(n_all / 1e6, 1),
           "image_encoder_params_m": round(n_encoder / 1e6, 1), "trainable_params_m": round(n_trainable / 1e6, 2),
           "encode_gflops": round(encode_gflops, 1), f"decode_{calls}_calls_gflops": round(decode_gflops, 1),
           "cache_mib_per_image": round(_nbytes(embedding) / 2**20, 2),
           "weights_bf16_gib": round(n_all * 2 / 2**30, 2)}
    if timed or device.type == "cuda":
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            tool.embed([image])  # warm-up
            sync()
            start = time.perf_counter()
            repeats = 5 if device.type == "cuda" else 1
            for _ in range(repeats):
                tool.embed([image])
            sync()
        row["encode_seconds"] = round((time.perf_counter() - start) / repeats, 3)
        row["device"] = device.type
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tools", nargs="+", default=list(DEFAULT_TOOLS))
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--time", action="store_true", help="also time one encode on the CPU (always on CUDA)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    tools = ["vit_b", "sam2.1_hiera_t"] if args.smoke else args.tools
    calls = 2 if args.smoke else args.calls
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    have_sam2 = importlib.util.find_spec("sam2") is not None
    rows = []
    for name in tools:
        if name not in SAM_PRESETS and not have_sam2:
            print(f"{name}: skipped (Meta's sam2 package is not installed: pip install 'grto[sam2]')")
            continue
        row = measure(name, calls, args.time and not args.smoke, device)
        rows.append(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print(json.dumps({"rows": rows, "smoke": args.smoke, "device": device.type}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
