#!/usr/bin/env bash
# The GPU checks of the real-size and scale-out work, in one call on a lent GPU machine (every item
# bounded by its own timeout; results land in $OUT as they finish, logs included). Benchmarks warm up
# with a full-length step (WARMUP_TOKENS=16 makes it short: the 2026-11-26 run did, and its 512-token
# generation ran 3x slower per token than a warmed 64-token one; see docs/pipelines.md):
#
#   bash benchmarks/gpu_checks.sh [ITEM ...]     # default: every item, in this order
#
# Measured on an H200 on 2026-11-26 (docs/pipelines.md, "Measured on one GPU"): bench_7b_lora took
# ~2 min, bench_3b_full_cold ~1 min, profile_7b ~1 min; pipeline_7b needed more than 330 s (its slot is now 540 s: run it in a call of its own).
#
#   decode_7b      generation_profile.py 7B, batch 32, 512 tokens after a 512-token warm-up: ms per decoding
#                  step before and after each speed change (the sampler, bf16 adapters, a static KV cache
#                  with compiled decoding); issue target <= 30 ms with LoRA (131 ms on 2026-11-26)
#   vs_trl_3b      vs_trl.py --size 3b: TRL's GRPOTrainer against grto train, random-init Qwen2.5-VL-3B,
#                  LoRA, 512-token completions (needs trl and its datasets / pyarrow wheels in .whl/)
#   bench_7b_lora  real_size_step.py 7B LoRA (B=4, G=8, 512-token completions, 400 visual tokens)
#   pipeline_7b    real_pipeline_step.py: the ReasonSeg template's train stage, 7B + SAM ViT-H random
#                  init, one step, launched by `accelerate launch --config_file .../one_gpu.yaml`
#   pytest_gpu     the suite's GPU-only tests (but the 3B benchmark test, which bench_3b_lora covers)
#   bench_3b_lora, bench_3b_full, bench_7b_full   real_size_step.py's other rows
#   profile_7b     generation_profile.py: ms per generated token, 7B, greedy / Gumbel / LoRA / checkpointing
#   bench_3b_full_cold  the 3B full row without the warm-up step (its peak memory; a cold step's seconds)
#   tool_cost      tool_cost.py: SAM ViT-H against SAM2.1 Hiera-L / B+ at 1024², encode seconds (bf16 autocast)
#                  and peak memory (needs Meta's sam2: its sdist + hydra-core omegaconf antlr4-python3-runtime
#                  iopath portalocker in .whl/, built here with SAM2_BUILD_CUDA=0 --no-build-isolation)
#
# Packages the machine lacks (grto's pins: transformers, peft, segment-anything, pycocotools, dvclive
# and what it imports) travel as wheels in .whl/, downloaded beforehand on a machine with a registry:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     transformers==5.24.0 peft==0.21.2 segment-anything==1.0 pycocotools==2.0.11 pysodmetrics==1.6.2 \
#     dvclive==3.49.1 dvc==3.67.1 dvc-render dvc-studio-client funcy flatten-dict ruamel.yaml voluptuous wcwidth regex
#   (+ for vs_trl_3b: trl==1.16.0 datasets pyarrow dill multiprocess xxhash fsspec, and pandas if the
#   machine lacks it; pyarrow alone is ~40 MB of the 64 MiB a call can carry: a call of its own)
# One device call runs at most 10 minutes: pass the items of each call explicitly, e.g.
#   bash benchmarks/gpu_checks.sh decode_7b bench_7b_lora      # then: vs_trl_3b; then: pipeline_7b
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 9; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

bench() {  # name timeout args... (the warm-up step's options first, so that later ones override them)
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T))"
  timeout "$limit" python3 benchmarks/real_size_step.py --warmup 1 --warmup-tokens "${WARMUP_TOKENS:-512}" "$@" \
    >"$OUT/$name.log" 2>&1
  echo "exit $?" >>"$OUT/$name.log"
  grep -E '^(part|generation|sam_|reference|policy_|tool_step|total|rollouts/s|OUT OF)|^exit' "$OUT/$name.log"
}

run_item() {
  case $1 in
    bench_7b_lora) bench bench_7b_lora 150 --size 7b --mode lora ;;
    bench_3b_lora) bench bench_3b_lora 110 --size 3b --mode lora ;;
    bench_3b_full) bench bench_3b_full 130 --size 3b --mode full ;;
    bench_7b_full) bench bench_7b_full 200 --size 7b --mode full ;;
    bench_3b_full_cold) bench bench_3b_full_cold 110 --size 3b --mode full --warmup 0 ;;
    decode_7b)
      echo "== decode_7b ($(date +%T))"
      timeout 420 python3 benchmarks/generation_profile.py --size 7b --tokens 512 --warmup-tokens 512 \
        --profile-tokens 0 --variants gumbel_generator,gumbel,lora_fp32,lora,lora_static >"$OUT/decode_7b.log" 2>&1
      echo "exit $?" >>"$OUT/decode_7b.log"
      grep -E "ms/token|^exit|^\{" "$OUT/decode_7b.log" ;;
    vs_trl_3b)
      echo "== vs_trl_3b ($(date +%T))"
      timeout 420 python3 benchmarks/vs_trl.py --size 3b --completion-tokens 512 --steps 2 >"$OUT/vs_trl_3b.log" 2>&1
      echo "exit $?" >>"$OUT/vs_trl_3b.log"
      tail -n 8 "$OUT/vs_trl_3b.log" ;;
    profile_7b)
      echo "== profile_7b ($(date +%T))"
      timeout 120 python3 benchmarks/generation_profile.py --size 7b >"$OUT/profile_7b.log" 2>&1
      echo "exit $?" >>"$OUT/profile_7b.log"
      grep -E "ms/token|^exit" "$OUT/profile_7b.log" ;;
    pipeline_7b)
      echo "== pipeline_7b ($(date +%T))"
      rm -rf /tmp/pipeline_7b
      timeout 540 python3 benchmarks/real_pipeline_step.py --project /tmp/pipeline_7b --size 7b --val 2 \
        --launch "python3 -m accelerate.commands.launch --config_file $PWD/grto_cli/configs/accelerate/one_gpu.yaml -m grto_cli" \
        >"$OUT/pipeline_7b.log" 2>&1
      echo "exit $?" >>"$OUT/pipeline_7b.log"
      tail -c 1500 "$OUT/pipeline_7b.log"
      cp /tmp/pipeline_7b/train.log "$OUT/pipeline_7b_train.log" 2>/dev/null
      tail -c 1500 /tmp/pipeline_7b/train.log 2>/dev/null ;;
    tool_cost)
      echo "== tool_cost ($(date +%T))"
      ls .whl/sam2-*.tar.gz >/dev/null 2>&1 && SAM2_BUILD_CUDA=0 python3 -m pip install -q --no-index --no-deps \
        --no-build-isolation --target /tmp/site .whl/sam2-*.tar.gz
      timeout 240 python3 benchmarks/tool_cost.py --tools vit_h sam2.1_hiera_l sam2.1_hiera_b+ >"$OUT/tool_cost.log" 2>&1
      echo "exit $?" >>"$OUT/tool_cost.log"
      grep -E "^tool=|skipped|^exit" "$OUT/tool_cost.log" ;;
    pytest_gpu)
      echo "== pytest_gpu ($(date +%T))"
      timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_tool.py tests/test_distributed.py \
        tests/test_benchmarks.py -k "gpu or cuda" --deselect tests/test_benchmarks.py::test_real_size_step_3b_lora_on_gpu \
        >"$OUT/pytest_gpu.log" 2>&1
      echo "exit $?" >>"$OUT/pytest_gpu.log"
      tail -n 15 "$OUT/pytest_gpu.log" ;;
    *) echo "unknown item $1"; return 2 ;;
  esac
}

items=("$@")
[ ${#items[@]} -eq 0 ] && items=(decode_7b bench_7b_lora vs_trl_3b pipeline_7b bench_3b_lora bench_7b_full pytest_gpu)
for item in "${items[@]}"; do run_item "$item"; done
echo "== done ($(date +%T))"
