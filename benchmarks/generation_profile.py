"""Where rollout generation spends its time: milliseconds per generated token for the real policy
(random init) under the variants grto's rollouts combine, then a torch profile of the full one.

    python benchmarks/generation_profile.py [--size 7b|3b] [--tokens 64] [--queries 4] [--group-size 8]
    python benchmarks/generation_profile.py --smoke        # CPU, scaled down: checks the script

Variants (each one ``policy.generate`` of B x G rows from ``expand_prompts``, min = max new tokens):

- greedy: no sampler (the floor: the model and transformers' decoding loop)
- gumbel: + ``sampling.GumbelSampler`` (per-row seeded noise: what training and the bootstrap sample with)
- lora: + LoRA adapters (r 64 on every projection, as the real templates), gumbel
- lora_ckpt: + activation checkpointing enabled, as the trainer leaves the model while it samples

Prints one line per variant and the profile's top operators by self CPU time; a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_size_step as bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["3b", "7b"], default="7b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=560)
    ap.add_argument("--profile-tokens", type=int, default=8, help="tokens generated under the profiler")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.image_size, args.tokens = 112, 8
    elif not torch.cuda.is_available():
        ap.error("no CUDA device (use --smoke on a CPU)")
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    from grto_cli.core.policy import encode_prompts, expand_prompts, generate, sampling_config
    from grto_cli.core.sampling import GumbelSampler, rollout_key, row_keys

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

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run(tokens: int, use_sampler: bool) -> float:
        with torch.no_grad():
            inputs = expand_prompts(policy.model, prompts, torch.arange(B).repeat_interleave(G))
        cfg = sampling_config(policy, tokens)
        cfg.min_new_tokens = tokens
        sampler = GumbelSampler(row_keys([rollout_key(0, 0, g) for g in range(B)], G), 1.0,
                                prompts["input_ids"].shape[1]) if use_sampler else None
        sync()
        start = time.perf_counter()
        generate(policy, inputs, cfg, sampler)
        sync()
        return time.perf_counter() - start

    def per_token(use_sampler: bool) -> float:
        run(4, use_sampler)  # warm-up (first launches, allocator)
        short, long = run(4, use_sampler), run(args.tokens, use_sampler)
        return (long - short) / (args.tokens - 4) * 1000  # ms per decoding step, prefill excluded

    results = {}
    results["greedy"] = per_token(False)
    print(f"greedy      {results['greedy']:8.2f} ms/token", flush=True)
    results["gumbel"] = per_token(True)
    print(f"gumbel      {results['gumbel']:8.2f} ms/token", flush=True)
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
    policy.model = get_peft_model(policy.model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05,
                                                           target_modules=targets))
    policy.model.eval()
    results["lora"] = per_token(True)
    print(f"lora        {results['lora']:8.2f} ms/token", flush=True)
    policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.model.enable_input_require_grads()
    policy.model.eval()
    results["lora_ckpt"] = per_token(True)
    print(f"lora_ckpt   {results['lora_ckpt']:8.2f} ms/token", flush=True)

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run(args.profile_tokens, True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    if cuda:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
    print(json.dumps({"benchmark": "generation_profile", "size": "tiny" if args.smoke else args.size,
                      "device": torch.cuda.get_device_name(0) if cuda else "cpu", "rows": B * G,
                      "prompt_tokens": int(prompts["input_ids"].shape[1]), "ms_per_token": results}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
