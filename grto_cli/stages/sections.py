"""The sections every stage that runs the policy or the tool shares: ``policy`` and ``tool``, and
the training split's records."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from grto_cli.core.answer import COORD_CONVENTIONS, DEFAULT_TEMPLATE, check_template
from grto_cli.core.config import GENERATION_CACHES, check_choice
from grto_cli.core.data.records import Record, read_manifest
from grto_cli.core.tool import DEFAULT_CACHE_BYTES, DEFAULT_ENCODE_BATCH
from grto_cli.stages.console import console
from grto_cli.stages.params import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass
class PolicyParams:
    """The ``policy`` section every stage that runs the policy shares."""

    prompt_template: str = DEFAULT_TEMPLATE
    require_think: bool = False  # format reward/parse demands <think>...</think> before <answer>
    coord_convention: str | None = None  # None: by model family (absolute for Qwen2.5-VL)
    trust_remote_code: bool = False
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU (train: float32 for a full fine-tune)
    # Bounds on an image's area after the processor's resize (Qwen: one visual token per 28x28
    # pixels); null keeps the checkpoint's processor config (Qwen2.5-VL: up to ~16k tokens).
    min_pixels: int | None = None
    max_pixels: int | None = None
    # The KV cache rollouts, val and evaluate generate with (policy.GENERATION_CACHES): dynamic, or
    # static (preallocated; on CUDA transformers compiles the decoding step). Same completions on
    # the CPU (tested); the static cache's speed is not yet measured on a GPU (docs/pipelines.md).
    generation_cache: str = "dynamic"

    def validate(self) -> None:
        try:
            check_template(self.prompt_template)
        except ValueError as exc:
            raise ConfigError(f"policy.prompt_template: {exc}") from None
        check_choice("coord_convention", self.coord_convention, (None, *COORD_CONVENTIONS))
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("generation_cache", self.generation_cache, tuple(GENERATION_CACHES))
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ConfigError(f"policy.min_pixels ({self.min_pixels}) > policy.max_pixels ({self.max_pixels})")


@dataclasses.dataclass
class ToolParams:
    """The ``tool`` section: how SAM's image encoder runs, shared by every stage that runs the tool."""
    encode_batch: int = DEFAULT_ENCODE_BATCH  # images per encoder pass (ViT-H at 1024²: ~3 GB each)
    cache_bytes: int = DEFAULT_CACHE_BYTES  # CPU memory for cached embeddings (ViT-H: 4 MiB per image)
    cache_dir: str | None = None  # also keep embeddings on disk here (re-used across runs)

    def validate(self) -> None:
        if self.encode_batch < 1 or self.cache_bytes < 0:
            raise ConfigError(f"tool.encode_batch must be >= 1 and tool.cache_bytes >= 0, got "
                              f"{self.encode_batch} and {self.cache_bytes}")


def training_records(manifest: Path) -> list[Record]:
    """A manifest's records for RL or the bootstrap: empty-target records (kept by `prepare.keep_empty`)
    are left out, since the answer format has no "nothing here" call to reward; evaluation keeps them."""
    records, _ = read_manifest(manifest)
    kept = [r for r in records if not r.empty_target]
    if len(kept) < len(records):
        console.print(f"{manifest}: {len(records) - len(kept)} empty-target record(s) left out of training")
    return kept
