"""A real pipeline's stages on random-init checkpoints of the real size: the commands `dvc repro`
runs for a setting (prepare, then train), with the setting's own params.yaml and one RL step.

    python benchmarks/real_pipeline_step.py --project DIR [--size 7b|3b] [--launch "CMD"]
        [--train N] [--val N] [--image-size WxH]
    python benchmarks/real_pipeline_step.py --project DIR --smoke      # CPU, tiny dims, small budget

What it does, in DIR:

1. ``grto init --setting reasonseg``: the project files a user gets;
2. random-init checkpoints where the template expects the real ones:
   ``checkpoints/Qwen2.5-VL-7B-Instruct`` (a ``save_pretrained`` directory of the 7B or 3B
   architecture; its tokenizer is ``real_size_step.py``'s, as Qwen's own is not on disk) and
   ``checkpoints/sam_vit_h_4b8939.pth`` (a SAM ViT-H state dict, Meta's format), written by a child
   process so that this one never holds GPU memory;
3. a small dataset in LISA's ReasonSeg layout (JPEG + labelme JSON; 1024x768 images, which both the
   Qwen processor and SAM resize);
4. params.yaml: ``launch``, ``train.steps: 1`` and ``train.method: grto``; nothing else changes
   (``--smoke`` also shrinks the budget: ``SMOKE_PARAMS``). B-GRTO's step is GRTO's step from the
   bootstrapped tool, but the bootstrap stage needs parsable rollouts, which a random-init policy
   never writes (it stops with "no parsable rollout in the bootstrap cache"), so the step runs as GRTO;
5. each stage's command as the template's dvc.yaml writes it, ``${...}`` filled in from params.yaml
   (``grto`` run as ``python -m grto_cli``), timed.

A random-init policy never writes a parsable answer: rewards are 0, advantages 0, and the tool learns
from no call; the step still runs every policy pass at full length (completions run to
max_new_tokens) and SAM encodes every image, but decodes no call (real_size_step.py times those).
Prints one line per stage and a final JSON line with each stage's seconds and the train step's
``perf/`` curves (seconds, rollouts per second, peak GPU memory). Exit code 1 when a stage fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SETTING = "reasonseg"
POLICY_DIR = "checkpoints/Qwen2.5-VL-7B-Instruct"  # where the template's params.yaml looks
SAM_FILE = "checkpoints/sam_vit_h_4b8939.pth"
SMOKE_SAM_DIR = "checkpoints/sam_tiny"  # --smoke: the tiny SAM in grto's layout (sam.pt + sam.yaml)
STAGES = ("prepare_reasonseg", "train")
QWEN_PIXELS = (3136, 12845056)  # Qwen2.5-VL's processor defaults; the pipeline's policy.min/max_pixels apply on top
# --smoke: the same stages on the CPU in about a minute (tiny policy and SAM, a few short rollouts).
SMOKE_PARAMS = {
    "policy.device": "cpu",
    "train.queries_per_step": 2, "train.sampling.group_size": 2, "train.sampling.max_new_tokens": 8,
    "train.micro_batch": 4, "train.eval_limit": 2, "train.eval_batch_size": 2,
    "train.tool": SMOKE_SAM_DIR, "train.tool_arch": None,
}
SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True, help="a new (or empty) folder for the project")
    ap.add_argument("--size", choices=["3b", "7b"], default="7b", help="policy architecture (default 7b)")
    ap.add_argument("--launch", default=None,
                    help="the params' `launch` prefix (default: this Python's `-m grto_cli`), e.g. "
                         "'accelerate launch --config_file <grto>/configs/accelerate/one_gpu.yaml -m grto_cli'")
    ap.add_argument("--train", type=int, default=None, help="training images (default: train.queries_per_step)")
    ap.add_argument("--val", type=int, default=4, help="val images (default 4)")
    ap.add_argument("--image-size", default=None, help="WxH of the images (default 1024x768; smoke 160x120)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny dims and a small budget: checks the script")
    ap.add_argument("--write-checkpoints", action="store_true", help=argparse.SUPPRESS)  # the child's job
    args = ap.parse_args(argv)
    args.image_size = args.image_size or ("160x120" if args.smoke else "1024x768")
    if not re.fullmatch(r"\d+x\d+", args.image_size):
        ap.error(f"--image-size must be WxH, got {args.image_size!r}")
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stages {unknown}; expected some of {list(STAGES)}")
    return args


# -- checkpoints -------------------------------------------------------------------------------

def write_checkpoints(args) -> dict:
    """Random-init policy and SAM where the template expects them (runs in a child process)."""
    import torch

    import real_size_step as bench
    from grto_cli.core.tiny import tiny_sam_arch
    from grto_cli.core.tool import build_sam, save_sam

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # as the pipeline loads it (policy.dtype: auto)
    bench_args = argparse.Namespace(size=args.size, smoke=args.smoke, image_size=112, seed=0)
    started = time.perf_counter()
    policy = bench.build_policy(bench_args, device, dtype, pixel_bounds=QWEN_PIXELS)
    out = args.project / POLICY_DIR
    policy.model.save_pretrained(out)
    policy.processor.save_pretrained(out)
    n_policy = sum(p.numel() for p in policy.model.parameters())
    del policy
    with bench.default_device_dtype(device, torch.float32):
        sam = build_sam(tiny_sam_arch() if args.smoke else "vit_h")
    if args.smoke:
        save_sam(sam, tiny_sam_arch(), args.project / SMOKE_SAM_DIR)
    else:
        torch.save({k: v.detach().cpu() for k, v in sam.state_dict().items()}, args.project / SAM_FILE)
    return {"policy_params": n_policy, "sam_params": sum(p.numel() for p in sam.parameters()),
            "seconds": round(time.perf_counter() - started, 1), "device": str(device)}


# -- data --------------------------------------------------------------------------------------

def write_reasonseg(raw: Path, splits: dict[str, int], size: tuple[int, int], seed: int = 0) -> int:
    """``raw/ReasonSeg/<split>/<name>.jpg + <name>.json`` in LISA's layout: a noisy scene with four
    coloured polygons, the query naming one of them (a labelme polygon shape)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    count = 0
    for split, n in splits.items():
        folder = raw / "ReasonSeg" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = Image.fromarray(rng.integers(60, 200, (h, w, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(image)
            shapes = []
            for name, colour in SHAPE_COLOURS.items():
                cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
                r = rng.uniform(0.06, 0.15) * min(w, h)
                angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
                points = [[float(cx + r * np.cos(a)), float(cy + r * np.sin(a))] for a in angles]
                draw.polygon([tuple(p) for p in points], fill=colour)
                shapes.append((name, points))
            name, points = shapes[int(rng.integers(len(shapes)))]
            stem = f"scene_{split}_{i:04d}"
            image.save(folder / f"{stem}.jpg", quality=95)
            annotation = {"text": [f"the {name} shape"], "is_sentence": False,
                          "shapes": [{"label": "target", "points": points, "group_id": None, "shape_type": "polygon",
                                      "flags": {}}],
                          "imagePath": f"{stem}.jpg", "imageHeight": h, "imageWidth": w}
            (folder / f"{stem}.json").write_text(json.dumps(annotation))
            count += 1
    return count


# -- params and stages -------------------------------------------------------------------------

def set_key(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    if last not in node:
        raise KeyError(f"params.yaml has no {dotted}")
    node[last] = value


def lookup(params: dict, dotted: str):
    node = params
    for key in dotted.split("."):
        node = node[key]
    return node


def stage_command(dvc: dict, params: dict, stage: str, grto: str) -> str:
    """A stage's cmd from dvc.yaml with ${...} filled in from params.yaml and `grto` run as ``grto``."""
    cmd = " ".join(str(dvc["stages"][stage]["cmd"]).split())
    cmd = re.sub(r"\$\{([\w.]+)\}", lambda m: str(lookup(params, m.group(1))), cmd)
    return re.sub(r"^grto\b", grto, cmd)


def read_curve(path: Path) -> dict[int, float]:
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]] if path.is_file() else []
    return {int(float(r[0])): float(r[-1]) for r in rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.write_checkpoints:
        print(json.dumps(write_checkpoints(args)), flush=True)
        return 0

    import yaml

    from grto_cli.core.project import write_project

    project = args.project.resolve()
    args.project = project
    write_project(project, SETTING)
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    grto = f"{shlex.quote(sys.executable)} -m grto_cli"
    changed = {"launch": args.launch or grto, "train.steps": 1, "train.method": "grto"}
    if args.smoke:
        changed.update(SMOKE_PARAMS)
    for key, value in changed.items():
        set_key(params, key, value)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))  # (comments are not kept)

    (project / "checkpoints").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.run([sys.executable, __file__, "--project", str(project), "--size", args.size,
                            "--write-checkpoints", *(["--smoke"] if args.smoke else [])],
                           env=env, capture_output=True, text=True)
    if child.returncode != 0:
        print(child.stdout[-3000:] + child.stderr[-5000:], file=sys.stderr)
        return 1
    checkpoints = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"checkpoints: policy {checkpoints['policy_params'] / 1e9:.2f}B params, SAM "
          f"{checkpoints['sam_params'] / 1e6:.0f}M, written in {checkpoints['seconds']} s", flush=True)
    w, h = (int(v) for v in args.image_size.split("x"))
    n_train = args.train or int(params["train"]["queries_per_step"])
    images = write_reasonseg(project / "raw", {"train": n_train, "val": args.val}, (w, h))

    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    result: dict = {"benchmark": "real_pipeline_step", "setting": SETTING, "size": "tiny" if args.smoke else args.size,
                    "smoke": args.smoke, "params_changed": changed, "checkpoints": checkpoints,
                    "images": images, "image_size": args.image_size, "stages": {}}
    ok = True
    for stage in args.stages:
        cmd = stage_command(dvc, params, stage, grto)
        print(f"$ {cmd}", flush=True)
        started = time.perf_counter()
        log = project / f"{stage}.log"
        with log.open("w") as out:
            proc = subprocess.run(cmd, shell=True, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
        seconds = round(time.perf_counter() - started, 1)
        result["stages"][stage] = {"seconds": seconds, "returncode": proc.returncode, "log": str(log)}
        print(f"{stage}: {seconds} s, exit {proc.returncode}", flush=True)
        if proc.returncode != 0:
            print(log.read_text()[-6000:], file=sys.stderr, flush=True)
            ok = False
            break
    if "train" in result["stages"] and ok:
        curves = project / str(params["train"]["live"]) / "plots" / "metrics"
        result["train_step"] = {name: read_curve(curves / "perf" / f"{name}.tsv").get(1)
                                for name in ("step_seconds", "rollouts_per_second", "peak_gpu_mem_gib")}
        result["train_step"]["completion_tokens"] = read_curve(curves / "rollout/completion_tokens.tsv").get(1)
        result["train_step"]["format_rate"] = read_curve(curves / "rollout/format_rate.tsv").get(1)
    result["ok"] = ok
    print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
