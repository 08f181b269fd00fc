"""The policy: any Hugging Face image-text-to-text model that answers with a tool call.

Loading goes through ``from_pretrained`` for the real checkpoints (Qwen2.5-VL first) and for the
embedded default's tiny model alike. This module also owns the prompt template, generation with an
explicit sampling configuration (never the checkpoint's own top-k/top-p/repetition defaults),
and per-token log-probs of completions. The answer format and its parser live in ``answer``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
import torch.utils.checkpoint
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig, LogitsProcessor, LogitsProcessorList

from grto_cli.core.answer import COORD_CONVENTIONS, DEFAULT_TEMPLATE, prompt_parts
from grto_cli.core.config import GENERATION_CACHES

# How each model family writes coordinates (see answer.COORD_CONVENTIONS): absolute pixels of the
# image the processor resized (Qwen2.5-VL), or 0..1000 relative to the image (Qwen2-VL, Qwen3-VL).
FAMILY_CONVENTIONS = {"qwen2_5_vl": "absolute", "qwen2_vl": "relative1000", "qwen3_vl": "relative1000",
                      "qwen3_vl_moe": "relative1000"}
# Multimodal placeholder tokens a completion must never hold: an image token sampled into a
# completion makes the log-prob pass look for image features that do not exist (and would be
# nonsense as an answer). They are suppressed in sampling and, identically, in training log-probs.
MULTIMODAL_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass
class Policy:
    model: torch.nn.Module
    processor: object
    coord_convention: str
    prompt_template: str
    suppressed_ids: tuple[int, ...] = ()  # never sampled (MULTIMODAL_TOKEN_KEYS of the model's config)
    generation_cache: str = "dynamic"  # a GENERATION_CACHES key: the KV cache ``generate`` decodes with

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_policy(path: str | Path, prompt_template: str = DEFAULT_TEMPLATE, device: str | torch.device = "cpu",
                dtype: str | torch.dtype = "float32", trust_remote_code: bool = False,
                coord_convention: str | None = None, min_pixels: int | None = None,
                max_pixels: int | None = None) -> Policy:
    """Load a VLM and its processor by local path or hub id (offline: the hub cache only).

    ``min_pixels`` / ``max_pixels`` bound the pixels of each image after the processor's resize, and
    so its visual tokens (one per merged patch: 28x28 pixels for Qwen2/2.5-VL, 32x32 for Qwen3-VL);
    None keeps the checkpoint's own values. They go into the processor's config, so a system saved
    from this policy resizes images the same way.
    """
    local = Path(path)
    is_adapter = (local / "adapter_config.json").is_file()
    if local.exists() and not is_adapter and not (local / "config.json").is_file():
        raise FileNotFoundError(f"policy directory {local} has no config.json (expected a `save_pretrained` "
                                f"directory: config.json, model weights, tokenizer and processor files, or a "
                                f"LoRA adapter directory with adapter_config.json)")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    bound_pixels(processor, min_pixels, max_pixels)
    processor.tokenizer.padding_side = "left"  # generation and batched log-probs both need left padding
    if is_adapter:
        model = _load_lora_merged(local, torch_dtype, trust_remote_code)
    else:
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch_dtype,
                                                            trust_remote_code=trust_remote_code)
    model.to(device)
    convention = family_convention(getattr(model.config, "model_type", ""), coord_convention)
    return Policy(model=model, processor=processor, coord_convention=convention, prompt_template=prompt_template,
                  suppressed_ids=multimodal_token_ids(model.config))


def family_convention(model_type: str, explicit: str | None = None) -> str:
    """How a model family writes coordinates: ``explicit`` when given, else the family's own; an
    unknown family is an error, never a guess (a wrong convention scales every box)."""
    if explicit is not None:
        return explicit
    if model_type not in FAMILY_CONVENTIONS:
        raise ValueError(f"unknown policy family {model_type!r}: grto knows how {', '.join(sorted(FAMILY_CONVENTIONS))} "
                         f"write coordinates; for another model set policy.coord_convention to one of "
                         f"{', '.join(COORD_CONVENTIONS)} (absolute: pixels of the processor-resized image; "
                         f"relative1000: 0..1000 of the image)")
    return FAMILY_CONVENTIONS[model_type]


def bound_pixels(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Set the image processor's bounds on a resized image's area (its ``size`` shortest / longest
    edge, which Qwen's processors read as min / max pixels; the ``min_pixels`` / ``max_pixels``
    attributes too where a processor still has them set, as transformers 4.x's read them first)."""
    if min_pixels is None and max_pixels is None:
        return
    image_processor = processor.image_processor
    size = {k: v for k, v in dict(image_processor.size or {}).items() if v is not None}
    for key, attr, value in (("shortest_edge", "min_pixels", min_pixels), ("longest_edge", "max_pixels", max_pixels)):
        if value is None:
            continue
        size[key] = value
        if getattr(image_processor, attr, None) is not None:
            setattr(image_processor, attr, value)
    image_processor.size = size


def pixel_limits(processor) -> dict[str, int | None]:
    """The processor's bounds on an image's resized area, in pixels (None where it has none)."""
    image_processor = getattr(processor, "image_processor", processor)
    size = getattr(image_processor, "size", None) or {}
    get = size.get if hasattr(size, "get") else lambda key: getattr(size, key, None)
    return {"min_pixels": getattr(image_processor, "min_pixels", None) or get("shortest_edge"),
            "max_pixels": getattr(image_processor, "max_pixels", None) or get("longest_edge")}


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The image encoder of a Qwen-family VLM (``visual``), wherever its model class nests it."""
    for owner in (model, getattr(model, "model", None)):
        tower = getattr(owner, "visual", None)
        if isinstance(tower, torch.nn.Module):
            return tower
    return None


def multimodal_token_ids(config) -> tuple[int, ...]:
    ids = {getattr(config, key, None) for key in MULTIMODAL_TOKEN_KEYS}
    return tuple(sorted(i for i in ids if isinstance(i, int)))


def _load_lora_merged(adapter_dir: Path, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    """A LoRA checkpoint (adapter only) loaded onto the base model it names, adapters merged in."""
    import json

    from peft import PeftModel

    base_path = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_path:
        raise FileNotFoundError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=dtype, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def prompt_text(policy: Policy, query: str) -> str:
    """The chat-formatted prompt: one user turn holding the image and the templated query, in the
    template's order (``answer.prompt_parts``), then the assistant's turn opened."""
    content = [{"type": "image"} if part is None else {"type": "text", "text": part}
               for part in prompt_parts(policy.prompt_template, query)]
    messages = [{"role": "user", "content": content}]
    return policy.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(policy: Policy, images: Sequence[Image.Image], queries: Sequence[str],
                   answers: Sequence[str] | None = None) -> dict:
    """Left-padded model inputs for (image, query) pairs; with ``answers``, prompt + answer + EOS."""
    texts = [prompt_text(policy, q) for q in queries]
    if answers is not None:
        eos = policy.tokenizer.eos_token
        texts = [t + a + eos for t, a in zip(texts, answers)]
    batch = policy.processor(text=texts, images=list(images), return_tensors="pt", padding=True)
    return {k: v.to(policy.device) for k, v in batch.items()}


def resized_sizes(policy: Policy, batch: dict) -> list[tuple[int, int]]:
    """(height, width) of each image as the vision encoder saw it."""
    patch = policy.processor.image_processor.patch_size
    return [(int(h) * patch, int(w) * patch) for _, h, w in batch["image_grid_thw"].tolist()]


def select_prompts(prompts: dict, indices: Sequence[int]) -> dict:
    """Prompts ``indices`` of a prompt batch, in that order; ``pixel_values`` holds each prompt's
    image patches back to back, so whole blocks are picked, not the tensor's rows."""
    out = {}
    for key, value in prompts.items():
        if key == "pixel_values":
            blocks = value.split(prompts["image_grid_thw"].prod(-1).tolist())
            out[key] = torch.cat([blocks[i] for i in indices])
        else:
            out[key] = value[list(indices)]
    return out


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers stay in place), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encode_images(model: torch.nn.Module, prompts: dict):
    """The vision tower's output (``pooler_output``: one tensor per image; Qwen3-VL also carries
    ``deepstack_features``) for every image of a prompt batch."""
    return base_model(model).model.get_image_features(prompts["pixel_values"], prompts["image_grid_thw"], return_dict=True)


def select_images(encoded, which: Sequence[int]):
    """An ``encode_images`` output for images ``which`` (repeats allowed), in that order."""
    fields = dict(encoded)
    fields["pooler_output"] = [encoded.pooler_output[i] for i in which]
    if getattr(encoded, "deepstack_features", None) is not None:  # Qwen3-VL: per layer, per image
        fields["deepstack_features"] = [[layer[i] for i in which] for layer in encoded.deepstack_features]
    return type(encoded)(**fields)


def expand_prompts(model: torch.nn.Module, prompts: dict, rows: torch.Tensor) -> dict:
    """Model inputs for ``len(rows)`` sequences, sequence i asking prompt ``rows[i]``: the text side
    indexed, and the vision tower run once per distinct prompt image, its output shared by every
    sequence that asks it (``mm_encoder_outputs``), instead of G copies of the pixels encoded G times."""
    rows = rows.to(prompts["input_ids"].device)
    needed = sorted(set(rows.tolist()))
    position = {p: i for i, p in enumerate(needed)}
    encoded = encode_images(model, select_prompts(prompts, needed))
    out = {key: value[rows] for key, value in prompts.items() if key != "pixel_values"}
    out["mm_encoder_outputs"] = {"image": select_images(encoded, [position[p] for p in rows.tolist()])}
    return out


def sampling_config(policy: Policy, max_new_tokens: int) -> GenerationConfig:
    """The generation config of every ``generate`` call: greedy decoding built from scratch, so no
    checkpoint default (top_k, a repetition penalty) changes the distribution that training
    log-probs assume. Sampling is greedy decoding of noised scores (``sampling.GumbelSampler``).
    The KV cache is the policy's ``generation_cache`` (``GENERATION_CACHES``)."""
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=policy.eos_token_id,
                            pad_token_id=policy.pad_token_id, repetition_penalty=1.0,
                            suppress_tokens=list(policy.suppressed_ids) or None,
                            cache_implementation=GENERATION_CACHES[policy.generation_cache])


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for completion tokens up to and including the first EOS, 0 after it.

    Built from the EOS position, never from ``token != pad``: when pad == eos that would also drop
    the EOS itself, or keep padding when pad is a normal token.
    """
    is_eos = completion_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)[None]
    return (positions <= first_eos[:, None]).long()


Generating = Callable[[], ContextManager[dict]]  # engines.base.Engine.generating


@contextlib.contextmanager
def adapters_in_compute_dtype(model: torch.nn.Module):
    """LoRA adapters in their base layers' dtype for the duration (generation), their float32
    master weights put back after, untouched.

    peft keeps adapters in float32 over a bf16 model (``autocast_adapter_dtype``), so every adapted
    projection of every decoding step casts its bf16 input up and its output back (thousands of
    copies per token at 7B). Rollouts are no-grad, so they can run the adapters in bf16, as TRL and
    veRL run a bf16 copy of the weights in their generation engines; the training passes keep the
    float32 adapters. Sharded adapters (FSDP2 DTensors, ZeRO-3 partitions) are left as they are:
    their gathered copies belong to the engine. A no-op when base and adapters share a dtype."""
    swapped = []
    for module in model.modules() if isinstance(model, torch.nn.Module) else ():
        names, get_base = getattr(module, "adapter_layer_names", None), getattr(module, "get_base_layer", None)
        weight = getattr(get_base(), "weight", None) if names and callable(get_base) else None
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            continue
        for name in names:
            container = getattr(module, name, None)
            for param in container.parameters() if isinstance(container, torch.nn.Module) else ():
                if param.dtype != weight.dtype and param.is_floating_point():
                    swapped.append((param, weight.dtype))
    if any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p, _ in swapped):
        swapped = []
    masters = [param.data for param, _ in swapped]
    try:
        for param, dtype in swapped:
            param.data = param.data.to(dtype)
        yield len(swapped)
    finally:
        for (param, _), master in zip(swapped, masters):
            param.data = master


@torch.no_grad()
def generate(policy: Policy, batch: dict, config: GenerationConfig, sampler: LogitsProcessor | None = None,
             generating: Generating | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Completions for an already-expanded prompt batch: (completion_ids, completion_mask); greedy,
    or sampled when ``sampler`` (a ``sampling.GumbelSampler``) noises the scores. ``generating``:
    the training engine's context around ``generate`` (a sharded policy's weights gathered, and
    ``synced_gpus`` so that every process steps until every process's rows have ended). LoRA
    adapters run in the model's compute dtype (``adapters_in_compute_dtype``)."""
    extra = {"logits_processor": LogitsProcessorList([sampler])} if sampler is not None else {}
    with (generating or contextlib.nullcontext)() as engine_kwargs, adapters_in_compute_dtype(policy.model):
        out = policy.model.generate(**batch, generation_config=config, **extra, **(engine_kwargs or {}))
    completion = out[:, batch["input_ids"].shape[1]:]
    mask = completion_mask(completion, policy.eos_token_id)
    # Tokens after the first EOS are padding by construction; make them the pad id everywhere.
    completion = torch.where(mask.bool(), completion, torch.full_like(completion, policy.pad_token_id))
    return completion, mask


LOGPROB_CHUNK = 64  # completion tokens whose full-vocabulary logits exist at once (per row)


def completion_logprobs(model: torch.nn.Module, batch: dict, completion_ids: torch.Tensor,
                        mask: torch.Tensor, temperature: float = 1.0, suppressed_ids: Sequence[int] = (),
                        chunk: int = LOGPROB_CHUNK, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log-probs (B, L) of ``completion_ids`` given the prompts, under the sampling
    distribution: logits / temperature, with the tokens sampling suppresses at -inf. Completion i
    answers prompt ``rows[i]`` of ``batch`` (default: prompt i); each distinct prompt image goes
    through the vision tower once (``expand_prompts``), however many completions answer it.

    The prompt's side inputs are rebuilt for prompt + completion: the attention mask is extended
    by the completion mask, ``mm_token_type_ids`` by zeros (text), and M-RoPE position ids are left
    to the model, which derives them from the full input ids and attention mask.

    Memory: the language model returns hidden states, never logits; the LM head runs on the
    completion positions only, ``chunk`` tokens at a time, each chunk under activation
    checkpointing, so no (B, L, V) tensor (V ~152k for Qwen) exists in the forward or the backward.
    """
    prompt_len, length = batch["input_ids"].shape[1], completion_ids.shape[1]
    if rows is None:
        rows = torch.arange(completion_ids.shape[0])
    base = base_model(model)
    inputs = expand_prompts(base, batch, rows)  # the vision tower runs once per distinct prompt image
    prompt = dict(inputs)  # the prompt side, before the completion is appended
    inputs["input_ids"] = torch.cat([prompt["input_ids"], completion_ids], dim=1)
    inputs["attention_mask"] = torch.cat([prompt["attention_mask"], mask.to(prompt["attention_mask"].dtype)], dim=1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in prompt:
            inputs[key] = torch.cat([prompt[key], torch.zeros_like(completion_ids, dtype=prompt[key].dtype)], dim=1)
    hidden = base.model(**inputs, use_cache=False).last_hidden_state  # (B, P + L, H), after the final norm
    hidden = hidden[:, prompt_len - 1:prompt_len - 1 + length]  # (B, L, H): the states that predict the completion
    head = base.get_output_embeddings()
    suppressed = torch.tensor(list(suppressed_ids), device=hidden.device, dtype=torch.long)

    def chunk_logprobs(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()  # (B, c, V)
        if len(suppressed):
            logits = logits.index_fill(-1, suppressed, float("-inf"))
        return torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids[..., None]).squeeze(-1)  # (B, c)

    parts = []
    for s in range(0, length, chunk):
        h, ids = hidden[:, s:s + chunk], completion_ids[:, s:s + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, h, ids, use_reentrant=False))
        else:
            parts.append(chunk_logprobs(h, ids))
    return torch.cat(parts, dim=1) * mask  # (B, L)


def decode_completions(policy: Policy, completion_ids: torch.Tensor) -> list[str]:
    return policy.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
