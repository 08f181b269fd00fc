"""Loading the policy + tool a stage runs, as the ``policy`` and ``tool`` sections say."""

from __future__ import annotations

from grto_cli.core.checkpoint import SystemPaths, load_system
from grto_cli.core.distributed import Processes
from grto_cli.core.policy import Policy
from grto_cli.core.tool import EmbeddingCache, Tool
from grto_cli.stages.params import ConfigError
from grto_cli.stages.runtime import pick_dtype, process_device
from grto_cli.stages.sections import PolicyParams, ToolParams


def load_stage_system(paths: SystemPaths, pol: PolicyParams, tool: ToolParams,
                      processes: Processes | None = None) -> tuple[Policy, Tool]:
    """Policy + tool on the device and dtype the ``policy`` section asks for (this process's GPU when
    a launcher started several); the tool's encoder chunking and embedding cache as the ``tool`` section asks."""
    device = process_device(pol.device, processes or Processes())
    cache = EmbeddingCache(max_bytes=tool.cache_bytes, disk_dir=tool.cache_dir)
    try:
        policy, sam = load_system(paths, pol.prompt_template, device, pick_dtype(pol.dtype, device),
                                  pol.trust_remote_code, pol.coord_convention, cache, tool.encode_batch,
                                  pol.min_pixels, pol.max_pixels)
    except ValueError as exc:  # e.g. an unknown model family without policy.coord_convention
        raise ConfigError(str(exc)) from None
    policy.generation_cache = pol.generation_cache
    return policy, sam
