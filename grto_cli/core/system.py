"""A system = policy + tool. One checkpoint layout for every stage that writes or reads one:

    <dir>/policy/   a `save_pretrained` directory (model + processor)
    <dir>/tool/     sam.pt (segment-anything state dict) + sam.yaml (architecture)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grto_cli.core.policy import Policy, load_policy
from grto_cli.core.tool import EmbeddingCache, SamTool, load_sam

POLICY_DIR = "policy"
TOOL_DIR = "tool"


@dataclass
class SystemPaths:
    policy: str  # directory or hub id
    tool: str  # directory with sam.pt + sam.yaml, or Meta's .pth file
    tool_arch: str | dict | None = None


def checkpoint_paths(checkpoint: str | Path | None, policy: str | None = None, tool: str | None = None,
                     tool_arch: str | dict | None = None) -> SystemPaths:
    """Resolve where policy and tool come from; explicit paths win over the checkpoint layout."""
    if checkpoint is None and (policy is None or tool is None):
        raise ValueError("give a checkpoint directory, or both a policy and a tool path")
    root = Path(checkpoint) if checkpoint is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {root} (expected {root}/{POLICY_DIR}/ "
                                f"and {root}/{TOOL_DIR}/sam.pt + sam.yaml)")
    return SystemPaths(policy=policy or str(root / POLICY_DIR), tool=tool or str(root / TOOL_DIR),
                       tool_arch=tool_arch)


def load_system(paths: SystemPaths, prompt_template: str, device: str = "cpu", dtype: str = "float32",
                trust_remote_code: bool = False, coord_convention: str | None = None,
                embedding_cache: EmbeddingCache | None = None) -> tuple[Policy, SamTool]:
    policy = load_policy(paths.policy, prompt_template=prompt_template, device=device, dtype=dtype,
                         trust_remote_code=trust_remote_code, coord_convention=coord_convention)
    policy.model.eval()
    sam, arch = load_sam(paths.tool, paths.tool_arch)
    sam.to(device)
    return policy, SamTool(sam, arch, embedding_cache)
