"""The self-contained bundle `grto export` writes and `grto predict` reads: a system in the
checkpoint layout (LoRA merged) plus ``grto.yaml``::

    <bundle>/policy/    save_pretrained model (LoRA merged) + processor
    <bundle>/tool/      the tool's directory (for SAM: sam.pt + sam.yaml); grto.yaml names its kind
    <bundle>/grto.yaml  prompt template, coordinate convention, answer format, provenance
"""

from __future__ import annotations

from pathlib import Path

import yaml

from grto_cli.core.answer import ANSWER_FORMAT
from grto_cli.core.checkpoint import POLICY_DIR, TOOL_DIR, SystemPaths, load_system, save_system
from grto_cli.core.io import atomic_dir, write_text
from grto_cli.core.policy import Policy, pixel_limits
from grto_cli.core.tool import SAM_ARCH, SAM_KIND, SAM_WEIGHTS, Tool
from grto_cli.core.tool_kinds import tool_kind

BUNDLE_FILE = "grto.yaml"


def write_bundle(policy: Policy, tool: Tool, out: str | Path, settings: dict, provenance: dict) -> Path:
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_system(policy, tool, tmp, merge_lora=True)
        manifest = {
            "format": "grto-bundle/1",
            "policy": {"path": POLICY_DIR, "model_type": getattr(policy.model.config, "model_type", None),
                       "prompt_template": policy.prompt_template, "coord_convention": policy.coord_convention,
                       **pixel_limits(policy.processor),  # the saved processor resizes with these bounds
                       "answer_format": ANSWER_FORMAT, **settings},
            "tool": _tool_manifest(tool),
            "provenance": provenance,
        }
        write_text(tmp / BUNDLE_FILE, yaml.safe_dump(manifest, sort_keys=False))
    return out


def _tool_manifest(tool: Tool) -> dict:
    if tool.kind == SAM_KIND:
        return {"kind": SAM_KIND, "weights": f"{TOOL_DIR}/{SAM_WEIGHTS}", "arch": f"{TOOL_DIR}/{SAM_ARCH}",
                "library": "segment-anything"}
    return {"kind": tool.kind, "path": TOOL_DIR, "library": "transformers"}


def read_bundle(bundle: str | Path, device: str = "cpu", dtype: str = "float32") -> tuple[Policy, Tool, dict]:
    bundle = Path(bundle)
    spec_file = bundle / BUNDLE_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"not a grto bundle: {spec_file} is missing (expected {BUNDLE_FILE}, "
                                f"{POLICY_DIR}/ and {TOOL_DIR}/ written by `grto export`)")
    spec = yaml.safe_load(spec_file.read_text())
    p = spec["policy"]
    kind = spec.get("tool", {}).get("kind", SAM_KIND)  # bundles from before the Tool interface: SAM
    found = tool_kind(bundle / TOOL_DIR)
    if found != kind:
        raise ValueError(f"{spec_file} names a {kind!r} tool but {bundle / TOOL_DIR} holds a {found!r} one")
    policy, tool = load_system(SystemPaths(policy=str(bundle / p["path"]), tool=str(bundle / TOOL_DIR)),
                               p["prompt_template"], device, dtype, coord_convention=p["coord_convention"])
    return policy, tool, spec
