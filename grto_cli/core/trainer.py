"""One RL loop for GRPO, GRTO and B-GRTO, read top-down.

grpo: the tool stays frozen (bit-identical). grto: the tool trains on the same rollouts from the
base tool. b-grto: as grto, from the bootstrapped tool. Everything else is shared.

Per step: sample B queries (chosen by (seed, step), so a resumed run sees the same batches), G
rollouts each, group-normalised advantages, mu epochs of the clipped surrogate (+ k3 KL to the
frozen reference when beta > 0) over micro-batches with whole-batch loss normalisation, then one
tool step on lambda_tool * L_tool. ``fit`` runs the steps, evaluates val, keeps the best-on-val
system and writes resumable checkpoints into the run's directory (``checkpoint.RunDir``).

Over N processes (``distributed.Processes``) the math is one process's: each takes a contiguous
block of whole groups from the same global draw, a group's sampling noise is keyed by (seed, step,
group) alone, the loss normalisers and logged statistics are sums over the global batch, and the
gradients are summed by DDP (each process's loss is its share of the global loss, times N, since
DDP averages), or, for a full fine-tune under ``memory.sharding``, reduce-scattered over a policy
whose weights and AdamW states are split across the processes: by FSDP2 (``fsdp``, sharding.py) or
by DeepSpeed ZeRO-3 (``zero3``, zero3.py, whose engine then takes the backward and the step).
Val predictions are spread over the processes and gathered; only the main process writes
checkpoints and the best system.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from grto_cli.core import sharding, zero3
from grto_cli.core.checkpoint import RunDir, load_resume, save_resume, save_system
from grto_cli.core.config import METHODS, check_choice
from grto_cli.core.data.images import load_rgb
from grto_cli.core.data.records import Record
from grto_cli.core.distributed import Processes
from grto_cli.core.grpo import AGGREGATION_MODES, batch_normaliser, group_advantages, policy_loss
from grto_cli.core.grto import TOOL_WEIGHTINGS, freeze_image_encoder, rollout_weights, tool_loss_terms, tool_optimizer
from grto_cli.core.inference import predict_records
from grto_cli.core.io import atomic_dir
from grto_cli.core.metrics import (LOSS_POLICY, LOSS_TOTAL, PERF_PEAK_GPU_MEM_GIB, PERF_ROLLOUTS_PER_SECOND,
                                   PERF_STEP_SECONDS, POLICY_GRAD_NORM, ROLLOUT_BOX_IOU,
                                   ROLLOUT_COMPLETION_TOKENS, ROLLOUT_DISTINCT_CALLS, ROLLOUT_FORMAT_RATE,
                                   ROLLOUT_IOU, ROLLOUT_POINT_IN_TARGET, ROLLOUT_REWARD_MEAN, ROLLOUT_REWARD_STD,
                                   ROLLOUT_ZERO_STD_GROUPS, TOOL_LOSS, TOOL_VALID_ROLLOUTS, VAL_BOX_AREA_RATIO,
                                   VAL_BOX_IOU, VAL_CIOU, VAL_DISTINCT_CALLS, VAL_FORMAT_RATE, VAL_GIOU,
                                   VAL_ORACLE_GIOU, VAL_POINT_IN_TARGET, VAL_PROMPT_ADHERENCE, GroundingMeter,
                                   SegmentationMeter, distinct_calls)
from grto_cli.core.policy import LOGPROB_CHUNK, Policy, vision_tower
from grto_cli.core.rewards import RewardWeights
from grto_cli.core.rollout import RolloutBatch, SamplingParams, rollout_group, rollout_logprobs
from grto_cli.core.sampling import rollout_key
from grto_cli.core.sharding import SHARDINGS, shard
from grto_cli.core.tool import SEG_LOSSES, SamTool

SUMMED_STATS = {LOSS_TOTAL, LOSS_POLICY}  # already shares of the whole-batch loss: add, don't average
LogFn = Callable[[int, dict], None]


@dataclass
class LoraParams:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class RLConfig:
    """What defines a run: the algorithm. With the hashes of its inputs, it is the run's resume key."""

    method: str = "b-grto"
    queries_per_step: int = 8  # B
    sampling: SamplingParams = field(default_factory=SamplingParams)
    mu: int = 1  # optimisation epochs per batch of rollouts
    micro_batch: int = 32  # sequences per forward/backward (gradient accumulation)
    policy_lr: float = 1e-4
    tool_lr: float = 1e-4
    lambda_tool: float = 1.0
    beta: float = 0.0  # KL weight; 0 skips the reference model entirely
    clip_low: float = 0.2
    clip_high: float | None = None
    loss_mode: str = "token_mean"
    scale_by_std: bool = True
    max_grad_norm: float = 1.0
    tool_loss: str = "dice_bce"
    tool_weighting: str = "uniform"
    rewards: RewardWeights = field(default_factory=RewardWeights)
    lora: LoraParams | None = None
    freeze_vision: bool = True  # full fine-tuning (lora: null) leaves the vision tower as it is
    seed: int = 0

    def validate(self) -> None:
        """Every enumerated option, checked before anything is loaded."""
        check_choice("method", self.method, METHODS)
        check_choice("loss_mode", self.loss_mode, AGGREGATION_MODES)
        check_choice("tool_loss", self.tool_loss, SEG_LOSSES)
        check_choice("tool_weighting", self.tool_weighting, TOOL_WEIGHTINGS)
        if self.sampling.top_p != 1.0:
            raise ValueError("sampling.top_p must be 1.0: training log-probs do not reproduce a top-p filter")


@dataclass
class Schedule:
    """How long and how often: free to change when a run resumes (raise ``steps`` to extend it)."""

    steps: int = 100
    eval_every: int = 25  # on val; the best val checkpoint becomes the output; 0: never
    eval_limit: int | None = None
    eval_batch_size: int = 50
    checkpoint_every: int = 10


@dataclass
class MemoryParams:
    """Compute-for-memory trades that leave the math as it is (free to change when a run resumes)."""

    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing in the policy
    logprob_chunk: int = LOGPROB_CHUNK  # completion tokens whose full-vocabulary logits exist at once
    # none: a whole policy per process (DDP); fsdp / zero3: a full fine-tune's weights, gradients and
    # AdamW states split over the processes, by FSDP2 (sharding.py) or DeepSpeed ZeRO-3 (zero3.py)
    sharding: str = "none"

    def validate(self) -> None:
        check_choice("sharding", self.sharding, SHARDINGS)


@dataclass
class TrainState:
    step: int = 0  # steps completed
    best_val_giou: float | None = None
    best_step: int | None = None
    resumed_from: int | None = None
    world_size: int = 1  # processes of the invocation that wrote this state


class PolicyLogprobs(torch.nn.Module):
    """The policy's gradient-carrying log-prob pass as a module, so DDP sees its forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: RolloutBatch, rows: slice, temperature: float, suppressed_ids, chunk: int) -> torch.Tensor:
        return rollout_logprobs(self.model, batch, rows, temperature, suppressed_ids, chunk)  # (n, L)


class ToolLossTerms(torch.nn.Module):
    """GRTO's tool loss terms (``grto.tool_loss_terms``) as a module, so DDP sees its forward."""

    def __init__(self, tool: SamTool):
        super().__init__()
        self.tool, self.sam = tool, tool.sam

    def forward(self, embeddings, calls, targets, kind: str, weights):
        total, weight, n_valid = tool_loss_terms(self.tool, embeddings, calls, targets, kind, weights)
        # Every trainable parameter takes part in every backward (with gradient 0 where unused), so
        # a process whose rollouts hold no valid call still joins DDP's gradient all-reduce.
        zero = sum(p.sum() for p in self.sam.parameters() if p.requires_grad) * 0.0
        return total + zero, weight, n_valid


class Trainer:
    def __init__(self, cfg: RLConfig, policy: Policy, tool: SamTool, train_records: list[Record],
                 val_records: list[Record], root: Path, require_think: bool = False,
                 memory: MemoryParams | None = None, processes: Processes | None = None):
        cfg.validate()
        self.cfg, self.policy, self.tool = cfg, policy, tool
        self.processes = processes or Processes()
        self.local = self.processes.block(cfg.queries_per_step, "queries per step (train.queries_per_step)")
        self.memory = memory or MemoryParams()
        self.memory.validate()
        # The module that gathers and scatters a sharded policy's whole states (the same functions in each).
        self.layout = {"fsdp": sharding, "zero3": zero3}.get(self.memory.sharding)
        self.sharded = self.layout is not None
        self.zero3 = self.layout is zero3  # DeepSpeed's engine runs the policy's backward and step
        if self.sharded and (cfg.lora is not None or not self.processes.distributed):
            raise ValueError(f"train.sharding: {self.memory.sharding} shards a full fine-tune (train.lora: null) over "
                             f"several processes (accelerate launch --num_processes N); LoRA and a lone process use "
                             f"sharding: none")
        self.train_records, self.val_records, self.root = train_records, val_records, root
        self.require_think = require_think
        self.state = TrainState()
        if self.memory.gradient_checkpointing:
            self._checkpoint_activations()
        if cfg.lora is not None:
            self._wrap_lora(cfg.lora)
        else:
            self._prepare_full_finetune()
        reference = self._reference_model() if cfg.beta > 0 else None
        self.train_tool = cfg.method in ("grto", "b-grto")
        freeze_image_encoder(tool)
        if not self.train_tool:
            tool.sam.requires_grad_(False)
        # The passes whose gradients are summed over processes (the modules themselves when alone):
        # DDP, FSDP's shards (the optimiser is built on the sharded parameters, so after this), or a
        # ZeRO-3 engine (built from an optimiser on the whole parameters, which it then partitions).
        def adamw() -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad],
                                     lr=cfg.policy_lr, weight_decay=0.0)

        if self.memory.sharding == "fsdp":
            self.policy_pass = shard(PolicyLogprobs(policy.model), policy.model, vision_tower(policy.model))
            self.reference = shard(PolicyLogprobs(reference), reference, vision_tower(reference)) if reference else None
            policy.sharded_root = self.policy_pass
            self.policy_opt = adamw()
        elif self.zero3:
            self.policy_pass, self.policy_opt = zero3.initialize(PolicyLogprobs(policy.model), adamw(),
                                                                 cfg.max_grad_norm)
            self.reference = zero3.initialize_frozen(PolicyLogprobs(reference)) if reference else None
        else:
            self.policy_pass = self.processes.wrap(PolicyLogprobs(policy.model))
            self.reference = PolicyLogprobs(reference) if reference is not None else None
            self.policy_opt = adamw()
        if self.sharded:  # every process runs every forward of the policy: generation included
            policy.lockstep = self.processes.lockstep = True
        self.tool_opt = tool_optimizer(tool, cfg.tool_lr) if self.train_tool else None
        self.tool_pass = self.processes.wrap(ToolLossTerms(tool)) if self.train_tool else None
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- setup ---------------------------------------------------------------------------------

    def _wrap_lora(self, lora: LoraParams) -> None:
        from peft import LoraConfig, get_peft_model

        # Vision tower stays frozen: LoRA goes on the language model's projections only.
        targets = rf".*language_model.*\.({'|'.join(lora.target_modules)})$"
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
        self.policy.model = get_peft_model(self.policy.model, config)

    def _checkpoint_activations(self) -> None:
        model = self.policy.model
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.cfg.lora is not None:
            model.enable_input_require_grads()  # frozen embeddings: LoRA's checkpointed blocks still get a graph

    def _prepare_full_finetune(self) -> None:
        """Every policy weight trains, except the vision tower unless ``freeze_vision`` is off; AdamW on
        half-precision weights is refused: at lr 1e-6 most updates fall below bf16's resolution."""
        model = self.policy.model
        if self.cfg.freeze_vision:
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

    def _reference_model(self):
        if self.cfg.lora is not None:
            return None  # the same model with adapters disabled (see reference_logprobs)
        ref = copy.deepcopy(self.policy.model).eval()
        ref.requires_grad_(False)
        return ref

    # -- the whole run -------------------------------------------------------------------------

    def fit(self, schedule: Schedule, run: RunDir, log: LogFn = lambda step, metrics: None,
            progress: Callable[[int, dict | None], None] | None = None) -> TrainState:
        """Train to ``schedule.steps``, resuming from ``run.last`` when it exists. Val is evaluated at
        step 0 and every ``eval_every`` steps (the best-on-val system goes to ``run.best``); a
        checkpoint is written every ``checkpoint_every`` steps and at the end. ``log(step, metrics)``
        receives every metric; ``progress(step, metrics)`` is called once at the start (metrics None)
        and after each step."""
        progress = progress or (lambda step, metrics: None)
        if run.resumable():
            self.load_checkpoint(run.last)
        progress(self.state.step, None)
        if self.state.step == 0 and schedule.eval_every:
            self._validate(schedule, run, log)  # the starting point competes for "best" too
        while self.state.step < schedule.steps:
            metrics = self.step()
            step = self.state.step
            log(step, metrics)
            if schedule.eval_every and (step % schedule.eval_every == 0 or step == schedule.steps):
                metrics.update(self._validate(schedule, run, log))
            if step % schedule.checkpoint_every == 0 or step == schedule.steps:
                self.save_checkpoint(run.last)
                self.processes.barrier()  # nobody runs ahead of a checkpoint that may still be written
            progress(step, metrics)
        return self.state

    def _validate(self, schedule: Schedule, run: RunDir, log: LogFn) -> dict:
        val = self.evaluate_val(schedule.eval_limit, schedule.eval_batch_size)
        log(self.state.step, val)
        if self.state.best_val_giou is None or val[VAL_GIOU] > self.state.best_val_giou:
            self.state.best_val_giou, self.state.best_step = val[VAL_GIOU], self.state.step
            # Gathered by every process when the policy is sharded, written by the main one.
            policy_state = self.layout.full_model_state(self.policy_pass) if self.sharded else None
            if self.processes.is_main:
                with atomic_dir(run.best) as tmp:
                    save_system(self.policy, self.tool, tmp, policy_state=policy_state)
        return val

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> dict:
        step = self.state.step
        started = time.perf_counter()
        cuda = self.tool.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.tool.device)
        torch.manual_seed(self.cfg.seed * 1_000_003 + step)  # any other randomness (dropout) is (seed, step)'s
        batch = self.rollouts(step)
        advantages, _ = group_advantages(batch.rewards.total, batch.group_size, self.cfg.scale_by_std)  # (n,)
        metrics = self.rollout_metrics(batch)
        metrics.update(self.policy_update(batch, advantages))
        metrics.update(self.tool_update(batch, advantages))
        self.state.step += 1
        seconds = time.perf_counter() - started
        metrics[PERF_STEP_SECONDS] = seconds
        metrics[PERF_ROLLOUTS_PER_SECOND] = self.cfg.queries_per_step * self.cfg.sampling.group_size / seconds
        if cuda:
            metrics[PERF_PEAK_GPU_MEM_GIB] = torch.cuda.max_memory_allocated(self.tool.device) / 1024 ** 3
        return metrics

    def rollout_metrics(self, batch: RolloutBatch) -> dict:
        """Rollout statistics of the whole global batch (every process's groups, in order, in one gather)."""
        r = batch.rewards
        rows = self.processes.gather(list(zip(
            r.total.tolist(), r.format_ok.float().tolist(), r.iou.tolist(), r.box_iou.tolist(), r.point.tolist(),
            batch.completion_mask.sum(1).float().tolist(), batch.calls)))
        total, format_ok, iou, box_iou, point, tokens, calls = zip(*rows)
        total = torch.tensor(total)  # (N,)
        _, zero_std = group_advantages(total, batch.group_size, self.cfg.scale_by_std)
        return {ROLLOUT_REWARD_MEAN: total.mean().item(), ROLLOUT_REWARD_STD: total.std().item(),
                ROLLOUT_FORMAT_RATE: float(np.mean(format_ok)), ROLLOUT_IOU: float(np.mean(iou)),
                ROLLOUT_ZERO_STD_GROUPS: zero_std, ROLLOUT_COMPLETION_TOKENS: float(np.mean(tokens)),
                ROLLOUT_BOX_IOU: float(np.mean(box_iou)), ROLLOUT_POINT_IN_TARGET: float(np.mean(point)),
                ROLLOUT_DISTINCT_CALLS: distinct_calls(calls) / len(calls)}

    def _batch_records(self, step: int) -> list[Record]:
        rng = np.random.default_rng([self.cfg.seed, step])
        idx = rng.choice(len(self.train_records), size=self.cfg.queries_per_step,
                         replace=len(self.train_records) < self.cfg.queries_per_step)
        return [self.train_records[int(i)] for i in idx]

    def _load(self, r: Record) -> tuple[np.ndarray, np.ndarray]:
        if r.id not in self._cache:
            self._cache[r.id] = (load_rgb(r.image_path(self.root)), r.decode_mask())
        return self._cache[r.id]

    def rollouts(self, step: int) -> RolloutBatch:
        """This process's groups of the step's global batch; group g's noise is keyed by (seed, step, g)."""
        records = self._batch_records(step)[self.local]
        keys = [rollout_key(self.cfg.seed, step, g) for g in range(self.cfg.queries_per_step)][self.local]
        loaded = [self._load(r) for r in records]
        return rollout_group(self.policy, self.tool, records, [im for im, _ in loaded], [m for _, m in loaded],
                             self.cfg.sampling, self.cfg.rewards, keys, self.require_think,
                             image_keys=[str(r.image_path(self.root)) for r in records])

    def logprobs(self, model: torch.nn.Module, batch: RolloutBatch, rows: slice) -> torch.Tensor:
        """Per-token log-probs (n, L) of some rollouts under ``model`` in the sampling distribution
        (temperature, suppressed tokens): the one place every policy, old-policy and reference
        log-prob is computed."""
        return rollout_logprobs(model, batch, rows, self.cfg.sampling.temperature, self.policy.suppressed_ids,
                                self.memory.logprob_chunk)

    @torch.no_grad()
    def _logprobs_no_grad(self, logprob_pass: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
        """Log-probs (N, L) of every rollout through a ``PolicyLogprobs`` (possibly DDP-wrapped or
        sharded: a sharded model is only run through its root), micro-batch by micro-batch."""
        n, mb = batch.completion_ids.shape[0], self.cfg.micro_batch
        return torch.cat([logprob_pass(batch, slice(s, s + mb), self.cfg.sampling.temperature,
                                       self.policy.suppressed_ids, self.memory.logprob_chunk)
                          for s in range(0, n, mb)])  # (N, L)

    def reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor | None:
        if self.cfg.beta == 0:
            return None  # no reference pass at all
        if self.reference is not None:
            return self._logprobs_no_grad(self.reference, batch)
        with self.policy.model.disable_adapter():
            return self._logprobs_no_grad(self.policy_pass, batch)

    def policy_update(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict:
        cfg = self.cfg
        model = self.policy.model
        model.train()
        # The sampling policy's log-probs: with mu == 1 the first (only) epoch's own log-probs,
        # detached, are exactly these, so the extra forward pass is skipped.
        old_logp = self._logprobs_no_grad(self.policy_pass, batch) if cfg.mu > 1 else None
        ref_logp = self.reference_logprobs(batch)
        totals: dict[str, float] = {}
        for _ in range(cfg.mu):
            if self.zero3:  # the engine clips, steps and zeroes the gradients itself
                stats = self.accumulate_policy_gradients(batch, advantages, old_logp, ref_logp)
                grad_norm = zero3.step(self.policy_pass)
            else:
                self.policy_opt.zero_grad()
                stats = self.accumulate_policy_gradients(batch, advantages, old_logp, ref_logp)
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                           cfg.max_grad_norm)
                self.policy_opt.step()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.mu
        totals[POLICY_GRAD_NORM] = float(grad_norm)
        return totals

    def accumulate_policy_gradients(self, batch: RolloutBatch, advantages: torch.Tensor,
                                    old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None) -> dict:
        """One epoch of backward passes over micro-batches: the accumulated gradient is the gradient
        of the whole-batch loss, whatever ``micro_batch`` is (one normaliser for the whole batch)
        and whatever the number of processes (the normaliser and token count are global sums)."""
        cfg, processes = self.cfg, self.processes
        mask = batch.completion_mask  # (n, L)
        counts = processes.sums({"normaliser": batch_normaliser(mask, cfg.loss_mode, cfg.sampling.max_new_tokens),
                                 "tokens": float(mask.sum())})
        normaliser, total_tokens = counts["normaliser"], max(counts["tokens"], 1.0)
        totals: dict[str, float] = {}
        starts = range(0, mask.shape[0], cfg.micro_batch)
        for k, s in enumerate(starts):
            rows = slice(s, s + cfg.micro_batch)
            # Gradients are summed over processes once, after the last micro-batch's backward (ZeRO-3
            # reduce-scatters each backward's into this process's partition, and accumulates there).
            sync = k == len(starts) - 1 or self.zero3
            with contextlib.nullcontext() if sync else processes.no_sync(self.policy_pass):
                logp = self.policy_pass(batch, rows, cfg.sampling.temperature, self.policy.suppressed_ids,
                                        self.memory.logprob_chunk)  # (n, L)
                old = old_logp[rows] if old_logp is not None else logp.detach()
                out = policy_loss(logp, old, advantages[rows].to(logp.device), mask[rows],
                                  ref_logp[rows] if ref_logp is not None else None, cfg.beta,
                                  cfg.clip_low, cfg.clip_high, cfg.loss_mode, normaliser)
                loss = out.loss * processes.world_size  # DDP (and ZeRO-3) average over processes; the loss is a share
                if self.zero3:
                    zero3.backward(self.policy_pass, loss)
                else:
                    loss.backward()
            # Losses are already this micro-batch's share of the whole-batch loss, so they add up;
            # per-token means are weighted by the micro-batch's share of tokens.
            share = float(mask[rows].sum()) / total_tokens
            for k_, v in out.stats.items():
                totals[k_] = totals.get(k_, 0.0) + (v if k_ in SUMMED_STATS else v * share)
        return processes.sums(dict(sorted(totals.items())))

    def tool_update(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict:
        if not self.train_tool:
            return {}
        processes = self.processes
        weights = rollout_weights(advantages, batch.group_size, self.cfg.tool_weighting)  # (n,)
        calls = [batch.group_calls(i) for i in range(len(batch.records))]
        total, weight, n_valid = self.tool_pass(batch.embeddings, calls, batch.targets, self.cfg.tool_loss, weights)
        loss = total / max(processes.sum(weight), 1e-8)  # this process's share of the global weighted mean
        self.tool_opt.zero_grad()
        (self.cfg.lambda_tool * loss * processes.world_size).backward()  # DDP averages over processes
        torch.nn.utils.clip_grad_norm_(self.tool_opt.param_groups[0]["params"], self.cfg.max_grad_norm)
        self.tool_opt.step()
        stats = processes.sums({TOOL_LOSS: loss.item(), TOOL_VALID_ROLLOUTS: n_valid})
        return {TOOL_LOSS: stats[TOOL_LOSS], TOOL_VALID_ROLLOUTS: int(stats[TOOL_VALID_ROLLOUTS])}

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_val(self, limit: int | None = None, batch_size: int = 50) -> dict:
        records = self.val_records[:limit] if limit else self.val_records
        meter, grounding = SegmentationMeter(), GroundingMeter()
        self.policy.model.eval()
        for pred in predict_records(self.policy, self.tool, records, self.root, batch_size,
                                    self.cfg.sampling.max_new_tokens, self.require_think, oracle=True,
                                    processes=self.processes):
            target = pred.record.decode_mask()
            meter.add(pred.mask, target, pred.parsed.format_ok)
            grounding.add(pred.parsed.call, pred.mask, target, pred.record.bbox, pred.oracle)
        s, g = meter.summary(), grounding.summary()
        val = {VAL_GIOU: s["giou"], VAL_CIOU: s["ciou"], VAL_FORMAT_RATE: s["format_rate"],
               VAL_BOX_IOU: g["call_box_iou"], VAL_POINT_IN_TARGET: g["point_in_target"],
               VAL_DISTINCT_CALLS: g["distinct_call_ratio"], VAL_ORACLE_GIOU: g.get("oracle_giou", 0.0)}
        if g["prompt_adherence"] is not None:
            val[VAL_PROMPT_ADHERENCE] = g["prompt_adherence"]
        if g["call_box_area_ratio"] is not None:
            val[VAL_BOX_AREA_RATIO] = g["call_box_area_ratio"]
        return val

    # -- checkpoints ---------------------------------------------------------------------------

    def _optimizers(self) -> dict:
        return {"policy": self.policy_opt, "tool": self.tool_opt}

    def save_checkpoint(self, directory: Path) -> None:
        """The main process writes; every process holds the same weights and optimiser state."""
        self.state.world_size = self.processes.world_size
        policy_state, optimizer_states = None, None
        if self.sharded:  # gathered by every process, written by the main one
            policy_state = self.layout.full_model_state(self.policy_pass)
            optimizer_states = {"policy": self.layout.full_optimizer_state(self.policy_pass, self.policy_opt)}
        if self.processes.is_main:
            save_resume(directory, self.policy, self.tool, self._optimizers(), {"state": asdict(self.state)},
                        policy_state, optimizer_states)

    def load_checkpoint(self, directory: Path) -> None:
        """Every process loads the same checkpoint. A run may resume on another number of processes:
        the batches and sampling noise are functions of (seed, step), not of the process layout."""
        loaders = {}
        if self.sharded:
            loaders = {"load_policy_state": lambda read: self.layout.load_full_model_state(self.policy_pass, read),
                       "optimizer_loaders": {"policy": lambda state: self.layout.load_full_optimizer_state(
                           self.policy_pass, self.policy_opt, state)}}
        saved = load_resume(directory, self.policy, self.tool, self._optimizers(), **loaders)
        self.state = TrainState(**saved["state"])
        self.state.resumed_from = self.state.step
