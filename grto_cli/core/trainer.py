"""One RL loop for GRPO, GRTO and B-GRTO, read top-down.

grpo: the tool stays frozen (bit-identical). grto: the tool trains on the same rollouts from the
base tool. b-grto: as grto, from the bootstrapped tool. Everything else is shared.

One step: B queries drawn by (seed, step) (a resumed run sees the same batches), G rollouts each
-> rewards -> group-normalised advantages -> mu epochs of the clipped surrogate (+ k3 KL to the
frozen reference when beta > 0) over micro-batches, normalised over the whole batch -> one tool
step on lambda_tool * L_tool -> the step's statistics. ``fit`` runs the steps, evaluates val, keeps
the best-on-val system and writes resumable checkpoints (``checkpoint.RunDir``).

Over N processes (``distributed.Processes``) the math is one process's: each takes a contiguous
block of whole groups from the same global draw, a group's noise is keyed by (seed, step, group)
alone, normalisers and logged statistics are sums over the global batch, and each process's loss
is its share of the global loss times N (gradients are averaged over processes). How the policy's
passes run over the processes is the engine's business (``core/engines``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch

from grto_cli.core.engines.registry import build as build_engine
from grto_cli.core.checkpoint import RunDir, load_resume, save_resume, save_system
from grto_cli.core.config import METHODS, check_choice, check_positive
from grto_cli.core.data.images import load_rgb
from grto_cli.core.data.records import Record
from grto_cli.core.distributed import Processes
from grto_cli.core.evaluation import evaluate_split
from grto_cli.core.finetune import LoraParams, frozen_reference, prepare_policy
from grto_cli.core.grpo import AGGREGATION_MODES, batch_normaliser, group_advantages, policy_loss
from grto_cli.core.grto import TOOL_WEIGHTINGS, ToolLossTerms, freeze_image_encoder, rollout_weights, tool_optimizer
from grto_cli.core.io import atomic_dir
from grto_cli.core.metrics import (LOSS_POLICY, LOSS_TOTAL, PERF_PEAK_GPU_MEM_GIB, PERF_ROLLOUTS_PER_SECOND,
                                   PERF_STEP_SECONDS, POLICY_GRAD_NORM, TOOL_LOSS, TOOL_VALID_ROLLOUTS, VAL_GIOU,
                                   val_metrics)
from grto_cli.core.policy import Policy
from grto_cli.core.rewards import RewardWeights
from grto_cli.core.rollout import PolicyLogprobs, RolloutBatch, SamplingParams, rollout_group, rollout_statistics
from grto_cli.core.settings import MemoryParams, Schedule, TrainState
from grto_cli.core.sampling import rollout_key
from grto_cli.core.tool import SEG_LOSSES, Tool

SUMMED_STATS = {LOSS_TOTAL, LOSS_POLICY}  # already shares of the whole-batch loss: add, don't average
LogFn = Callable[[int, dict], None]
Timer = Callable[[str], ContextManager]  # a part of the step by name (benchmarks/real_size_step.py)


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
    # A group whose rewards spread (max - min) less than this gets no advantage (0: only equal ones)
    min_group_spread: float = 0.0
    max_grad_norm: float = 1.0
    tool_loss: str = "dice_bce"
    tool_weighting: str = "uniform"
    rewards: RewardWeights = field(default_factory=RewardWeights)
    lora: LoraParams | None = None
    freeze_vision: bool = True  # full fine-tuning (lora: null) leaves the vision tower as it is
    seed: int = 0

    def validate(self) -> None:
        """Every enumerated option and every count, checked before anything is loaded."""
        check_choice("method", self.method, METHODS)
        check_choice("loss_mode", self.loss_mode, AGGREGATION_MODES)
        check_choice("tool_loss", self.tool_loss, SEG_LOSSES)
        check_choice("tool_weighting", self.tool_weighting, TOOL_WEIGHTINGS)
        for name in ("queries_per_step", "mu", "micro_batch"):
            check_positive(name, getattr(self, name))
        check_positive("sampling.group_size", self.sampling.group_size)
        check_positive("sampling.max_new_tokens", self.sampling.max_new_tokens)
        if self.min_group_spread < 0:
            raise ValueError(f"min_group_spread must be >= 0, got {self.min_group_spread}")
        if self.sampling.top_p != 1.0:
            raise ValueError("sampling.top_p must be 1.0: training log-probs do not reproduce a top-p filter")


class Trainer:
    def __init__(self, cfg: RLConfig, policy: Policy, tool: Tool, train_records: list[Record],
                 val_records: list[Record], root: Path, require_think: bool = False,
                 memory: MemoryParams | None = None, processes: Processes | None = None,
                 timer: Timer | None = None):
        cfg.validate()
        self.memory = memory or MemoryParams()
        self.memory.validate()
        self.cfg, self.policy, self.tool, self.root = cfg, policy, tool, root
        self.train_records, self.val_records, self.require_think = train_records, val_records, require_think
        self.processes = processes or Processes()
        self.local = self.processes.block(cfg.queries_per_step, "queries per step (train.queries_per_step)")
        self.timed = timer or (lambda part: contextlib.nullcontext())
        self.state = TrainState()
        self.engine = build_engine(self.memory.sharding, self.processes, cfg.max_grad_norm, cfg.lora is not None)
        prepare_policy(policy, cfg.lora, cfg.freeze_vision, self.memory.gradient_checkpointing)
        reference = frozen_reference(policy, cfg.lora) if cfg.beta > 0 else None
        self.engine.prepare(PolicyLogprobs(policy.model), PolicyLogprobs(reference) if reference else None,
                            cfg.policy_lr)
        self.train_tool = cfg.method in ("grto", "b-grto")
        freeze_image_encoder(tool)
        if not self.train_tool:
            tool.freeze()
        self.tool_opt = tool_optimizer(tool, cfg.tool_lr) if self.train_tool else None
        self.tool_pass = self.processes.wrap(ToolLossTerms(tool)) if self.train_tool else None
        self._images: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- the whole run -------------------------------------------------------------------------

    def fit(self, schedule: Schedule, run: RunDir, log: LogFn = lambda step, metrics: None,
            progress: Callable[[int, dict | None], None] | None = None) -> TrainState:
        """Train to ``schedule.steps``, resuming from ``run.last`` when it exists. Val is evaluated at
        step 0 and every ``eval_every`` steps (the best-on-val system goes to ``run.best``); a
        checkpoint is written every ``checkpoint_every`` steps and at the end. ``log(step, metrics)``
        receives every metric; ``progress(step, metrics)`` is called once at the start (metrics None)
        and after each step."""
        schedule.validate()
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
            policy_state = self.engine.model_state()  # every process takes part; the main one writes
            if self.processes.is_main:
                with atomic_dir(run.best) as tmp:
                    save_system(self.policy, self.tool, tmp, policy_state=policy_state)
        return val

    # -- one step: sample -> reward -> advantages -> policy update -> tool update -> log ---------

    def step(self) -> dict:
        step, started = self.state.step, time.perf_counter()
        cuda = self.tool.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.tool.device)
        torch.manual_seed(self.cfg.seed * 1_000_003 + step)  # any other randomness is (seed, step)'s
        batch = self.rollouts(step)  # G completions per query, their calls, masks and rewards
        advantages, _ = group_advantages(batch.rewards.total, batch.group_size, self.cfg.scale_by_std,
                                         min_spread=self.cfg.min_group_spread)  # (n,)
        metrics = rollout_statistics(batch, self.processes.gather, self.cfg.scale_by_std, self.cfg.min_group_spread)
        metrics.update(self.policy_update(batch, advantages))
        metrics.update(self.tool_update(batch, advantages))
        self.state.step += 1
        seconds = time.perf_counter() - started
        metrics[PERF_STEP_SECONDS] = seconds
        metrics[PERF_ROLLOUTS_PER_SECOND] = self.cfg.queries_per_step * self.cfg.sampling.group_size / seconds
        if cuda:
            metrics[PERF_PEAK_GPU_MEM_GIB] = torch.cuda.max_memory_allocated(self.tool.device) / 1024 ** 3
        return metrics

    def rollouts(self, step: int) -> RolloutBatch:
        """This process's groups of the step's global batch; group g's noise is keyed by (seed, step, g)."""
        rng = np.random.default_rng([self.cfg.seed, step])
        n = len(self.train_records)
        drawn = rng.choice(n, size=self.cfg.queries_per_step, replace=n < self.cfg.queries_per_step)
        records = [self.train_records[int(i)] for i in drawn][self.local]
        keys = [rollout_key(self.cfg.seed, step, g) for g in range(self.cfg.queries_per_step)][self.local]
        loaded = [self._load(r) for r in records]
        return rollout_group(self.policy, self.tool, records, [im for im, _ in loaded], [m for _, m in loaded],
                             self.cfg.sampling, self.cfg.rewards, keys, self.require_think,
                             image_keys=[str(r.image_path(self.root)) for r in records],
                             generating=self.engine.generating)

    def _load(self, r: Record) -> tuple[np.ndarray, np.ndarray]:
        if r.id not in self._images:
            self._images[r.id] = (load_rgb(r.image_path(self.root)), r.decode_mask())
        return self._images[r.id]

    def logprobs(self, logprob_pass: torch.nn.Module, batch: RolloutBatch, rows: slice) -> torch.Tensor:
        """Per-token log-probs (n, L) of some rollouts through an engine's pass (the policy's, with or
        without gradient, or the reference's), in the sampling distribution: logits / T, the
        sampler's suppressed ids at -inf. Every RL log-prob is computed here."""
        return logprob_pass(batch, rows, self.cfg.sampling.temperature, self.policy.suppressed_ids,
                            self.memory.logprob_chunk)

    @torch.no_grad()
    def _logprobs_no_grad(self, logprob_pass: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
        n, mb = batch.completion_ids.shape[0], self.cfg.micro_batch
        return torch.cat([self.logprobs(logprob_pass, batch, slice(s, s + mb)) for s in range(0, n, mb)])  # (N, L)

    def reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor | None:
        if self.cfg.beta == 0:
            return None  # no reference pass at all
        with self.timed("reference"):
            if self.engine.reference_pass is not None:
                return self._logprobs_no_grad(self.engine.reference_pass, batch)
            with self.policy.model.disable_adapter():  # LoRA: the base model is the reference
                return self._logprobs_no_grad(self.engine.policy_pass, batch)

    def policy_update(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict:
        """``mu`` epochs over the same rollouts. The sampling policy's log-probs are computed once,
        before the first update (with mu == 1 they are the epoch's own, detached: no extra pass)."""
        cfg = self.cfg
        self.policy.model.train()  # (dropout is off: finetune.prepare_policy)
        old_logp = self._logprobs_no_grad(self.engine.policy_pass, batch) if cfg.mu > 1 else None  # (N, L)
        ref_logp = self.reference_logprobs(batch)  # (N, L) or None
        totals: dict[str, float] = {}
        for _ in range(cfg.mu):
            stats = self.accumulate_policy_gradients(batch, advantages, old_logp, ref_logp)
            with self.timed("policy_optimizer"):
                grad_norm = self.engine.step()  # clip, update, zero
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.mu
        totals[POLICY_GRAD_NORM] = grad_norm
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
            # Gradients are summed over processes once, after the last micro-batch's backward.
            with contextlib.nullcontext() if k == len(starts) - 1 else self.engine.no_sync():
                with self.timed("policy_forward"):
                    logp = self.logprobs(self.engine.policy_pass, batch, rows)  # (n, L)
                    old = old_logp[rows] if old_logp is not None else logp.detach()
                    out = policy_loss(logp, old, advantages[rows].to(logp.device), mask[rows],
                                      ref_logp[rows] if ref_logp is not None else None, cfg.beta,
                                      cfg.clip_low, cfg.clip_high, cfg.loss_mode, normaliser)
                with self.timed("policy_backward"):  # the engines average over processes: the loss is a share
                    self.engine.backward(out.loss * processes.world_size)
            # Losses are already this micro-batch's share of the whole-batch loss, so they add up;
            # per-token means are weighted by the micro-batch's share of tokens.
            share = float(mask[rows].sum()) / total_tokens
            for k_, v in out.stats.items():
                totals[k_] = totals.get(k_, 0.0) + (v if k_ in SUMMED_STATS else v * share)
        return processes.sums(dict(sorted(totals.items())))

    def tool_update(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict:
        if not self.train_tool:
            return {}
        with self.timed("tool_step"):
            processes = self.processes
            weights = rollout_weights(advantages, batch.group_size, self.cfg.tool_weighting)  # (n,)
            calls = [batch.group_calls(i) for i in range(len(batch.records))]
            total, weight, n_valid = self.tool_pass(batch.embeddings, calls, batch.targets, self.cfg.tool_loss,
                                                    weights)
            loss = total / max(processes.sum(weight), 1e-8)  # this process's share of the global weighted mean
            self.tool_opt.zero_grad()
            (self.cfg.lambda_tool * loss * processes.world_size).backward()  # DDP averages over processes
            torch.nn.utils.clip_grad_norm_(self.tool_opt.param_groups[0]["params"], self.cfg.max_grad_norm)
            self.tool_opt.step()
        stats = processes.sums({TOOL_LOSS: loss.item(), TOOL_VALID_ROLLOUTS: n_valid})
        return {TOOL_LOSS: stats[TOOL_LOSS], TOOL_VALID_ROLLOUTS: int(stats[TOOL_VALID_ROLLOUTS])}

    # -- val and checkpoints -------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_val(self, limit: int | None = None, batch_size: int = 50) -> dict:
        """Val as `grto evaluate` scores a split (``evaluation.evaluate_split``), under ``val/`` names."""
        self.policy.model.eval()
        records = self.val_records[:limit] if limit else self.val_records
        return val_metrics(evaluate_split(self.policy, self.tool, records, self.root, batch_size,
                                          self.cfg.sampling.max_new_tokens, self.require_think, self.processes,
                                          generating=self.engine.generating))

    def save_checkpoint(self, directory: Path) -> None:
        """Every process takes part in the engine's whole states; the main process writes."""
        self.state.world_size = self.processes.world_size
        policy_state, optimizer_state = self.engine.model_state(), self.engine.optimizer_state()
        if self.processes.is_main:
            save_resume(directory, self.policy, self.tool, {"policy": self.engine.optimizer, "tool": self.tool_opt},
                        {"state": asdict(self.state)}, policy_state,
                        {"policy": optimizer_state} if optimizer_state is not None else None)

    def load_checkpoint(self, directory: Path) -> None:
        """Every process loads the same checkpoint. A run may resume on another number of processes:
        the batches and sampling noise are functions of (seed, step), not of the process layout."""
        saved = load_resume(directory, self.policy, self.tool, {"policy": self.engine.optimizer, "tool": self.tool_opt},
                            load_policy_state=self.engine.load_model_state,
                            optimizer_loaders={"policy": self.engine.load_optimizer_state})
        self.state = TrainState(**saved["state"])
        self.state.resumed_from = self.state.step
