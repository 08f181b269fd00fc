"""The closed registry of tool kinds, and which kind a tool path holds.

A system's ``tool/`` directory (or a path given as ``tool``) holds one of:

    sam       ``sam.pt`` + ``sam.yaml`` (segment-anything), or Meta's bare ``sam_vit_*.pth`` file with a
              tool arch; no kind file: a directory without one is "sam", as every directory written
              before the Tool interface
    sam-hf    as sam2-hf, of a ``SamModel`` (``config.json`` with model_type "sam"); ``tool.yaml`` (kind: sam-hf)
    sam2-hf   a transformers ``save_pretrained`` directory of a ``Sam2Model`` + its processor
              (``config.json`` with model_type "sam2"); grto writes ``tool.yaml`` (kind: sam2-hf) beside it
    sam2      Meta's ``sam2`` package (``grto[sam2]``): ``sam2.pt`` (Meta's format) + ``sam2.yaml`` + ``tool.yaml``
              (kind: sam2), or Meta's bare ``sam2_hiera_*.pt`` / ``sam2.1_hiera_*.pt`` with a SAM2 tool arch
              (``sam2_meta.SAM2_ARCHS``: sam2.1_hiera_l ...)

``tool.yaml`` records the kind of every directory grto writes other than "sam".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import yaml

from grto_cli.core.io import write_text
from grto_cli.core.sam2_meta import SAM2_ARCHS, SAM2_KIND
from grto_cli.core.tool import (DEFAULT_ENCODE_BATCH, SAM_ARCH, SAM_KIND, SAM_PRESETS, SAM_WEIGHTS, EmbeddingCache,
                                SamTool, Tool, load_sam)

KIND_FILE = "tool.yaml"
SAM_HF_KIND = "sam-hf"
SAM2_HF_KIND = "sam2-hf"
# model_type in a from_pretrained directory's config.json -> the kind that loads it
HF_MODEL_TYPES = {"sam": SAM_HF_KIND, "sam2": SAM2_HF_KIND}


def _load_sam(path: str | Path, arch, device: str, cache: EmbeddingCache | None, encode_batch: int) -> Tool:
    if isinstance(arch, str) and arch not in SAM_PRESETS:
        raise ValueError(f"unknown tool arch {arch!r} for {path}; expected a SAM preset {sorted(SAM_PRESETS)} or a "
                         f"SAM2 one {sorted(SAM2_ARCHS)}")
    sam, resolved = load_sam(path, arch)
    sam.to(device)
    return SamTool(sam, resolved, cache, encode_batch)


def _load_sam_hf(path: str | Path, arch, device: str, cache: EmbeddingCache | None, encode_batch: int) -> Tool:
    if arch is not None:
        raise ValueError(f"tool arch {arch!r} given for {path}, a Hugging Face SAM directory: its config.json "
                         f"says the architecture (set the tool arch to null)")
    from grto_cli.core.sam_hf import load_sam_hf

    return load_sam_hf(path, device, cache, encode_batch)


def _load_sam2_hf(path: str | Path, arch, device: str, cache: EmbeddingCache | None, encode_batch: int) -> Tool:
    if arch is not None:
        raise ValueError(f"tool arch {arch!r} given for {path}, a Hugging Face SAM2 directory: its config.json "
                         f"says the architecture (set the tool arch to null)")
    from grto_cli.core.sam2_hf import load_sam2_hf

    return load_sam2_hf(path, device, cache, encode_batch)


def _load_sam2(path: str | Path, arch, device: str, cache: EmbeddingCache | None, encode_batch: int) -> Tool:
    from grto_cli.core.sam2_meta import load_sam2

    return load_sam2(path, arch, device, cache, encode_batch)


# kind -> loader(path, arch, device, cache, encode_batch)
TOOL_KINDS: dict[str, Callable[..., Tool]] = {SAM_KIND: _load_sam, SAM_HF_KIND: _load_sam_hf,
                                              SAM2_HF_KIND: _load_sam2_hf, SAM2_KIND: _load_sam2}


def _is_sam2_arch(arch) -> bool:
    """A SAM2 preset name, or a SAM2 model config (``{"model": ...}``); SAM's presets and SamArch
    fields are neither."""
    return arch in SAM2_ARCHS if isinstance(arch, str) else isinstance(arch, dict) and "model" in arch


def tool_kind(path: str | Path, arch: str | dict | None = None) -> str:
    """The kind a tool path holds: ``tool.yaml``'s, else a from_pretrained directory's model type,
    else "sam" (a directory with sam.pt + sam.yaml). A bare file is Meta's checkpoint of the kind
    its tool arch names: "sam2" for a SAM2 arch (``sam2.1_hiera_l`` ...), else "sam" (``vit_h`` ...)."""
    path = Path(path)
    if not path.is_dir():
        return SAM2_KIND if _is_sam2_arch(arch) else SAM_KIND
    kind_file = path / KIND_FILE
    if kind_file.is_file():
        spec = yaml.safe_load(kind_file.read_text()) or {}
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in TOOL_KINDS:
            raise ValueError(f"{kind_file}: unknown tool kind {kind!r}; expected one of {sorted(TOOL_KINDS)}")
        return kind
    config = path / "config.json"
    if config.is_file() and not (path / SAM_WEIGHTS).is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"{config}: model_type {model_type!r} is not a tool grto can load; expected one of "
                             f"{sorted(HF_MODEL_TYPES)} (Hugging Face format) or a directory with "
                             f"{SAM_WEIGHTS} + {SAM_ARCH}")
        return HF_MODEL_TYPES[model_type]
    return SAM_KIND


def check_kind(directory: str | Path, expected: str) -> None:
    """Raise unless ``directory`` holds a tool of kind ``expected`` (loading one kind's weights into another)."""
    found = tool_kind(directory)
    if found != expected:
        raise ValueError(f"{directory} holds a {found!r} tool, expected {expected!r} (the tool being trained)")


def write_kind(directory: str | Path, kind: str) -> None:
    if kind not in TOOL_KINDS:
        raise ValueError(f"unknown tool kind {kind!r}; expected one of {sorted(TOOL_KINDS)}")
    write_text(Path(directory) / KIND_FILE, yaml.safe_dump({"kind": kind}, sort_keys=True))


def load_tool(path: str | Path, arch: str | dict | None = None, device: str | torch.device = "cpu",
              cache: EmbeddingCache | None = None, encode_batch: int = DEFAULT_ENCODE_BATCH) -> Tool:
    """The tool at ``path``, whatever its kind, on ``device``, in eval mode."""
    return TOOL_KINDS[tool_kind(path, arch)](path, arch, device, cache, encode_batch)
