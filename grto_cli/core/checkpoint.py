"""The one on-disk layout of a system (policy + tool) and of a training run; nothing else writes them.

A system, as every stage writes and reads it::

    <system>/policy/   a `save_pretrained` directory: model (or LoRA adapter) + processor
    <system>/tool/     the tool's directory (``Tool.save``; its kind: ``tool_kinds.py``): for SAM,
                       sam.pt (segment-anything state dict) + sam.yaml (architecture)

A training run's checkpoints, one directory per run (its id is a short hash of what defines it:
the algorithm config and the content hashes of its inputs), so runs of other configurations are
never touched::

    <checkpoints>/<run id>/run.json   what defines the run (the resume key), readable
    <checkpoints>/<run id>/last/      a system + optim.pt, rng.pt, rng.json, state.json: to resume
    <checkpoints>/<run id>/best/      the best-on-val system
    <checkpoints>/<run id>/live/      this run's per-step curves (dvclive), published when it ends
    <checkpoints>/latest              the id of the run written last
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from grto_cli.core.io import atomic_dir, hash_path, recover_dir, write_json, write_text
from grto_cli.core.policy import Policy, load_policy
from grto_cli.core.tool import DEFAULT_ENCODE_BATCH, EmbeddingCache, Tool
from grto_cli.core.tool_kinds import load_tool

POLICY_DIR = "policy"
TOOL_DIR = "tool"
LAST, BEST, LATEST, RUN_FILE = "last", "best", "latest", "run.json"


# ----------------------------------------------------------------------------------- systems


@dataclass
class SystemPaths:
    policy: str  # directory or hub id
    tool: str  # a tool directory of any kind (tool_kinds.py), or Meta's SAM .pth file
    tool_arch: str | dict | None = None


def system_paths(system: str | Path | None, policy: str | None = None, tool: str | None = None,
                 tool_arch: str | dict | None = None) -> SystemPaths:
    """Where policy and tool come from; explicit paths win over the system layout."""
    if system is None and (policy is None or tool is None):
        raise ValueError("give a system directory, or both a policy and a tool path")
    root = Path(system) if system is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"system directory not found: {root} (expected {root}/{POLICY_DIR}/ "
                                f"and {root}/{TOOL_DIR}/sam.pt + sam.yaml)")
    return SystemPaths(policy=policy or str(root / POLICY_DIR), tool=tool or str(root / TOOL_DIR),
                       tool_arch=tool_arch)


def load_system(paths: SystemPaths, prompt_template: str, device: str = "cpu", dtype: str = "float32",
                trust_remote_code: bool = False, coord_convention: str | None = None,
                embedding_cache: EmbeddingCache | None = None, encode_batch: int = DEFAULT_ENCODE_BATCH,
                min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[Policy, Tool]:
    policy = load_policy(paths.policy, prompt_template=prompt_template, device=device, dtype=dtype,
                         trust_remote_code=trust_remote_code, coord_convention=coord_convention,
                         min_pixels=min_pixels, max_pixels=max_pixels)
    policy.model.eval()
    return policy, load_tool(paths.tool, paths.tool_arch, device, embedding_cache, encode_batch)


def save_policy(policy: Policy, system: str | Path, merge_lora: bool = False,
                state: dict[str, torch.Tensor] | None = None) -> None:
    """``<system>/policy``: the model (a LoRA model saves its adapter, which ``load_policy`` puts back
    on its base; ``merge_lora`` folds the adapters in and saves a plain model) + the processor.
    ``state``: the model's whole state dict, where its parameters are sharded (``engines/fsdp.py``,
    ``engines/zero3.py``)."""
    model = policy.model
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(Path(system) / POLICY_DIR, **({"state_dict": state} if state is not None else {}))
    policy.processor.save_pretrained(Path(system) / POLICY_DIR)


def save_tool(tool: Tool, system: str | Path) -> None:
    tool.save(Path(system) / TOOL_DIR)


def save_system(policy: Policy, tool: Tool, system: str | Path, merge_lora: bool = False,
                policy_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write into ``system`` (callers make it atomic with ``io.atomic_dir``)."""
    save_policy(policy, system, merge_lora, policy_state)
    save_tool(tool, system)


def copy_system(source: str | Path, system: str | Path) -> None:
    """Copy the policy/ and tool/ of a saved system (a checkpoint holds more) into ``system``."""
    for part in (POLICY_DIR, TOOL_DIR):
        shutil.copytree(Path(source) / part, Path(system) / part)


def load_system_weights(policy: Policy, tool: Tool, system: str | Path,
                        load_policy_state: Callable[[Callable[[], dict]], None] | None = None) -> None:
    """Load a saved system's weights into an already built policy + tool (in place).
    ``load_policy_state(read)`` puts the whole model state dict ``read()`` returns into a sharded
    policy (calling ``read`` on the processes that need it)."""
    system = Path(system)
    tool.load_weights(system / TOOL_DIR)
    model = policy.model
    if hasattr(model, "load_adapter") and hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(system / POLICY_DIR)))
        return
    from transformers import AutoModelForImageTextToText

    def read() -> dict:
        return AutoModelForImageTextToText.from_pretrained(str(system / POLICY_DIR),
                                                           dtype=next(model.parameters()).dtype).state_dict()

    if load_policy_state is not None:
        load_policy_state(read)
    else:
        model.load_state_dict(read())


# ---------------------------------------------------------------------------------- runs


def input_fingerprint(path: str | Path | None) -> str | None:
    """Content hash of a local input, or the name itself for a hub id (not a local path)."""
    if path is None:
        return None
    return hash_path(path) if Path(path).exists() else f"hub:{path}"


def run_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class RunDir:
    """The checkpoint directory of one run (one resume key) under a checkpoints root."""

    root: Path
    key: dict

    @property
    def id(self) -> str:
        return run_id(self.key)

    @property
    def path(self) -> Path:
        return self.root / self.id

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    def open(self, fresh: bool = False) -> Path | None:
        """Create the run directory (recovering a half-done swap of last/ or best/) and point
        ``latest`` at it. ``fresh`` moves an existing one aside, never deleting it; returns where."""
        moved = None
        if fresh and self.path.exists():
            moved = self.root / f"{self.id}.moved-{time.strftime('%Y%m%dT%H%M%S')}"
            self.path.rename(moved)
        self.path.mkdir(parents=True, exist_ok=True)
        recover_dir(self.last)
        recover_dir(self.best)
        write_json(self.path / RUN_FILE, {"id": self.id, "key": self.key})
        write_text(self.root / LATEST, self.id + "\n")
        return moved

    @property
    def live(self) -> Path:
        return self.path / "live"

    def resumable(self) -> bool:
        return (self.last / "state.json").is_file()

    def resume_step(self) -> int | None:
        """The step ``last/`` holds, or None when there is nothing to resume."""
        if not self.resumable():
            return None
        return int(json.loads((self.last / "state.json").read_text())["state"]["step"])


def save_resume(directory: Path, policy: Policy, tool: Tool, optimizers: dict[str, torch.optim.Optimizer | None],
                state: dict, policy_state: dict[str, torch.Tensor] | None = None,
                optimizer_states: dict[str, dict] | None = None) -> None:
    """Everything a killed run needs to go on (system, optimisers, RNG states, loop state), swapped in
    atomically. ``policy_state`` / ``optimizer_states``: whole states gathered from shards."""
    optimizer_states = optimizer_states or {}
    with atomic_dir(directory) as tmp:
        save_system(policy, tool, tmp, policy_state=policy_state)
        torch.save({name: optimizer_states[name] if name in optimizer_states
                    else opt.state_dict() if opt is not None else None for name, opt in optimizers.items()},
                   tmp / "optim.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        write_json(tmp / "rng.json", {"numpy": _jsonable(np.random.get_state()), "python": _jsonable(random.getstate())})
        write_json(tmp / "state.json", state)


def load_resume(directory: Path, policy: Policy, tool: Tool,
                optimizers: dict[str, torch.optim.Optimizer | None],
                load_policy_state: Callable[[Callable[[], dict]], None] | None = None,
                optimizer_loaders: dict[str, Callable[[dict], None]] | None = None) -> dict:
    """Restore what ``save_resume`` wrote, in place; returns the loop state. The loaders put whole
    states into sharded parameters and optimisers (by name)."""
    load_system_weights(policy, tool, directory, load_policy_state)
    # Memory-mapped: a sharded run's processes other than the main one read only the tool's part.
    saved = torch.load(directory / "optim.pt", map_location="cpu", weights_only=True, mmap=True)
    loaders = optimizer_loaders or {}
    for name, opt in optimizers.items():
        if opt is not None and saved.get(name) is not None:
            (loaders.get(name) or opt.load_state_dict)(saved[name])
    torch.set_rng_state(torch.load(directory / "rng.pt", weights_only=True)["torch"])
    rng = json.loads((directory / "rng.json").read_text())
    np.random.set_state(_unjson_numpy(rng["numpy"]))
    random.setstate(_unjson_python(rng["python"]))
    return json.loads((directory / "state.json").read_text())


def _jsonable(state):
    if isinstance(state, tuple):
        return [_jsonable(s) for s in state]
    if isinstance(state, np.ndarray):
        return {"ndarray": state.tolist(), "dtype": str(state.dtype)}
    return state


def _unjson_numpy(state):
    name, keys, pos, has_gauss, cached = state
    return (name, np.array(keys["ndarray"], dtype=keys["dtype"]), pos, has_gauss, cached)


def _unjson_python(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
