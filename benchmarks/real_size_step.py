"""One RL step of the real system at real dimensions, on one GPU, split into its parts: how long
each part takes and how much GPU memory it peaks at. Prints one line per part and a final JSON line.

    python benchmarks/real_size_step.py [--size 3b|7b] [--mode lora|full] [--method grpo|grto|b-grto]
        [--queries B] [--group-size G] [--micro-batch M] [--completion-tokens L] [--image-size S]
        [--beta 0.0] [--gradient-checkpointing | --no-gradient-checkpointing] [--warmup N] [--warmup-tokens L]
    python benchmarks/real_size_step.py --smoke [--mode lora|full] [--beta 0.04]   # CPU, scaled down

The policy is a ``Qwen2_5_VLForConditionalGeneration`` built from the 3B / 7B architecture (random
init: speed and memory do not depend on training), the tool SAM ViT-H (``build_sam("vit_h")``,
random init) in a ``SamTool``. The step is ``Trainer.step`` itself, timed through the trainer's
``timer`` hook: the policy prepared as ``grto train`` prepares it (LoRA, or a full fine-tune, which
refuses AdamW on bf16 weights, so ``--mode full`` builds the policy in float32), advantages,
``Trainer.policy_update`` and ``Trainer.tool_update``. Only the rollouts are the benchmark's own
(``bench_rollouts``): the same ``encode_prompts`` / ``expand_prompts`` / ``generate`` /
``SamTool.embed`` / ``score_groups`` that ``rollout.rollout_group`` runs, with two differences:
(1) a random-init policy never writes a parsable answer, so the tool calls (one box and two points
per rollout, as the real templates ask for) are made up around the target instead of parsed from
the completions, and the completions are not decoded to text; (2) the official Qwen tokenizer is not on disk (nothing downloads), so the prompt (the RefCOCOg
setting's template, Qwen's chat layout) is tokenised by a byte-level BPE trained here on the prompt
itself (about one token per word, as Qwen's), inside a real ``Qwen2_5_VLProcessor`` with
Qwen2.5-VL's image processor (patch 14, merge 2): the visual tokens (400 at 560x560) are exact, the
~150 text tokens close to Qwen's count but not identical, and the token ids are not Qwen's.
Completions are forced to ``--completion-tokens`` by ``min_new_tokens = max_new_tokens``.

Timed parts (CUDA synchronised around each one; seconds are wall clock of one step):

- generation: ``encode_prompts`` (processor: resize + patchify + tokenise) + ``expand_prompts``
  + ``generate`` of B x G completions (eval mode, KV cache), as ``rollout.sample_completions``
- sam_encode: ``SamTool.embed`` of the B images (ViT-H under bf16 autocast), once per image
- sam_decode: ``rollout.score_groups`` (per image, ``SamTool.decode`` of its G calls, no grad, +
  ``compute_rewards``), as ``rollout.rollout_group``
- reference: ``Trainer.reference_logprobs`` (no-grad forward per micro-batch; LoRA: adapters
  disabled; full: a frozen copy); 0 and listed in ``skipped`` when beta == 0 (no pass at all)
- policy_forward: per micro-batch, ``Trainer.logprobs`` with grad + ``policy_loss``
- policy_backward: per micro-batch, the engine's backward (recomputes checkpointed activations)
- policy_optimizer: the engine's step: ``clip_grad_norm_`` + AdamW step + ``zero_grad``
- tool_step: ``Trainer.tool_update``: ``grto.tool_loss`` (decoder with grad on the valid calls,
  dice + BCE) + backward + clip + AdamW step; 0 and listed in ``skipped`` for grpo

Peak GPU memory is ``torch.cuda.max_memory_allocated`` with the counter reset before each part
(a part run once per micro-batch reports its largest micro-batch); the step's peak is the largest
of them, since the parts cover the whole step. Weights, adapters and optimizer states are included.
The first step also pays one-off costs (CUDA kernels' first launches, AdamW allocating its states):
``--warmup 1`` runs an untimed step first (``--warmup-tokens 16`` makes it a short one: the one-off
costs do not depend on the completion length). Exit codes: 0 done, 2 bad arguments or no CUDA,
3 out of GPU memory (the JSON line then has ``"fits": false`` and the part that ran out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the environment below is set first
    from grto_cli.core.rollout import RolloutBatch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads: every model is built from a config
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

PARTS = ("generation", "sam_encode", "sam_decode", "reference", "policy_forward", "policy_backward",
         "policy_optimizer", "tool_step")

# Qwen2.5-VL-3B-Instruct and -7B-Instruct architectures, typed by hand from the published config.json
# of Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct on the Hugging Face hub (nothing
# is downloaded). Published "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]} with
# "rope_theta": 1e6 is written in transformers 5's form, rope_parameters; the token ids are set from
# the tokenizer used here instead (see the module docstring).
QWEN25_VL_TEXT = {
    "3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128000,
               rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, max_window_layers=70,
               attention_dropout=0.0),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000,
               rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, max_window_layers=28,
               attention_dropout=0.0),
}
QWEN25_VL_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
QWEN25_VL_TIE_EMBEDDINGS = {"3b": True, "7b": False}
QWEN25_VL_VISION = {  # identical in both but for out_hidden_size (= the language model's hidden size)
    size: dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu", in_channels=3,
               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
               fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, out_hidden_size=out)
    for size, out in (("3b", 2048), ("7b", 3584))
}

# The scaled-down system of --smoke: the same classes and code path, on the CPU in seconds.
SMOKE_TEXT = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6)
SMOKE_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim 16
SMOKE_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, hidden_act="silu", in_channels=3,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[1], tokens_per_second=2, out_hidden_size=64)

QUERY = "the second mug from the left, next to the open laptop on the desk"
GIB = 1024 ** 3


# -- arguments ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(QWEN25_VL_TEXT), default="7b", help="policy architecture (default 7b)")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora",
                    help="lora: r=64 adapters on the language model, bf16 base (the real templates); "
                         "full: every language-model weight trains, float32 (grto refuses AdamW on bf16)")
    ap.add_argument("--method", choices=["grpo", "grto", "b-grto"], default="grto",
                    help="grpo: no tool step; grto / b-grto: tool step (default grto)")
    ap.add_argument("--queries", "-B", type=int, default=None, help="B queries per step (default 4; smoke 1)")
    ap.add_argument("--group-size", "-G", type=int, default=None, help="G rollouts per query (default 8; smoke 2)")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward (default 8)")
    ap.add_argument("--completion-tokens", type=int, default=None,
                    help="length every completion is forced to (default 512; smoke 16)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="square image side in pixels; Qwen2.5-VL: (side/28)^2 visual tokens (default 560 = 400 "
                         "tokens; smoke 112)")
    ap.add_argument("--beta", type=float, default=0.0, help="KL weight; > 0 adds the reference pass (default 0.0)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="activation checkpointing in the policy (default on, as in the real templates)")
    ap.add_argument("--logprob-chunk", type=int, default=64, help="train.logprob_chunk (default 64)")
    ap.add_argument("--lora-r", type=int, default=64, help="LoRA rank (alpha = 2 r; default 64)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps before the timed one (default 0)")
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="completion length of the warm-up steps (default: --completion-tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, scaled down (hidden 64, 2 layers, vision depth 2, tiny SAM, 112x112 image, 16 "
                         "tokens, G=2, B=1): checks that the benchmark runs, measures nothing real")
    args = ap.parse_args(argv)
    smoke = args.smoke
    for name, real, small in (("queries", 4, 1), ("group_size", 8, 2), ("completion_tokens", 512, 16),
                              ("image_size", 560, 112)):
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else real)
    for name in ("queries", "group_size", "micro_batch", "completion_tokens", "logprob_chunk", "lora_r"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.image_size < 28:
        ap.error("--image-size must be at least 28 (one visual token)")
    if args.warmup_tokens is None:
        args.warmup_tokens = args.completion_tokens
    if args.warmup_tokens < 1:
        ap.error("--warmup-tokens must be at least 1")
    if args.warmup < 0 or args.beta < 0:
        ap.error("--warmup and --beta must not be negative")
    if not smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: the real-size step needs one GPU (a 3B/7B Qwen2.5-VL + SAM ViT-H). "
                 "Run with --smoke for the scaled-down CPU check of the same code path.")
    return args


# -- building the system -----------------------------------------------------------------------

@contextmanager
def default_device_dtype(device: torch.device, dtype: torch.dtype):
    """Modules built inside get their parameters on ``device`` in ``dtype`` straight away: a 7B model
    is initialised on the GPU, never materialised on the CPU first."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


def prompt_template() -> str:
    """The RefCOCOg setting's prompt (the real 7B run's), read from grto's packaged template."""
    import importlib.resources

    import yaml

    from grto_cli.core.answer import DEFAULT_TEMPLATE

    try:
        params = (importlib.resources.files("grto_cli") / "templates" / "refcocog" / "params.yaml").read_text()
        return yaml.safe_load(params)["policy"]["prompt_template"]
    except (OSError, KeyError, TypeError):
        return DEFAULT_TEMPLATE


def build_processor(image_size: int, template: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """A real ``Qwen2_5_VLProcessor``: Qwen2.5-VL's image processor (patch 14, merge 2, temporal 2)
    with every image resized to image_size^2 pixels (or to within [min_pixels, max_pixels]), and a byte-level BPE tokenizer trained here on
    the prompt itself, so that, like Qwen's 151k-token vocabulary, it spends about one token per
    word (Qwen's own tokenizer is not on disk). The chat layout is Qwen's, default system turn included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )

    from grto_cli.core.tiny import SPECIAL_TOKENS

    chat = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
            "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% endif %}")
    corpus = ["system user assistant You are a helpful assistant.", template.format(query=QUERY)] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left")  # left, as load_policy sets it
    tokenizer.chat_template = chat
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                            min_pixels=min_pixels or pixels, max_pixels=max_pixels or pixels)
    try:
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    except ImportError:
        video_processor = None
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                               chat_template=chat)


def build_policy(args, device: torch.device, dtype: torch.dtype, pixel_bounds: tuple[int, int] | None = None):
    """The policy at ``args.size`` (or the smoke dims), random init, built on ``device`` in ``dtype``;
    its processor resizes to ``args.image_size``^2 pixels unless ``pixel_bounds`` (min, max) are given."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from grto_cli.core.policy import Policy, family_convention, multimodal_token_ids
    from grto_cli.core.tiny import SPECIAL_TOKENS

    template = prompt_template()
    processor = build_processor(args.image_size, template, *(pixel_bounds or ()))
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if args.smoke:
        text, rope, vision, tie = dict(SMOKE_TEXT), SMOKE_ROPE, SMOKE_VISION, False
    else:
        text, rope = dict(QWEN25_VL_TEXT[args.size]), QWEN25_VL_ROPE
        vision, tie = QWEN25_VL_VISION[args.size], QWEN25_VL_TIE_EMBEDDINGS[args.size]
    text.update(rope_parameters=dict(rope), bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(vision), tie_word_embeddings=tie,
                              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(args.seed)
    with default_device_dtype(device, dtype):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.to(device)  # anything a device context missed (a no-op for what it placed)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return Policy(model=model, processor=processor, coord_convention=family_convention("qwen2_5_vl"),
                  prompt_template=template, suppressed_ids=multimodal_token_ids(model.config))


def build_tool(args, device: torch.device):
    from grto_cli.core.tiny import tiny_sam_arch
    from grto_cli.core.tool import SAM_PRESETS, SamTool, build_sam

    arch = tiny_sam_arch() if args.smoke else SAM_PRESETS["vit_h"]
    with default_device_dtype(device, torch.float32):  # the train stage loads SAM in float32 too
        sam = build_sam(arch if args.smoke else "vit_h")
    # .to: segment-anything makes pixel_mean / pixel_std with the legacy torch.Tensor(list), which
    # the device context leaves on the CPU, and SamTool.device is where pixel_mean is.
    return SamTool(sam.to(device).eval(), arch)


def build_trainer(args, policy, tool):
    from grto_cli.core.rollout import SamplingParams
    from grto_cli.core.trainer import LoraParams, MemoryParams, RLConfig, Trainer

    lora = None
    if args.mode == "lora":  # the real templates' adapters: every projection of the language model
        lora = LoraParams(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    cfg = RLConfig(method=args.method, queries_per_step=args.queries,
                   sampling=SamplingParams(group_size=args.group_size, temperature=1.0, top_p=1.0,
                                           max_new_tokens=args.completion_tokens),
                   micro_batch=args.micro_batch, policy_lr=1e-5 if lora else 1e-6, tool_lr=1e-5, beta=args.beta,
                   lora=lora, seed=args.seed)
    memory = MemoryParams(gradient_checkpointing=args.gradient_checkpointing, logprob_chunk=args.logprob_chunk)
    trainer = Trainer(cfg, policy, tool, [], [], Path("."), require_think=False, memory=memory,
                      timer=lambda part: trainer.timer_parts.measure(part))
    return trainer


# -- inputs ------------------------------------------------------------------------------------

def make_inputs(args, step: int):
    """B (image, record, target) triples and, per rollout, a tool call near the target: one box and
    two points, as the real templates ask for, jittered so the G calls of a group differ."""
    from grto_cli.core.answer import ParsedAnswer, ToolCall
    from grto_cli.core.data.masks import encode_rle, mask_bbox
    from grto_cli.core.data.records import Record

    rng = np.random.default_rng([args.seed, step])
    s = args.image_size
    images, targets, records, parsed = [], [], [], []
    for i in range(args.queries):
        images.append(rng.integers(0, 256, (s, s, 3), dtype=np.uint8))
        x1, y1 = rng.integers(0, s // 2, 2)
        w, h = rng.integers(s // 8, s // 2, 2)
        mask = np.zeros((s, s), dtype=bool)
        mask[y1:y1 + h, x1:x1 + w] = True
        bbox = mask_bbox(mask)
        targets.append(mask)
        records.append(Record(id=f"bench-{step}-{i}", image=f"bench/{step}/{i}.png", width=s, height=s, query=QUERY,
                              mask=encode_rle(mask), bbox=bbox, dataset="benchmark", split="train"))
        for _ in range(args.group_size):
            jx, jy = rng.normal(0, s * 0.03, 2)
            box = (bbox[0] + jx, bbox[1] + jy, bbox[2] + jx, bbox[3] + jy)
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            points = ((cx - w / 6, cy), (cx + w / 6, cy))
            parsed.append(ParsedAnswer(call=ToolCall(box=tuple(float(v) for v in box),
                                                     points=tuple((float(x), float(y)) for x, y in points)),
                                       status="ok"))
    return images, targets, records, parsed


# -- timing ------------------------------------------------------------------------------------

class Parts:
    """Seconds (summed) and peak GPU memory (max) per part, CUDA synchronised around each span."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds = {p: 0.0 for p in PARTS}
        self.peak = {p: None for p in PARTS}
        self.current: str | None = None

    @contextmanager
    def measure(self, part: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.current = part
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[part] += time.perf_counter() - start
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            self.peak[part] = max(self.peak[part] or 0, peak)
        self.current = None


def bench_rollouts(args, trainer, step: int, parts: Parts, tokens: int) -> "RolloutBatch":
    """``Trainer.rollouts`` for the benchmark: the same prompts, generation and scoring functions,
    with completions forced to ``tokens`` tokens and the made-up calls of ``make_inputs`` (a random
    policy never parses), timed part by part."""
    from PIL import Image

    from grto_cli.core.policy import encode_prompts, expand_prompts, generate, sampling_config
    from grto_cli.core.rollout import RolloutBatch, score_groups
    from grto_cli.core.sampling import GumbelSampler, rollout_key, row_keys

    policy, tool, cfg = trainer.policy, trainer.tool, trainer.cfg
    G = cfg.sampling.group_size
    images, targets, records, parsed = make_inputs(args, step)
    with parts.measure("generation"):  # rollout.sample_completions, less decode + parse
        prompts = encode_prompts(policy, [Image.fromarray(im) for im in images], [r.query for r in records])
        gen_cfg = sampling_config(policy, tokens)
        gen_cfg.min_new_tokens = tokens  # every completion has the full length
        keys = row_keys([rollout_key(cfg.seed, step, g) for g in range(len(records))], G)
        sampler = GumbelSampler(keys, cfg.sampling.temperature, prompts["input_ids"].shape[1])
        was_training = policy.model.training
        policy.model.eval()
        with torch.no_grad():  # the vision tower once per image, shared by its G rows
            inputs = expand_prompts(policy.model, prompts, torch.arange(len(records)).repeat_interleave(G))
        completion_ids, mask = generate(policy, inputs, gen_cfg, sampler, trainer.engine.generating)
        policy.model.train(was_training)
    with parts.measure("sam_encode"):  # new keys every step: the encoder runs, as on a first visit
        embeddings = tool.embed(images, [f"{r.image}" for r in records])
    with parts.measure("sam_decode"):  # rollout.score_groups, as rollout.rollout_group calls it
        target_tensors = [torch.as_tensor(t, device=tool.device) for t in targets]
        rewards = score_groups(tool, embeddings, records, images, target_tensors, parsed, G, cfg.rewards)
    return RolloutBatch(records=records, group_size=G, prompts=prompts, completion_ids=completion_ids,
                        completion_mask=mask, texts=[""] * len(parsed), parsed=parsed, rewards=rewards,
                        embeddings=embeddings, targets=target_tensors)


def rl_step(args, trainer, step: int, parts: Parts, tokens: int | None = None) -> dict:
    """One ``Trainer.step`` (advantages, policy update, tool update: the trainer's own code, timed
    through its ``timer`` hook), on the benchmark's rollouts of ``tokens`` tokens (default: the
    trainer's max_new_tokens)."""
    tokens = tokens or trainer.cfg.sampling.max_new_tokens
    trainer.timer_parts = parts  # where the trainer's timer hook records (build_trainer)
    captured = {}

    def rollouts(s: int):
        captured["batch"] = bench_rollouts(args, trainer, s, parts, tokens)
        return captured["batch"]

    trainer.rollouts = rollouts
    trainer.state.step = step
    metrics = trainer.step()
    batch = captured["batch"]
    stats = {k: v for k, v in metrics.items() if k.split("/")[0] in ("loss", "policy", "tool")}
    return {"prompt_tokens": int(batch.prompts["input_ids"].shape[1]),
            "visual_tokens_per_image": int(batch.prompts["image_grid_thw"][0].prod()) // 4,
            "completion_tokens": int(batch.completion_ids.shape[1]), "stats": stats}


# -- main --------------------------------------------------------------------------------------

def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


def _count(module: torch.nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cuda = not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    # grto's own choice: bf16 on CUDA, float32 on the CPU; full fine-tuning needs float32 weights.
    dtype = torch.bfloat16 if cuda and args.mode == "lora" else torch.float32
    label = "smoke (CPU, scaled down)" if args.smoke else f"Qwen2.5-VL-{args.size.upper()} + SAM ViT-H"
    gpu = torch.cuda.get_device_name(0) if cuda else None
    result: dict = {"benchmark": "real_size_step", "system": label, "smoke": args.smoke,
                    "size": "tiny" if args.smoke else args.size,
                    "mode": args.mode, "method": args.method, "device": gpu or "cpu",
                    "policy_dtype": str(dtype).removeprefix("torch."), "queries": args.queries,
                    "group_size": args.group_size, "rollouts": args.queries * args.group_size,
                    "micro_batch": args.micro_batch, "gradient_checkpointing": args.gradient_checkpointing,
                    "beta": args.beta, "image_size": args.image_size, "warmup_steps": args.warmup,
                    "warmup_tokens": args.warmup_tokens}
    print(f"{label}: mode={args.mode} method={args.method} B={args.queries} G={args.group_size} "
          f"micro_batch={args.micro_batch} checkpointing={args.gradient_checkpointing} beta={args.beta} "
          f"dtype={result['policy_dtype']} device={result['device']}", flush=True)
    parts = active = Parts(cuda)  # active: the step being run (a warm-up step has its own)
    phase = "setup"
    try:
        started = time.perf_counter()
        policy = build_policy(args, device, dtype)
        tool = build_tool(args, device)
        trainer = build_trainer(args, policy, tool)
        policy_total, policy_trainable = _count(policy.model)
        sam_total, sam_trainable = _count(tool.sam)
        result.update(setup_s=round(time.perf_counter() - started, 2),
                      attn_implementation=getattr(policy.model.config, "_attn_implementation", None),
                      params={"policy": policy_total, "policy_trainable": policy_trainable, "sam": sam_total,
                              "sam_trainable": sam_trainable})
        if cuda:
            result["weights_gpu_mem_gib"] = _gib(torch.cuda.memory_allocated())
        for w in range(args.warmup):
            phase = f"warmup step {w + 1}"
            active = Parts(cuda)
            rl_step(args, trainer, w, active, args.warmup_tokens)
        phase, active = "timed step", parts
        info = rl_step(args, trainer, args.warmup, parts)
    except torch.cuda.OutOfMemoryError as exc:
        where = active.current or phase
        peak = _gib(torch.cuda.max_memory_allocated()) if cuda else None
        print(f"OUT OF GPU MEMORY in {where} ({phase}): this configuration does not fit on {gpu} "
              f"(peak {peak} GiB before the failed allocation). {str(exc).splitlines()[0]}", file=sys.stderr)
        result.update(fits=False, oom_in=where, oom_phase=phase, peak_gpu_mem_gib_step=peak)
        print(json.dumps(result), flush=True)
        return 3

    skipped = [p for p in PARTS
               if (p == "reference" and args.beta == 0) or (p == "tool_step" and not trainer.train_tool)]
    total = sum(parts.seconds.values())
    peaks = [v for v in parts.peak.values() if v is not None]
    print(f"\n{'part':<18}{'seconds':>10}{'share':>8}{'peak GiB':>10}")
    for p in PARTS:
        peak = _gib(parts.peak[p])
        note = "  (skipped)" if p in skipped else ""
        print(f"{p:<18}{parts.seconds[p]:>10.3f}{parts.seconds[p] / total:>8.1%}"
              f"{(f'{peak:.2f}' if peak is not None else '-'):>10}{note}")
    rps = result["rollouts"] / total
    step_peak = _gib(max(peaks)) if peaks else None
    print(f"{'total':<18}{total:>10.3f}{1:>8.0%}{(f'{step_peak:.2f}' if step_peak is not None else '-'):>10}")
    print(f"rollouts/s: {rps:.3f}   prompt tokens: {info['prompt_tokens']} "
          f"({info['visual_tokens_per_image']} visual)   completion tokens: {info['completion_tokens']}\n", flush=True)
    result.update(fits=True, prompt_tokens=info["prompt_tokens"],
                  visual_tokens_per_image=info["visual_tokens_per_image"], completion_tokens=info["completion_tokens"],
                  parts={p: round(v, 4) for p, v in parts.seconds.items()}, skipped=skipped,
                  peak_gpu_mem_gib={p: _gib(v) for p, v in parts.peak.items()} if cuda else None,
                  total_s=round(total, 4), rollouts_per_second=round(rps, 4), peak_gpu_mem_gib_step=step_peak,
                  losses={k: round(v, 6) for k, v in info["stats"].items()})
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
