"""Where rollout generation spends its time: milliseconds per decoding step for the real policy
(random init) under the variants grto's rollouts combine, before and after each speed change, then
a torch profile of the full one.

    python benchmarks/generation_profile.py [--size 7b|3b] [--tokens 64] [--warmup-tokens N] [--queries 4]
        [--group-size 8] [--variants greedy,gumbel,...]
    python benchmarks/generation_profile.py --smoke        # CPU, scaled down: checks the script

Variants (each one ``policy.generate`` of B x G rows from ``expand_prompts``, min = max new tokens):

- greedy: no sampler (the floor: the model and transformers' decoding loop)
- gumbel_generator: the sampler as it was until commit 5388d42 (a seeded ``torch.Generator`` per
  row per token, ``benchmarks/sampler_cost.py: generator_noise``)
- gumbel: + ``sampling.GumbelSampler`` (counter-based noise for all rows at once: what training and
  the bootstrap sample with)
- lora_fp32: + LoRA adapters (r 64 on every projection, as the real templates), float32 adapters
  in generation (peft's default, and grto's until ``policy.adapters_in_compute_dtype``), gumbel
- lora: the same adapters run in the model's bf16 while generating (what ``policy.generate`` does)
- lora_ckpt: + activation checkpointing enabled, as the trainer leaves the model while it samples
- lora_static: + ``policy.generation_cache: static`` (a preallocated KV cache; on CUDA transformers
  compiles the decoding step, so its first, warm-up call pays the compilation)

Milliseconds per decoding step are (time of a ``--tokens`` run - time of a 4-token run) / (tokens
- 4), prefill excluded, each variant after a warm-up run of ``--warmup-tokens`` (default: --tokens;
a cold caching allocator growing the KV cache made a 512-token run 3x slower per token than a
warmed one). Prints one line per variant and the profile's top operators by self CPU time; a final
JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_size_step as bench  # noqa: E402

VARIANTS = ("greedy", "gumbel_generator", "gumbel", "lora_fp32", "lora", "lora_ckpt", "lora_static")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["3b", "7b"], default="7b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=560)
    ap.add_argument("--profile-tokens", type=int, default=8, help="tokens generated under the profiler (0: no profile)")
    ap.add_argument("--warmup-tokens", type=int, default=None, help="the warm-up run's length (default: --tokens)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, in this order: " + ",".join(VARIANTS))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; expected some of {VARIANTS}")
    if args.smoke:  # checks the script: 4 rows (the variants' costs are not the point)
        args.image_size, args.tokens, args.queries, args.group_size = 112, 8, 2, 2
    elif not torch.cuda.is_available():
        ap.error("no CUDA device (use --smoke on a CPU)")
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers.utils import logging as hf_logging

    import grto_cli.core.policy as policy_module
    from grto_cli.core.policy import encode_prompts, expand_prompts, generate, sampling_config
    from grto_cli.core.sampling import GumbelSampler, rollout_key, row_keys
    from sampler_cost import generator_noise

    class GeneratorSampler(GumbelSampler):
        """The sampler before the counter-based noise: the same logits processor, the noise drawn
        row by row from seeded generators."""

        def noise(self, position, vocab, device):
            return generator_noise(self.keys, position, vocab, torch.device(device))

    hf_logging.set_verbosity_error()
    cuda = not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    policy = bench.build_policy(argparse.Namespace(size=args.size, smoke=args.smoke, image_size=args.image_size, seed=0),
                                device, torch.bfloat16 if cuda else torch.float32)
    policy.model.eval()
    B, G = args.queries, args.group_size
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (args.image_size, args.image_size, 3),
                                                                 dtype=np.uint8)) for i in range(B)]
    prompts = encode_prompts(policy, images, [bench.QUERY] * B)
    keys = row_keys([rollout_key(0, 0, g) for g in range(B)], G)
    cast_adapters = policy_module.adapters_in_compute_dtype

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run(tokens: int, sampler_cls) -> float:
        with torch.no_grad():
            inputs = expand_prompts(policy.model, prompts, torch.arange(B).repeat_interleave(G))
        cfg = sampling_config(policy, tokens)
        cfg.min_new_tokens = tokens
        sampler = sampler_cls(keys, 1.0, prompts["input_ids"].shape[1]) if sampler_cls else None
        sync()
        start = time.perf_counter()
        generate(policy, inputs, cfg, sampler)
        sync()
        return time.perf_counter() - start

    def per_token(sampler_cls) -> float:
        run(args.warmup_tokens or args.tokens, sampler_cls)  # warm-up (first launches, allocator, compilation)
        short, long = run(4, sampler_cls), run(args.tokens, sampler_cls)
        return (long - short) / (args.tokens - 4) * 1000  # ms per decoding step, prefill excluded

    def with_lora() -> None:
        if not hasattr(policy.model, "peft_config"):
            targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
            policy.model = get_peft_model(policy.model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05,
                                                                   target_modules=targets))
            policy.model.eval()

    results, checkpointing = {}, False
    for variant in VARIANTS:
        if variant not in variants:
            continue
        policy_module.adapters_in_compute_dtype = cast_adapters
        policy.generation_cache = "dynamic"
        if variant.startswith("lora"):
            with_lora()
        if variant == "lora_fp32":  # generation as it was: the float32 adapters as peft keeps them
            policy_module.adapters_in_compute_dtype = lambda model: contextlib.nullcontext(0)
        if variant in ("lora_ckpt", "lora_static") and not checkpointing:
            checkpointing = True
            policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy.model.enable_input_require_grads()
            policy.model.eval()
        if variant == "lora_static":
            policy.generation_cache = "static"
        sampler_cls = None if variant == "greedy" else GeneratorSampler if variant == "gumbel_generator" else GumbelSampler
        results[variant] = per_token(sampler_cls)
        print(f"{variant:17s} {results[variant]:8.2f} ms/token", flush=True)
    policy_module.adapters_in_compute_dtype = cast_adapters
    policy.generation_cache = "dynamic"

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if args.profile_tokens:
        with profile(activities=activities) as prof:
            run(args.profile_tokens, GumbelSampler)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        if cuda:
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
    print(json.dumps({"benchmark": "generation_profile", "size": "tiny" if args.smoke else args.size,
                      "device": torch.cuda.get_device_name(0) if cuda else "cpu", "rows": B * G,
                      "prompt_tokens": int(prompts["input_ids"].shape[1]), "tokens": args.tokens,
                      "ms_per_token": results}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
