"""FSDP2 (torch's ``fully_shard``) for a full fine-tune of the policy over several processes.

``train.sharding: fsdp`` splits the policy's weights, gradients and AdamW states over the
processes instead of keeping a whole copy per process (DDP): a float32 7B policy needs ~16 bytes
per trainable weight (~124 GB), which no single 80 GB GPU holds. The layout, innermost first:
the vision tower (one group), each decoder layer of the language model (one group each), and the
root, ``trainer.PolicyLogprobs`` around the model (embeddings, final norm, LM head). A group's
weights are gathered just before its forward and freed after it; gradients are reduce-scattered
(averaged) after its backward, so each process keeps 1/N of them and of AdamW's states.

What sharding asks of the rest of the code:

- Lockstep. Every process must run every forward of the sharded model, since each one gathers
  weights from all processes: ``generate`` runs with ``synced_gpus`` (a process whose rows have
  ended keeps stepping until every process's have), and ``Processes.in_order`` gives a process
  without a unit of the last round a copy of the last unit to run (its result is dropped).
- The root's own weights (embeddings, LM head) are gathered by the root's forward, i.e. by the
  log-prob pass; ``gathered`` gathers them around ``generate``, which does not go through it.
- Checkpoints hold the whole model in transformers' layout: ``full_model_state`` and
  ``full_optimizer_state`` gather them into the main process's CPU memory (every process takes
  part; the others get an empty dict, so N processes never hold N whole copies), which writes;
  ``load_full_model_state`` / ``load_full_optimizer_state`` send them from the main process back
  into every process's shards.

The math is DDP's: the same global batch, normalisers and clipping (``clip_grad_norm_`` on sharded
gradients computes the global norm), so N sharded processes train what one process does.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

SHARDINGS = ("none", "fsdp", "zero3")  # zero3: DeepSpeed ZeRO-3 (zero3.py)
ENGINE = "FSDP"
ROOT_PREFIX = "model."  # the root (trainer.PolicyLogprobs) holds the transformers model as .model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's decoder layers of a Qwen-family VLM (``language_model.layers``)."""
    for name, module in model.named_modules():
        if name.endswith("language_model.layers") and isinstance(module, torch.nn.ModuleList):
            return list(module)
    raise ValueError(f"train.sharding: fsdp: no language_model.layers found in {type(model).__name__}")


def shard(root: torch.nn.Module, model: torch.nn.Module, vision: torch.nn.Module | None) -> torch.nn.Module:
    """Shard ``model`` (held by ``root``) over the process group, in place: ``vision`` and each
    decoder layer are groups of their own, ``root`` takes the rest. Returns ``root``, now an FSDP
    module; the model's parameters are replaced by sharded ones (build optimisers after this)."""
    from torch.distributed.fsdp import fully_shard

    if vision is not None:
        fully_shard(vision)
    for layer in decoder_layers(model):
        fully_shard(layer)
    root = fully_shard(root)
    # FSDP2 settles which module is the root at the root's first forward, and refuses a group that
    # ran first (generation runs the vision tower before any log-prob pass): settle it now.
    root._get_fsdp_state()._lazy_init()
    return root


def sharded_fraction(model: torch.nn.Module) -> float:
    """The share of the model's weights this process holds (1 / N under FSDP, 1 unsharded)."""
    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local / max(total, 1)


@contextlib.contextmanager
def gathered(root: torch.nn.Module | None) -> Iterator[None]:
    """The root group's weights whole inside the block (for a forward that does not enter the root,
    such as ``generate``); nothing to do for an unsharded policy."""
    if root is None:
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


@contextlib.contextmanager
def no_gradient_sync(root: torch.nn.Module) -> Iterator[None]:
    """Backward passes inside keep their gradients local (unreduced), as DDP's ``no_sync``."""
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict in transformers' names, on the main process's CPU (every process
    calls this; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(root, options=_options(cpu_offload=True))
    return {k.removeprefix(ROOT_PREFIX): v for k, v in state.items()}


def is_main_process() -> bool:
    """Whether this process writes whole states (rank 0 of the process group; zero3.py too)."""
    return torch.distributed.get_rank() == 0


def load_full_model_state(root: torch.nn.Module, read: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Each process keeps its shard of a whole state dict in transformers' names: the main process
    ``read()``s it and sends each tensor to the others (so N processes never hold N whole copies)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = {ROOT_PREFIX + k: v for k, v in read().items()} if is_main_process() else {}
    set_model_state_dict(root, state, options=_options(broadcast_from_rank0=True))


def full_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's whole state, keyed by parameter name, on the main process's CPU (every process
    calls this; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(root, optimizer, options=_options(cpu_offload=True))


def load_full_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Each process keeps its shard of the optimiser's whole state, sent by the main process (the
    others' ``state`` is never read: a memory-mapped file stays on disk)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, optim_state_dict=state if is_main_process() else {},
                             options=_options(broadcast_from_rank0=True))
