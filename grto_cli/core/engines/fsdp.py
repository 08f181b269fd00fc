"""FSDP2 (torch's ``fully_shard``) for a full fine-tune of the policy over several processes.

``train.sharding: fsdp`` splits the policy's weights, gradients and AdamW states over the
processes instead of keeping a whole copy per process (DDP): a float32 7B policy needs ~16 bytes
per trainable weight (~124 GB), which no single 80 GB GPU holds. The layout, innermost first:
the vision tower (one group), each decoder layer of the language model (one group each), and the
root, ``rollout.PolicyLogprobs`` around the model (embeddings, final norm, LM head). A group's
weights are gathered just before its forward and freed after it; gradients are reduce-scattered
(averaged) after its backward, so each process keeps 1/N of them and of AdamW's states.

What sharding asks of the rest of the code:

- Lockstep. Every process must run every forward of the sharded model, since each one gathers
  weights from all processes: ``generate`` runs with ``synced_gpus`` (a process whose rows have
  ended keeps stepping until every process's have), and ``Processes.in_order`` gives a process
  without a unit of the last round a copy of the last unit to run (its result is dropped).
- The root's own weights (embeddings, LM head) are gathered by the root's forward, i.e. by the
  log-prob pass; ``generating`` gathers them around ``generate``, which does not go through it.
- Checkpoints hold the whole model in transformers' layout: ``model_state`` and
  ``optimizer_state`` gather them into the main process's CPU memory (every process takes part;
  the others get an empty dict, so N processes never hold N whole copies), which writes;
  ``load_model_state`` / ``load_optimizer_state`` send them from the main process back into every
  process's shards.

The math is DDP's: the same global batch, normalisers and clipping (``clip_grad_norm_`` on sharded
gradients computes the global norm), so N sharded processes train what one process does.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from grto_cli.core.engines.base import Engine, adamw, is_main_process
from grto_cli.core.policy import vision_tower

ROOT_PREFIX = "model."  # the root (rollout.PolicyLogprobs) holds the transformers model as .model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's decoder layers of a Qwen-family VLM (``language_model.layers``)."""
    for name, module in model.named_modules():
        if name.endswith("language_model.layers") and isinstance(module, torch.nn.ModuleList):
            return list(module)
    raise ValueError(f"train.sharding: fsdp: no language_model.layers found in {type(model).__name__}")


def shard(root: torch.nn.Module) -> torch.nn.Module:
    """Shard ``root.model`` over the process group, in place: its vision tower and each decoder
    layer are groups of their own, ``root`` takes the rest. Returns ``root``, now an FSDP module;
    the model's parameters are replaced by sharded ones (build optimisers after this)."""
    from torch.distributed.fsdp import fully_shard

    vision = vision_tower(root.model)
    if vision is not None:
        fully_shard(vision)
    for layer in decoder_layers(root.model):
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


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


class FsdpEngine(Engine):
    name, label, sharded = "fsdp", "FSDP", True

    def prepare(self, root: torch.nn.Module, reference: torch.nn.Module | None, lr: float) -> None:
        self.root = self.policy_pass = shard(root)
        self.reference_pass = shard(reference) if reference is not None else None
        self.optimizer = adamw(self.root, lr)  # on the sharded parameters

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.policy_pass.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.policy_pass.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def generating(self) -> Iterator[dict]:
        self.policy_pass.unshard()
        try:
            yield {"synced_gpus": True}
        finally:
            self.policy_pass.reshard()

    def model_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.policy_pass, options=_options(cpu_offload=True))
        return {k.removeprefix(ROOT_PREFIX): v for k, v in state.items()}

    def load_model_state(self, read: Callable[[], dict[str, torch.Tensor]]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        state = {ROOT_PREFIX + k: v for k, v in read().items()} if is_main_process() else {}
        set_model_state_dict(self.policy_pass, state, options=_options(broadcast_from_rank0=True))

    def optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.policy_pass, self.optimizer, options=_options(cpu_offload=True))

    def load_optimizer_state(self, state: dict) -> None:
        """Each process keeps its shard, sent by the main process (the others' ``state`` is never
        read: a memory-mapped file stays on disk)."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.policy_pass, self.optimizer, optim_state_dict=state if is_main_process() else {},
                                 options=_options(broadcast_from_rank0=True))

    def sharded_fraction(self) -> float:
        return sharded_fraction(self.root.model)
