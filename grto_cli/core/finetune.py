"""How the policy is made ready for RL, before any engine wraps it: LoRA adapters or a full
fine-tune, activation checkpointing, the frozen vision tower, dropout off, the frozen reference.

Dropout is off in every RL pass: rollouts are sampled with the model in eval mode, so a log-prob
pass with dropout on (LoRA's 0.05 in every real template) would take the gradient of a
distribution nobody sampled from (TRL turns dropout off for GRPO too). The model stays in train
mode for its log-prob passes, where transformers' activation checkpointing works.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from grto_cli.core.policy import Policy, vision_tower


@dataclass
class LoraParams:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05  # off during RL (see the module docstring); kept in the saved adapter config
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def prepare_policy(policy: Policy, lora: LoraParams | None, freeze_vision: bool, activation_checkpointing: bool) -> None:
    """In place: checkpointing on (non-reentrant), LoRA adapters on the language model's projections
    (``lora``) or every weight trainable but the vision tower (unless ``freeze_vision`` is off), and
    dropout off everywhere."""
    if activation_checkpointing:
        _checkpoint_activations(policy.model, lora is not None)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        # The vision tower stays frozen: LoRA goes on the language model's projections only.
        targets = rf".*language_model.*\.({'|'.join(lora.target_modules)})$"
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
        policy.model = get_peft_model(policy.model, config)
    else:
        _prepare_full_finetune(policy.model, freeze_vision)
    disable_dropout(policy.model)


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of ``model`` at 0: ``nn.Dropout`` modules (LoRA's included) and the attention
    dropout rate attention modules read in their forward (the saved config is left as it is)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def frozen_reference(policy: Policy, lora: LoraParams | None) -> torch.nn.Module | None:
    """The KL's reference: a frozen copy of the initial policy for a full fine-tune; None under LoRA,
    whose reference is the same model with its adapters disabled (no second copy)."""
    if lora is not None:
        return None
    reference = copy.deepcopy(policy.model).eval()
    reference.requires_grad_(False)
    return reference


def _checkpoint_activations(model: torch.nn.Module, lora: bool) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model.enable_input_require_grads()  # frozen embeddings: LoRA's checkpointed blocks still get a graph


def _prepare_full_finetune(model: torch.nn.Module, freeze_vision: bool) -> None:
    """Every policy weight trains, except the vision tower unless ``freeze_vision`` is off; AdamW on
    half-precision weights is refused: at lr 1e-6 most updates fall below bf16's resolution."""
    if freeze_vision:
        vision = vision_tower(model)
        if vision is None:
            raise ValueError(f"freeze_vision: no vision tower found in {type(model).__name__}; "
                             f"set train.freeze_vision: false to train every weight")
        vision.requires_grad_(False)
    half = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
    if half:
        raise ValueError(f"full fine-tuning (train.lora: null) of {', '.join(half)} weights: AdamW would update "
                         f"them in that precision, and updates below its resolution round away. Load the "
                         f"policy in float32 (policy.dtype: float32) or train LoRA adapters (train.lora)")
