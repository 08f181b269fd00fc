"""Loading the policy + tool a stage runs, as the ``policy`` section says."""

from __future__ import annotations

from grto_cli.core.checkpoint import SystemPaths, load_system
from grto_cli.core.policy import Policy
from grto_cli.core.tool import SamTool
from grto_cli.stages.common import PolicyParams, pick_device, pick_dtype


def load_stage_system(paths: SystemPaths, pol: PolicyParams) -> tuple[Policy, SamTool]:
    """Policy + tool on the device and dtype the ``policy`` section asks for."""
    device = pick_device(pol.device)
    return load_system(paths, pol.prompt_template, device, pick_dtype(pol.dtype, device), pol.trust_remote_code,
                       pol.coord_convention)
