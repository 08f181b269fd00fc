"""The self-contained bundle `grto export` writes and `grto predict` reads:

    <bundle>/policy/    save_pretrained model (LoRA merged) + processor
    <bundle>/tool/      sam.pt (segment-anything state dict) + sam.yaml
    <bundle>/grto.yaml  prompt template, coordinate convention, answer format, provenance
"""

from __future__ import annotations

from pathlib import Path

import yaml

from grto_cli.core.io import atomic_dir, write_text
from grto_cli.core.policy import Policy, load_policy
from grto_cli.core.system import POLICY_DIR, TOOL_DIR
from grto_cli.core.tool import SamTool, load_sam, save_sam

BUNDLE_FILE = "grto.yaml"
ANSWER_FORMAT = '<answer>{"bbox": [x1, y1, x2, y2], "points": [[x, y]]}</answer>'


def merged_model(policy: Policy):
    """The policy's model with any LoRA adapters folded into the weights."""
    model = policy.model
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def write_bundle(policy: Policy, tool: SamTool, out: str | Path, settings: dict, provenance: dict) -> Path:
    out = Path(out)
    with atomic_dir(out) as tmp:
        merged_model(policy).save_pretrained(tmp / POLICY_DIR)
        policy.processor.save_pretrained(tmp / POLICY_DIR)
        save_sam(tool.sam, tool.arch, tmp / TOOL_DIR)
        manifest = {
            "format": "grto-bundle/1",
            "policy": {"path": POLICY_DIR, "model_type": getattr(policy.model.config, "model_type", None),
                       "prompt_template": policy.prompt_template, "coord_convention": policy.coord_convention,
                       "answer_format": ANSWER_FORMAT, **settings},
            "tool": {"weights": f"{TOOL_DIR}/sam.pt", "arch": f"{TOOL_DIR}/sam.yaml",
                     "library": "segment-anything"},
            "provenance": provenance,
        }
        write_text(tmp / BUNDLE_FILE, yaml.safe_dump(manifest, sort_keys=False))
    return out


def read_bundle(bundle: str | Path, device: str = "cpu", dtype: str = "float32") -> tuple[Policy, SamTool, dict]:
    bundle = Path(bundle)
    spec_file = bundle / BUNDLE_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"not a grto bundle: {spec_file} is missing (expected {BUNDLE_FILE}, "
                                f"{POLICY_DIR}/ and {TOOL_DIR}/ written by `grto export`)")
    spec = yaml.safe_load(spec_file.read_text())
    p = spec["policy"]
    policy = load_policy(bundle / p["path"], prompt_template=p["prompt_template"], device=device, dtype=dtype,
                         coord_convention=p["coord_convention"])
    policy.model.eval()
    sam, arch = load_sam(bundle / TOOL_DIR)
    return policy, SamTool(sam.to(device), arch), spec
