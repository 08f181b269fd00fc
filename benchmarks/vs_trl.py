"""grto's RL step against TRL's ``GRPOTrainer`` on the same policy, data, batch and reward: seconds
per step, rollouts per second, peak memory, and the ratio of the two. One invocation runs both.

    python benchmarks/vs_trl.py [--queries 8] [--group-size 8] [--completion-tokens 40] [--steps 3] [--warmup 1]
        [--micro-batch 64] [--threads N] [--seed 0] [--keep DIR]
    python benchmarks/vs_trl.py --smoke                      # CPU, B=2 G=2, 8 tokens, 1 timed step: checks the script
    python benchmarks/vs_trl.py --size 3b|7b [--mode lora|full] [--completion-tokens 512]   # CUDA, random init
    python benchmarks/vs_trl.py --size random-tiny           # CPU: the 3b/7b code path on a scaled-down model

TRL (``pip install 'grto[bench]'``: trl 1.16.0) is a benchmark extra, never a grto dependency.

What runs. Each trainer runs in its own subprocess (its own peak memory), one after the other
(``--rounds N``: N times each, alternating which goes first), with
the same ``torch`` threads (``OMP_NUM_THREADS`` = ``--threads``, which grto's stages read, and
``torch.set_num_threads`` in the TRL process) and the same seed:

- grto: ``grto train`` itself (``grto_cli.stages.train.run`` on a params file written from the
  packaged template: the embedded default's ``synthetic`` for ``--size tiny``, the real RefCOCOg
  template for the random-init sizes), ``train.method: grpo`` (the tool frozen: only the policy
  updates), ``eval_every: 0`` (no val), checkpoints only at the end (``Trainer.fit`` always writes
  one after the last step, outside any step's time). Seconds per step are ``Trainer.step``'s
  (rollouts, SAM, rewards, advantages, policy update), timed around each call (CUDA synchronised
  on both sides); the run's own ``perf/step_seconds`` curve, the same span without the synchronise,
  is in the JSON too (``perf_step_seconds``).
- TRL: ``GRPOTrainer`` on the policy and processor loaded by the same grto loader
  (``stages.system.load_stage_system``, so the same weights, dtype, processor and pixel bounds),
  the same trainable parameters (LoRA with grto's config and target regex, or a full fine-tune with
  the vision tower frozen or not as ``train.freeze_vision`` says), and a reward function that is
  grto's reward: ``answer.parse_answer`` of each completion, the same ``SamTool`` (same embedding
  cache, keyed by image path as in grto), ``rollout.score_groups`` (``SamTool.decode`` +
  ``rewards.compute_rewards`` with the params' ``train.rewards`` weights). Seconds per step are a
  ``TrainerCallback``'s ``on_step_begin`` -> ``on_step_end`` (generation, reward, log-prob pass,
  backward, optimizer step).

Same settings on both sides, from the one params file: B queries per step and G completions each
(TRL: ``per_device_train_batch_size`` = the micro-batch, ``gradient_accumulation_steps`` =
``steps_per_generation`` = B*G / micro-batch, so one generation of B*G completions per optimizer
step), ``max_new_tokens`` / ``max_completion_length``, temperature 1.0, top_p 1.0, no top_k, the
same suppressed tokens (the multimodal placeholders grto never samples), beta 0 (no reference
model), one optimisation pass per batch (``mu`` / ``num_iterations`` 1, so neither computes old
log-probs), the clipped surrogate with the same epsilon, token-mean loss (TRL ``dapo``), rewards
scaled by the group's std, AdamW at the same constant lr with weight decay 0, grad clip 1.0,
dropout off, activation checkpointing as ``train.gradient_checkpointing`` (non-reentrant on both
sides). TRL: no logging, saving or eval (``report_to=[]``), ``use_cpu`` on a CPU; on CUDA, bf16
autocast for LoRA (the base weights are bf16 on both sides), float32 for a full fine-tune (grto
trains float32 weights and refuses AdamW on bf16 ones). Warm-up steps (``--warmup``) are left out
of every number; then ``--steps`` timed steps.

Numbers: seconds per step (the median of the timed steps, over every ``--rounds``: on a shared
machine another process's burst lands in a step or two; the mean is printed too), rollouts per
second (B*G / that), peak memory
(CPU: the process's peak RSS, ``ru_maxrss``, which includes everything it imported and loaded, and
the peak when its first step began, to separate setup from training; CUDA:
``torch.cuda.max_memory_allocated`` over each timed step, reset at its start, max over the steps:
grto's ``perf/peak_gpu_mem_gib``), and the ratio TRL seconds per rollout / grto
seconds per rollout (> 1: grto is faster). The mean completion length and reward of each side are
printed too: the time of a step depends on how long the completions are.

On a machine shared with other work, ``--threads 1`` (and ``--rounds 2``): with torch's threads
on every core and another process holding one of them, both trainers' steps slow down five- to
tenfold and by different amounts from step to step (threads wait for each other at every op), and
the ratio means little; one thread per process is steady.

Differences that remain (what is not the same, and cannot be made so without changing a trainer):

- Sampling: grto samples by greedy decoding of Gumbel-noised scores, the noise keyed by rollout
  (``sampling.GumbelSampler``: a function of the rollout's key, the position and the token, so a
  rollout's tokens do not depend on its batch), TRL by ``generate``'s ``do_sample`` (softmax +
  multinomial from one generator stream). The same distribution, different draws, so the
  completions (and their lengths, and so the work) differ step by step; the printed mean lengths
  show how much. grto's noise costs it a few elementwise passes over (rows, vocabulary) per token.
- Batches: grto draws its B queries by (seed, step), TRL's sampler shuffles the dataset by seed;
  both from the same train split.
- The vision tower: grto encodes each image once per generation and once per log-prob pass
  (``policy.expand_prompts``), TRL once per completion (G times). That is a real difference of the
  implementations, and it is part of what is measured.
- What each implementation does besides: TRL runs the processor twice per step (once to generate,
  once more for the log-prob pass's image inputs), computes every token's entropy in its loss pass
  (for its metrics) and keeps completion-length and reward statistics; grto computes its rollout
  statistics. These are the trainers as they are, and are measured. Logging itself is off on both
  sides and outside the steps.
- The reward: TRL's reward function gets texts, not the prompt's processed image sizes, so it asks
  the image processor for an image's resized size (``parse_answer`` needs it) once per image, on its
  first visit (about a millisecond for the tiny 64x64 images); grto reads it off the prompt batch.
- On CUDA with LoRA, TRL computes under bf16 autocast (its ``bf16=True``), so its float32 LoRA
  adapters run in bf16 everywhere; grto has no autocast: its adapters run in bf16 while it
  generates (``policy.adapters_in_compute_dtype``) and in float32 in its log-prob passes.
- TRL's data loader fetches and decodes the batch's rows before ``on_step_begin``, outside the
  timed span; grto loads an image (cached after its first visit) inside the step.
- The tiny policy's completions are not forced to a length (they end at EOS, as in training). For
  the random-init sizes every completion is forced to ``--completion-tokens``: TRL through
  ``generation_kwargs={"min_new_tokens": L}`` (a ``GenerationConfig`` field), grto (which has no
  such setting) by wrapping ``rollout.sampling_config`` in its benchmark process to set the same
  field. A random-init policy never writes a parsable answer, so its reward is the format penalty
  on every rollout and the advantages are 0: speed and memory do not depend on that.

The CUDA sizes (``--size 3b|7b``): a random-init ``Qwen2_5_VLForConditionalGeneration`` at the
published 3B/7B dimensions and SAM ViT-H, built by ``benchmarks/real_size_step.py`` (``build_policy``,
``build_tool``: a byte-level BPE tokenizer trained on the prompt, Qwen2.5-VL's image processor,
560x560 images = 400 visual tokens) in a third subprocess and saved, bf16, so that both trainers load
the same files; RefCOCOg's template (prompt, LoRA r 64 on every projection, micro-batch 8,
checkpointing on). ``--mode full`` trains the language model's weights in float32 (weights,
gradients and AdamW's two states: ~16 bytes per weight, ~50 GB for 3B and ~115 GB for 7B before
activations, so 7B full does not fit one GPU). This path has NOT been run on a GPU
here (none was available when it was written): it was checked on the CPU with ``--size random-tiny``
(the same code, real_size_step's scaled-down dims) and by reading TRL 1.16.0's GRPOTrainer.

Prints one line per trainer, the ratio, and a final JSON line. Exit codes: 0 done, 2 bad arguments
(or no CUDA for 3b/7b), 3 a trainer failed (its output is shown).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
TRL_VERSION = "1.16.0"
SIZES = ("tiny", "random-tiny", "3b", "7b")
MIB, GIB = 1024 ** 2, 1024 ** 3


# -- arguments ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="tiny",
                    help="tiny: the shipped embedded default (CPU); random-tiny: a scaled-down random "
                         "Qwen2.5-VL (CPU check of the 3b/7b path); 3b / 7b: random init at real dims (CUDA)")
    ap.add_argument("--mode", choices=["lora", "full"], default=None,
                    help="LoRA or a full fine-tune (default: the template's: full for tiny, lora otherwise)")
    ap.add_argument("--queries", "-B", type=int, default=None, help="B queries per step (default 8; smoke 2)")
    ap.add_argument("--group-size", "-G", type=int, default=None, help="G completions per query (default 8; smoke 2)")
    ap.add_argument("--completion-tokens", type=int, default=None,
                    help="max new tokens per completion (default 40, the embedded default's; smoke 8)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="sequences per forward/backward (default: the template's, 64 tiny / 8 real; "
                         "capped at B*G, and must divide it)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="synthetic image side (default 64 tiny, 112 random-tiny, 560 for 3b/7b)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="activation checkpointing in both (default: the template's: off tiny, on otherwise)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 3; smoke 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each trainer this many times, alternating which goes first (default 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in each trainer's process (default: OMP_NUM_THREADS, else every core)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["grto", "trl"], default=None, help="run one trainer only (no ratio)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="work directory to write and keep (data, system, runs); default: a temporary one")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, tiny: B=2 G=2, 8 tokens, 1 timed step; checks that the script runs")
    ap.add_argument("--role", choices=["prepare", "grto", "trl"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role:
        return args
    if args.smoke:
        if args.size != "tiny":
            ap.error("--smoke runs the tiny embedded default (drop --size)")
        defaults = dict(queries=2, group_size=2, completion_tokens=8, steps=1)
    else:
        defaults = dict(queries=8, group_size=8, completion_tokens=40, steps=3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.image_size is None:
        args.image_size = {"tiny": 64, "random-tiny": 112}.get(args.size, 560)
    for name in ("queries", "group_size", "completion_tokens", "steps", "image_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.group_size < 2:
        ap.error("--group-size must be at least 2 (TRL's GRPO refuses fewer)")
    if args.warmup < 0:
        ap.error("--warmup must not be negative")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.micro_batch is not None and args.micro_batch < 1:
        ap.error("--micro-batch must be at least 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be at least 1")
    if args.size in ("3b", "7b"):
        import torch

        if not torch.cuda.is_available():
            ap.error(f"no CUDA device: --size {args.size} needs a GPU (use --size tiny or random-tiny on a CPU)")
    return args


# -- the parent: data, system, params, the two runs --------------------------------------------

def cpu_threads() -> int:
    from grto_cli.stages.runtime import cpu_threads as grto_threads

    return grto_threads()


def write_data(out: Path, n_train: int, image_size: int, seed: int) -> None:
    from grto_cli.core.data.records import write_manifest
    from grto_cli.core.data.synthetic import generate_split

    for split, n in (("train", n_train), ("val", 4)):
        write_manifest(out / f"{split}.jsonl", generate_split(split, n, seed, image_size, out))


def params_for(args, work: Path, base: Path) -> dict:
    """The packaged template's params with the benchmark's settings: what both trainers read."""
    import yaml

    from grto_cli.core.project import packaged_params

    setting = "synthetic" if args.size == "tiny" else "refcocog"
    params = yaml.safe_load(packaged_params(setting).read_text())
    pol, train = params["policy"], params["train"]
    if args.size != "tiny":  # the saved processor resizes to image_size^2 already; keep it so
        pol["min_pixels"] = pol["max_pixels"] = None
    mode = args.mode or ("full" if train.get("lora") is None else "lora")
    if mode == "full" and train.get("lora") is not None:
        train["lora"], train["policy_lr"] = None, 1e-6  # the template's own advice for a full fine-tune
    elif mode == "lora" and train.get("lora") is None:
        train["lora"] = {"r": 16, "alpha": 32, "dropout": 0.05,
                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    rollouts = args.queries * args.group_size
    micro = min(args.micro_batch or int(train.get("micro_batch", 8)), rollouts)
    if rollouts % micro:
        raise ValueError(f"the micro-batch ({micro}) must divide B*G ({rollouts}): TRL accumulates whole "
                         f"micro-batches of one generation")
    ckpt = train.get("gradient_checkpointing", False) if args.gradient_checkpointing is None \
        else args.gradient_checkpointing
    train.update(method="grpo", data=str(work / "data"), base=str(base), policy=None, tool=None, tool_arch=None,
                 out=str(work / "grto/out"), last_out=None, checkpoints=str(work / "grto/checkpoints"),
                 live=str(work / "grto/live"), seed=args.seed, steps=args.warmup + args.steps,
                 queries_per_step=args.queries, mu=1, micro_batch=micro, beta=0.0, eval_every=0,
                 checkpoint_every=args.warmup + args.steps + 1, gradient_checkpointing=ckpt, sharding="none")
    train["sampling"] = {"group_size": args.group_size, "temperature": 1.0, "top_p": 1.0,
                         "max_new_tokens": args.completion_tokens}
    return params


def run_child(role: str, spec_path: Path, threads: int) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "WANDB_DISABLED": "true"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--role", role, "--spec", str(spec_path)],
                          env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def summarise(sides: list[dict], rollouts: int) -> dict:
    """One trainer's rounds together: every timed step, their median (the number compared: a shared
    machine's hiccups land in the mean), the largest peaks, the mean length and reward."""
    side = dict(sides[0])
    seconds = [s for run in sides for s in run["step_seconds"]]
    median = statistics.median(seconds)
    side.update(step_seconds=seconds, rounds=len(sides), seconds_per_step=round(median, 4),
                mean_seconds_per_step=round(statistics.fmean(seconds), 4),
                rollouts_per_second=round(rollouts / median, 3), seconds_per_rollout=round(median / rollouts, 5),
                completion_tokens_mean=_mean([run["completion_tokens_mean"] for run in sides]),
                reward_mean=_mean([run["reward_mean"] for run in sides]))
    if "perf_step_seconds" in side:
        side["perf_step_seconds"] = [s for run in sides for s in run["perf_step_seconds"]]
    for key in ("peak_rss_mib", "setup_rss_mib", "peak_gpu_mem_gib"):
        if key in side:
            side[key] = max(run[key] for run in sides)
    return side


def describe(name: str, side: dict, cuda: bool) -> str:
    memory = (f"peak GPU {side['peak_gpu_mem_gib']:.2f} GiB" if cuda else
              f"peak RSS {side['peak_rss_mib']:.0f} MiB (setup {side['setup_rss_mib']:.0f})")
    return (f"{name:<5} {side['seconds_per_step']:8.3f} s/step  {side['rollouts_per_second']:8.2f} rollouts/s  "
            f"{memory}  completion tokens {side['completion_tokens_mean']:.1f}  reward {side['reward_mean']:.3f}  "
            f"(steps: {', '.join(f'{s:.3f}' for s in side['step_seconds'])})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role:
        return child(args.role, args.spec)
    import yaml

    cuda = args.size in ("3b", "7b")
    threads = args.threads or cpu_threads()
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="vs_trl-"))
    if args.keep and work.is_dir() and any(work.iterdir()):
        if not (work / "spec.json").is_file():  # never empty a directory this script did not write
            print(f"vs_trl: --keep {work} is not empty and not an earlier vs_trl work directory", file=sys.stderr)
            return 2
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    rollouts = args.queries * args.group_size
    try:
        started = time.perf_counter()
        n_train = max(32, args.queries * (args.warmup + args.steps))
        write_data(work / "data", n_train, args.image_size, args.seed)
        if args.size == "tiny":
            from grto_cli.core.project import package_dir

            base = package_dir() / "assets" / "base"  # the shipped base system: policy/ + tool/
        else:
            base = work / "base"
        try:
            params = params_for(args, work, base)
        except ValueError as exc:
            print(f"vs_trl: {exc}", file=sys.stderr)
            return 2
        params_path = work / "params.yaml"
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        spec = {"params": str(params_path), "work": str(work), "size": args.size, "cuda": cuda,
                "image_size": args.image_size, "seed": args.seed, "warmup": args.warmup, "steps": args.steps,
                "threads": threads, "force_length": args.size != "tiny", "base": str(base)}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        train = params["train"]
        mode = "full" if train["lora"] is None else "lora"
        print(f"vs_trl: size={args.size} mode={mode} B={args.queries} G={args.group_size} "
              f"completion_tokens={args.completion_tokens} micro_batch={train['micro_batch']} "
              f"checkpointing={train['gradient_checkpointing']} steps={args.steps} (+{args.warmup} warm-up) "
              f"threads={threads} device={'cuda' if cuda else 'cpu'} work={work}", flush=True)
        if args.size != "tiny":
            rc, out = run_child("prepare", spec_path, threads)
            if rc != 0:
                print(out[-6000:], file=sys.stderr)
                print(f"vs_trl: building the random-init system failed (exit {rc})", file=sys.stderr)
                return 3
        runs: dict[str, list[dict]] = {"grto": [], "trl": []}
        for r in range(args.rounds):  # alternating which trainer goes first
            for role in (("grto", "trl") if r % 2 == 0 else ("trl", "grto")):
                if args.only and role != args.only:
                    continue
                rc, out = run_child(role, spec_path, threads)
                result_file = work / f"result_{role}.json"
                if rc != 0 or not result_file.is_file():
                    print(out[-8000:], file=sys.stderr)
                    print(f"vs_trl: the {role} run failed (exit {rc})", file=sys.stderr)
                    return 3
                runs[role].append(json.loads(result_file.read_text()))
                result_file.unlink()
                if args.rounds > 1:
                    print(f"  round {r + 1} {role}: steps {runs[role][-1]['step_seconds']}", flush=True)
        results = {role: summarise(sides, rollouts) for role, sides in runs.items() if sides}
        for role, side in results.items():
            print(describe(role, side, cuda), flush=True)
        ratio = None
        if len(results) == 2:
            ratio = round(results["trl"]["seconds_per_rollout"] / results["grto"]["seconds_per_rollout"], 3)
            print(f"ratio (TRL s/rollout / grto s/rollout): {ratio:.2f}  "
                  f"({'grto faster' if ratio > 1 else 'TRL faster' if ratio < 1 else 'even'})", flush=True)
        device = "cpu"
        if cuda:
            import torch

            device = torch.cuda.get_device_name(0)
        result = {"benchmark": "vs_trl", "size": args.size, "smoke": args.smoke, "mode": mode, "device": device,
                  "trl_version": results.get("trl", {}).get("trl_version"), "queries": args.queries,
                  "group_size": args.group_size, "rollouts_per_step": rollouts,
                  "max_completion_tokens": args.completion_tokens, "forced_length": spec["force_length"],
                  "micro_batch": train["micro_batch"], "gradient_checkpointing": train["gradient_checkpointing"],
                  "image_size": args.image_size, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                  "threads": threads,
                  "seed": args.seed, "grto": results.get("grto"), "trl": results.get("trl"), "ratio": ratio,
                  "wall_s": round(time.perf_counter() - started, 1)}
        print(json.dumps(result), flush=True)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


# -- the children ------------------------------------------------------------------------------

def child(role: str, spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    import torch

    torch.manual_seed(spec["seed"])
    result = {"prepare": prepare_system, "grto": run_grto, "trl": run_trl}[role](spec)
    if result is not None:
        (Path(spec["work"]) / f"result_{role}.json").write_text(json.dumps(result))
    return 0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # Linux: KiB


def prepare_system(spec: dict) -> None:
    """The random-init system both trainers load: real_size_step's policy (bf16 on CUDA) and tool."""
    import torch

    sys.path.insert(0, str(HERE))
    import real_size_step as bench  # noqa: E402

    from grto_cli.core.tool import save_sam

    smoke = spec["size"] == "random-tiny"
    ns = argparse.Namespace(size="3b" if smoke else spec["size"], smoke=smoke, image_size=spec["image_size"],
                            seed=spec["seed"])
    device = torch.device("cuda" if spec["cuda"] else "cpu")
    policy = bench.build_policy(ns, device, torch.bfloat16 if spec["cuda"] else torch.float32)
    out = Path(spec["base"])
    policy.model.save_pretrained(out / "policy")
    policy.processor.save_pretrained(out / "policy")
    del policy
    tool = bench.build_tool(ns, device)
    save_sam(tool.sam, tool.arch, out / "tool")


def force_length_in_grto() -> None:
    """grto has no min_new_tokens setting: in this process only, every rollout's GenerationConfig
    gets min_new_tokens = max_new_tokens (as TRL gets it through generation_kwargs)."""
    from grto_cli.core import rollout

    original = rollout.sampling_config

    def forced(policy, max_new_tokens):
        config = original(policy, max_new_tokens)
        config.min_new_tokens = max_new_tokens
        return config

    rollout.sampling_config = forced


def run_grto(spec: dict) -> dict:
    """``grto train`` (its stage function) on the params file; numbers from the run's live curves."""
    import torch

    from grto_cli.core import trainer as trainer_module
    from grto_cli.stages import train

    shutil.rmtree(Path(spec["work"]) / "grto", ignore_errors=True)  # an earlier round's run: start afresh
    if spec["force_length"]:
        force_length_in_grto()
    cuda = spec["cuda"]
    setup, seconds, peaks = {}, [], []
    original_step = trainer_module.Trainer.step

    def step(self):
        """``Trainer.step`` as it is, timed from outside too: CUDA synchronised on both sides of it
        (the trainer's own ``perf/step_seconds`` stops the clock without a synchronise, so the tail
        of its optimizer step could slip into the next step), as TRL's callback does."""
        if not setup:  # the setup's peak RSS and the trainable weights, when the first step begins
            setup.update(rss=peak_rss_mib(),
                         trainable=sum(p.numel() for p in self.policy.model.parameters() if p.requires_grad))
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        metrics = original_step(self)  # resets the CUDA peak at its start
        if cuda:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
        seconds.append(time.perf_counter() - started)
        return metrics

    trainer_module.Trainer.step = step
    train.run(spec["params"], [], fresh=True)
    live = Path(spec["work"]) / "grto/live/plots/metrics"

    def curve(name: str) -> list[float]:
        rows = (live / f"{name}.tsv").read_text().splitlines()[1:]
        return [float(r.split("\t")[-1]) for r in rows][spec["warmup"]:]

    w = spec["warmup"]
    own = curve("perf/step_seconds")  # the run's own curve: the same span, without the synchronise
    assert len(seconds) - w == len(own) == spec["steps"], (len(seconds), len(own), spec["steps"])
    result = {"trainer": "grto train (grpo)", "step_seconds": [round(s, 4) for s in seconds[w:]],
              "perf_step_seconds": [round(s, 4) for s in own],
              "peak_rss_mib": round(peak_rss_mib(), 1), "setup_rss_mib": round(setup["rss"], 1),
              "completion_tokens_mean": _mean(curve("rollout/completion_tokens")),
              "reward_mean": _mean(curve("rollout/reward_mean")), "torch_threads": torch.get_num_threads(),
              "trainable_params": setup["trainable"]}
    if cuda:
        result["peak_gpu_mem_gib"] = round(max(peaks[w:]) / GIB, 3)
    return result


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else float("nan")


def run_trl(spec: dict) -> dict:
    """TRL's GRPOTrainer with the settings of the same params file (see the module docstring)."""
    import numpy as np
    import torch
    import trl
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback

    from grto_cli.core.answer import parse_answer, prompt_parts
    from grto_cli.core.checkpoint import system_paths
    from grto_cli.core.data.images import load_rgb
    from grto_cli.core.policy import encode_prompts, vision_tower
    from grto_cli.core.rollout import score_groups
    from grto_cli.stages.params import Params
    from grto_cli.stages.runtime import quiet_transformers, set_threads
    from grto_cli.stages.sections import PolicyParams, ToolParams, training_records
    from grto_cli.stages.system import load_stage_system
    from grto_cli.stages.train import TrainConfig, training_policy_params

    set_threads()  # OMP_NUM_THREADS, as grto's stages
    quiet_transformers()
    if trl.__version__ != TRL_VERSION:
        print(f"vs_trl: trl {trl.__version__}, not the {TRL_VERSION} this benchmark was written against",
              file=sys.stderr)
    read = Params(spec["params"], [])
    cfg = read.section(TrainConfig, "train")
    rl = cfg.rl
    pol_cfg = training_policy_params(read.section(PolicyParams, "policy"), rl)
    tool_cfg = read.section(ToolParams, "tool")
    policy, tool = load_stage_system(system_paths(cfg.base, cfg.policy, cfg.tool, cfg.tool_arch), pol_cfg, tool_cfg)
    tool.sam.requires_grad_(False)  # grpo: the tool is frozen
    model, processor = policy.model, policy.processor
    cuda = spec["cuda"]
    root = Path(cfg.data)
    records = training_records(root / "train.jsonl")
    by_id = {r.id: r for r in records}
    G, B, L = rl.sampling.group_size, rl.queries_per_step, rl.sampling.max_new_tokens

    def conversation(query: str) -> list[dict]:
        content = [{"type": "image"} if part is None else {"type": "text", "text": part}
                   for part in prompt_parts(policy.prompt_template, query)]
        return [{"role": "user", "content": content}]

    dataset = Dataset.from_dict({"prompt": [conversation(r.query) for r in records],
                                 "image": [load_rgb(r.image_path(root), pil=True) for r in records],
                                 "record_id": [r.id for r in records]})

    # The same prompt tokens as grto's (a check, not a fix: TRL renders the chat template itself).
    first = records[0]
    grto_ids = encode_prompts(policy, [load_rgb(first.image_path(root), pil=True)], [first.query])["input_ids"][0]
    messages = trl.data_utils.prepare_multimodal_messages(dataset[0]["prompt"], images=[dataset[0]["image"]])
    trl_ids = processor.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"][0]
    prompt_ids_match = [int(t) for t in grto_ids.tolist()] == [int(t) for t in list(trl_ids)]

    loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    resized: dict[str, tuple[int, int]] = {}
    patch = processor.image_processor.patch_size

    def load(record):  # as Trainer._load: decoded once, kept
        if record.id not in loaded:
            image = load_rgb(record.image_path(root))
            loaded[record.id] = (image, record.decode_mask())
            grid = processor.image_processor(images=[Image.fromarray(image)], return_tensors="pt")["image_grid_thw"]
            _, h, w = grid[0].tolist()
            resized[record.id] = (int(h) * patch, int(w) * patch)  # as policy.resized_sizes
        return loaded[record.id]

    def grto_reward(prompts, completions, record_id, **kwargs) -> list[float]:
        """grto's reward: parse, the SAM tool's masks, compute_rewards (rollout.score_groups)."""
        if len(record_id) % G or any(record_id[i] != record_id[i - i % G] for i in range(len(record_id))):
            raise RuntimeError("TRL did not hand the reward G consecutive completions per query")
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        group_records = [by_id[record_id[i]] for i in range(0, len(record_id), G)]
        pairs = [load(r) for r in group_records]
        images = [im for im, _ in pairs]
        parsed = [parse_answer(t, images[i // G].shape[:2], resized[group_records[i // G].id], policy.coord_convention,
                               pol_cfg.require_think) for i, t in enumerate(texts)]
        embeddings = tool.embed(images, [str(r.image_path(root)) for r in group_records])
        targets = [torch.as_tensor(m, device=tool.device) for _, m in pairs]
        return score_groups(tool, embeddings, group_records, images, targets, parsed, G, rl.rewards).total.tolist()

    peft_config = None
    if rl.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=rl.lora.r, lora_alpha=rl.lora.alpha, lora_dropout=rl.lora.dropout,
                                 target_modules=rf".*language_model.*\.({'|'.join(rl.lora.target_modules)})$")
    elif rl.freeze_vision:
        vision = vision_tower(model)
        if vision is not None:
            vision.requires_grad_(False)

    micro = rl.micro_batch
    accumulation = B * G // micro
    generation_kwargs = {"suppress_tokens": list(policy.suppressed_ids) or None}
    if spec["force_length"]:
        generation_kwargs["min_new_tokens"] = L
    args = trl.GRPOConfig(
        output_dir=str(Path(spec["work"]) / "trl"), seed=rl.seed, data_seed=rl.seed,
        max_steps=spec["warmup"] + spec["steps"], per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation, steps_per_generation=accumulation, num_generations=G,
        max_completion_length=L, temperature=rl.sampling.temperature, top_p=rl.sampling.top_p, top_k=0,
        repetition_penalty=1.0, generation_kwargs=generation_kwargs,
        beta=rl.beta, num_iterations=rl.mu, epsilon=rl.clip_low,
        epsilon_high=rl.clip_high if rl.clip_high is not None else rl.clip_low, loss_type="dapo",
        scale_rewards="group" if rl.scale_by_std else "none", mask_truncated_completions=False,
        learning_rate=rl.policy_lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=rl.max_grad_norm, disable_dropout=True,
        gradient_checkpointing=cfg.memory.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=not cuda, bf16=cuda and rl.lora is not None, fp16=False,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        log_completions=False, remove_unused_columns=False, dataloader_num_workers=0)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.peaks, self.lengths, self.rewards = [], [], [], []
            self.setup_rss = None
            self.trainer = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.setup_rss is None:
                self.setup_rss = peak_rss_mib()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.started)
            if cuda:
                self.peaks.append(torch.cuda.max_memory_allocated())
            metrics = self.trainer._metrics["train"]  # TRL's own bookkeeping of the step (logging is off)
            self.lengths.append(metrics["completions/mean_length"][-1])
            self.rewards.append(metrics["reward"][-1])

    timer = StepTimer()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=grto_reward, args=args, train_dataset=dataset,
                              processing_class=processor, callbacks=[timer], peft_config=peft_config)
    timer.trainer = trainer
    trainer.train()
    w = spec["warmup"]
    seconds = timer.seconds[w:]
    assert len(seconds) == spec["steps"], (len(timer.seconds), spec)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {"trainer": f"trl GRPOTrainer {trl.__version__}", "trl_version": trl.__version__,
              "step_seconds": [round(s, 4) for s in seconds], "peak_rss_mib": round(peak_rss_mib(), 1),
              "setup_rss_mib": round(timer.setup_rss, 1), "completion_tokens_mean": _mean(timer.lengths[w:]),
              "reward_mean": _mean(timer.rewards[w:]), "torch_threads": torch.get_num_threads(),
              "prompt_ids_match_grto": prompt_ids_match, "trainable_params": trainable}
    if cuda:
        result["peak_gpu_mem_gib"] = round(max(timer.peaks[w:]) / GIB, 3)
    return result


if __name__ == "__main__":
    sys.exit(main())
