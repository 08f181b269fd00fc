"""`grto export` writes a self-contained bundle; `grto predict` segments one image with it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from grto_cli.core.checkpoint import load_system, system_paths
from grto_cli.core.data.images import load_rgb
from grto_cli.core.export import read_bundle, write_bundle
from grto_cli.core.inference import predict_batch
from grto_cli.core.io import atomic_path, hash_path
from grto_cli.core.visualize import overlay_sheet
from grto_cli.stages.console import summary_table
from grto_cli.stages.params import Params
from grto_cli.stages.record import versions
from grto_cli.stages.runtime import pick_device, pick_dtype, quiet_transformers
from grto_cli.stages.sections import PolicyParams


@dataclass
class ExportConfig:
    checkpoint: str = "models/trained"
    out: str = "bundles/grto"
    max_new_tokens: int = 40
    metrics: list[str] | None = None  # metrics JSON files to record in the bundle's provenance


def run(params: str | None, overrides: list[str] | None = None, **explicit) -> Path:
    read = Params(params, overrides)  # read once
    cfg, pol_cfg = read.section(ExportConfig, "export", **explicit), read.section(PolicyParams, "policy")
    quiet_transformers()
    paths = system_paths(cfg.checkpoint)
    # On the CPU (no accelerator needed to export); the policy section's dtype (bfloat16 for 7B) is kept.
    policy, tool = load_system(paths, pol_cfg.prompt_template, "cpu", pick_dtype(pol_cfg.dtype, "cpu"),
                               pol_cfg.trust_remote_code, pol_cfg.coord_convention,
                               min_pixels=pol_cfg.min_pixels, max_pixels=pol_cfg.max_pixels)
    run_record = Path(cfg.checkpoint) / "run.json"
    provenance = {
        "checkpoint": cfg.checkpoint,
        "checkpoint_sha256": hash_path(cfg.checkpoint),
        "training_run": json.loads(run_record.read_text()) if run_record.is_file() else None,
        "metrics": {m: json.loads(Path(m).read_text()) for m in cfg.metrics or [] if Path(m).is_file()},
        "versions": versions(),
    }
    settings = {"require_think": pol_cfg.require_think, "max_new_tokens": cfg.max_new_tokens}
    out = write_bundle(policy, tool, cfg.out, settings, provenance)
    summary_table("export", {"bundle": str(out), "from": cfg.checkpoint, "tool": tool.kind,
                             "metrics": ", ".join(provenance["metrics"]) or "none"})
    return out


def predict(bundle: str, image: str, query: str, out: str, device: str = "auto") -> dict:
    """Segment one image; writes the mask (0/255 PNG) and ``<out stem>.overlay.png``."""
    quiet_transformers()
    dev = pick_device(device)
    policy, tool, spec = read_bundle(bundle, dev, pick_dtype("auto", dev))
    rgb = load_rgb(image)
    settings = spec["policy"]
    text, parsed, prob, _ = predict_batch(policy, tool, [rgb], [query], settings.get("max_new_tokens", 40),
                                       settings.get("require_think", False))[0]
    mask = prob > 0.5
    out_path = Path(out)
    with atomic_path(out_path) as tmp:
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")
    overlay = out_path.with_name(out_path.stem + ".overlay.png")
    overlay_sheet(overlay, [{"image": rgb, "target": np.zeros_like(mask), "pred": mask, "call": parsed.call,
                             "caption": query}])
    result = {"tool_kind": tool.kind, "answer": text, "status": parsed.status,
              "call": parsed.call.to_dict() if parsed.call else None,
              "mask": str(out_path), "overlay": str(overlay), "mask_pixels": int(mask.sum())}
    summary_table("predict", {"tool": tool.kind, "status": parsed.status, "mask pixels": result["mask_pixels"],
                              "mask": out})
    return result

