"""GRTO's tool objective: train the tool on the prompts the policy actually emits.

L_tool = weighted mean over valid rollouts of seg_loss(tool(image, call), ground truth): a
Monte-Carlo estimate of E_{y~pi}[seg_loss], the differentiable surrogate of the expected IoU
reward. Only the prompt encoder and mask decoder receive gradients; image embeddings come from
the frozen encoder. B-GRTO's bootstrap (the same objective on cached rollouts) is in bootstrap.py.
"""

from __future__ import annotations

from typing import Sequence

import torch

from grto_cli.core.answer import ToolCall
from grto_cli.core.tool import Embeddings, Tool, seg_loss

TOOL_WEIGHTINGS = ("uniform", "positive", "softmax")


def rollout_weights(advantages: torch.Tensor, group_size: int, weighting: str) -> torch.Tensor:
    """How much each rollout (N,) counts in the tool loss. "uniform" is the method; the others are ablations."""
    if weighting == "uniform":
        return torch.ones_like(advantages)
    if weighting == "positive":
        return (advantages > 0).float()
    if weighting == "softmax":
        return torch.softmax(advantages.view(-1, group_size), dim=1).flatten() * group_size
    raise ValueError(f"unknown tool weighting {weighting!r}; expected one of {TOOL_WEIGHTINGS}")


def tool_loss(tool: Tool, embeddings: Embeddings, calls: Sequence[Sequence[ToolCall | None]],
              targets: Sequence[torch.Tensor], kind: str = "dice_bce",
              weights: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Weighted mean seg loss over valid calls; ``calls[i]`` are image i's calls. Returns (loss, n_valid).

    Unparsable calls (None) have no mask to train and are left out of the mean, not counted as zero.
    """
    total, weight, n_valid = tool_loss_terms(tool, embeddings, calls, targets, kind, weights)
    return total / max(weight, 1e-8), n_valid


def tool_loss_terms(tool: Tool, embeddings: Embeddings, calls: Sequence[Sequence[ToolCall | None]],
                    targets: Sequence[torch.Tensor], kind: str = "dice_bce",
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int]:
    """``tool_loss`` before its division: (weighted loss sum, weight sum, n_valid), so processes
    holding parts of one batch can share a single normaliser."""
    losses, w = [], []
    offset = 0
    for i, image_calls in enumerate(calls):
        valid = [j for j, c in enumerate(image_calls) if c is not None]
        if valid:
            target = targets[i]  # (H, W)
            logits = tool.decode(embeddings[i:i + 1], [image_calls[j] for j in valid], tuple(target.shape))
            losses.append(seg_loss(logits, target[None].expand(len(valid), -1, -1), kind))
            w.append(weights[[offset + j for j in valid]] if weights is not None else torch.ones(len(valid)))
        offset += len(image_calls)
    if not losses:
        return torch.zeros((), device=embeddings.device, requires_grad=True), 0.0, 0
    loss, weight = torch.cat(losses), torch.cat(w).to(embeddings.device)
    return (loss * weight).sum(), float(weight.sum()), int(len(loss))


def tool_optimizer(tool: Tool, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(tool.trainable_parameters(), lr=lr, weight_decay=weight_decay)


def freeze_image_encoder(tool: Tool) -> None:
    tool.freeze_image_encoder()


class ToolLossTerms(torch.nn.Module):
    """``tool_loss_terms`` as a module, so that DDP sees its forward (``Processes.wrap``)."""

    def __init__(self, tool: Tool):
        super().__init__()
        self.tool, self.tool_module = tool, tool.module

    def forward(self, embeddings, calls, targets, kind: str, weights):
        total, weight, n_valid = tool_loss_terms(self.tool, embeddings, calls, targets, kind, weights)
        # Every trainable parameter takes part in every backward (with gradient 0 where unused), so
        # a process whose rollouts hold no valid call still joins DDP's gradient all-reduce.
        zero = sum(p.sum() for p in self.tool_module.parameters() if p.requires_grad) * 0.0
        return total + zero, weight, n_valid
