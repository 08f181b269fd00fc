"""Checks shared by every config, in core and in the stages."""

from __future__ import annotations

from typing import Any

# The RL methods grto trains with (core/trainer.py runs them; the study compares them).
METHODS = ("grpo", "grto", "b-grto")

# The KV cache generation decodes with: transformers' dynamic cache (grown token by token), or a
# static one preallocated for prompt + max_new_tokens, whose fixed shapes let transformers compile
# the decoding step (CUDA graphs) on CUDA; on the CPU it is only preallocated. The same completions.
GENERATION_CACHES = {"dynamic": None, "static": "static"}  # -> GenerationConfig.cache_implementation


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Refuse a value outside an enumerated option, naming the allowed values."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


def check_positive(name: str, value: int) -> None:
    """Refuse a count below 1 (a step count, an epoch count, a batch size), naming the key."""
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")

