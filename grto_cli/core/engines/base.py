"""The engine interface: how the policy's gradient-carrying passes run over a run's processes.

The trainer talks to one engine (``engines.build``) and never asks which one it is. An engine owns

- the policy's log-prob pass, wrapped for its processes, the frozen reference (when there is one)
  and the policy's optimiser (``prepare``);
- ``backward`` of a loss that is already its share of the whole-batch loss, ``no_sync``
  (accumulate without reducing), and ``step`` (clip by the global norm to ``max_grad_norm``,
  update, zero; returns the norm before clipping);
- ``generating``: the weights gathered around ``generate`` and the keyword arguments it needs
  (every process steps in lockstep when the weights are sharded);
- whole states for checkpoints: ``model_state`` / ``optimizer_state`` gathered on the main
  process (None: the model and optimiser save themselves), and the loaders that put them back.

This module is the plain engine: one whole policy per process, gradients averaged by DDP when
there are several processes (``distributed.Processes.wrap``), the identity for a lone one.
FSDP2 (``fsdp.py``) and DeepSpeed ZeRO-3 (``zero3.py``) shard a full fine-tune instead.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from grto_cli.core.distributed import Processes


def is_main_process() -> bool:
    """Whether this process writes whole states (rank 0 of the process group)."""
    return torch.distributed.get_rank() == 0


def raise_everywhere(problem: str | None) -> None:
    """Raise ``problem`` (found by the main process; the others pass None) on every process as a
    ValueError: a check made on the main process alone would leave the others waiting in the next
    collective, a hang instead of an error."""
    header = [problem if is_main_process() else None]
    torch.distributed.broadcast_object_list(header, src=0)
    if header[0] is not None:
        raise ValueError(header[0])


class Engine:
    """One whole policy per process (DDP over several); see the module docstring."""

    name = "none"  # its train.sharding value
    label = "DDP"
    sharded = False  # the policy's weights are split over the processes

    def __init__(self, processes: Processes, max_grad_norm: float):
        self.processes, self.max_grad_norm = processes, max_grad_norm
        self.root: torch.nn.Module | None = None  # the unwrapped log-prob pass (holds the model as .model)
        self.policy_pass: torch.nn.Module | None = None
        self.reference_pass: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def prepare(self, root: torch.nn.Module, reference: torch.nn.Module | None, lr: float) -> None:
        """``root`` (``rollout.PolicyLogprobs`` around the policy) wrapped for the processes, the
        frozen ``reference`` pass, and AdamW (weight decay 0) on the policy's trainable weights."""
        self.root = root
        self.policy_pass = self.processes.wrap(root)
        self.reference_pass = reference
        self.optimizer = adamw(root, lr)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Backward passes inside accumulate locally; the next one outside sums over processes."""
        return self.processes.no_sync(self.policy_pass)

    def step(self) -> float:
        trainable = [p for p in self.root.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trainable, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(norm)

    @contextlib.contextmanager
    def generating(self) -> Iterator[dict]:
        """The keyword arguments ``generate`` needs, with the weights it reads whole inside."""
        yield {}

    def model_state(self) -> dict[str, torch.Tensor] | None:
        return None

    def optimizer_state(self) -> dict | None:
        return None

    def load_model_state(self, read: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.root.model.load_state_dict(read())

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def sharded_fraction(self) -> float:
        """The share of the policy's weights this process holds."""
        return 1.0


def adamw(root: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
