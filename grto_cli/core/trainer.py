"""One RL loop for GRPO, GRTO and B-GRTO.

grpo: the tool stays frozen (bit-identical). grto: the tool trains on the same rollouts from the
base tool. b-grto: as grto, from the bootstrapped tool. Everything else is shared.

Per step: sample B queries (chosen by (seed, step), so a resumed run sees the same batches), G
rollouts each, group-normalised advantages, mu epochs of the clipped surrogate (+ k3 KL to the
frozen reference when beta > 0) over micro-batches with whole-batch loss normalisation, then one
tool step on lambda_tool * L_tool.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from grto_cli.core.data.images import load_rgb
from grto_cli.core.data.records import Record
from grto_cli.core.grpo import group_advantages, policy_loss
from grto_cli.core.grto import freeze_image_encoder, rollout_weights, tool_loss, tool_optimizer
from grto_cli.core.inference import predict_records
from grto_cli.core.io import atomic_dir, write_json
from grto_cli.core.metrics import SegmentationMeter
from grto_cli.core.policy import Policy
from grto_cli.core.rewards import RewardWeights
from grto_cli.core.rollout import RolloutBatch, SamplingParams, rollout_group, rollout_logprobs
from grto_cli.core.system import POLICY_DIR, TOOL_DIR
from grto_cli.core.tool import SamTool, save_sam

METHODS = ("grpo", "grto", "b-grto")
LOSS_MODES = ("sequence_mean", "token_mean", "dr_grpo")
SUMMED_STATS = {"loss", "policy_loss"}


@dataclass
class LoraParams:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class RLConfig:
    method: str = "b-grto"
    steps: int = 100
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
    eval_every: int = 25  # on val; the best val checkpoint becomes the output
    eval_limit: int | None = None
    eval_batch_size: int = 50
    checkpoint_every: int = 10
    seed: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"unknown loss_mode {self.loss_mode!r}; expected one of {LOSS_MODES}")
        if self.sampling.top_p != 1.0:
            raise ValueError("sampling.top_p must be 1.0: training log-probs do not reproduce a top-p filter")

    def resume_key(self) -> dict:
        """What must match for a checkpoint to be resumed: everything but the run length and the
        logging/evaluation cadence (so a finished run can be extended by raising `steps`)."""
        d = asdict(self)
        for k in ("steps", "eval_every", "eval_limit", "eval_batch_size", "checkpoint_every"):
            d.pop(k)
        return d


@dataclass
class TrainState:
    step: int = 0  # steps completed
    best_val_giou: float | None = None
    best_step: int | None = None
    resumed_from: int | None = None


StepLog = Callable[[int, dict], None]


class Trainer:
    def __init__(self, cfg: RLConfig, policy: Policy, tool: SamTool, train_records: list[Record],
                 val_records: list[Record], root: Path, require_think: bool = False):
        cfg.validate()
        self.cfg, self.policy, self.tool = cfg, policy, tool
        self.train_records, self.val_records, self.root = train_records, val_records, root
        self.require_think = require_think
        self.state = TrainState()
        if cfg.lora is not None:
            self._wrap_lora(cfg.lora)
        self.reference = self._reference_model() if cfg.beta > 0 else None
        self.train_tool = cfg.method in ("grto", "b-grto")
        freeze_image_encoder(tool)
        if not self.train_tool:
            tool.sam.requires_grad_(False)
        self.policy_opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad],
                                            lr=cfg.policy_lr, weight_decay=0.0)
        self.tool_opt = tool_optimizer(tool, cfg.tool_lr) if self.train_tool else None
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- setup ---------------------------------------------------------------------------------

    def _wrap_lora(self, lora: LoraParams) -> None:
        from peft import LoraConfig, get_peft_model

        # Vision tower stays frozen: LoRA goes on the language model's projections only.
        targets = rf".*language_model.*\.({'|'.join(lora.target_modules)})$"
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
        self.policy.model = get_peft_model(self.policy.model, config)

    def _reference_model(self):
        if self.cfg.lora is not None:
            return None  # the same model with adapters disabled (see _reference_logprobs)
        ref = copy.deepcopy(self.policy.model).eval()
        ref.requires_grad_(False)
        return ref

    # -- one step ------------------------------------------------------------------------------

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
        records = self._batch_records(step)
        loaded = [self._load(r) for r in records]
        return rollout_group(self.policy, self.tool, records, [im for im, _ in loaded], [m for _, m in loaded],
                             self.cfg.sampling, self.cfg.rewards, self.require_think,
                             image_keys=[str(r.image_path(self.root)) for r in records])

    @torch.no_grad()
    def _logprobs_no_grad(self, model, batch: RolloutBatch) -> torch.Tensor:
        T = self.cfg.sampling.temperature
        n = batch.completion_ids.shape[0]
        return torch.cat([rollout_logprobs(model, batch, slice(s, s + self.cfg.micro_batch), T)
                          for s in range(0, n, self.cfg.micro_batch)])

    def _reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor | None:
        if self.cfg.beta == 0:
            return None  # no reference pass at all
        if self.reference is not None:
            return self._logprobs_no_grad(self.reference, batch)
        with self.policy.model.disable_adapter():
            return self._logprobs_no_grad(self.policy.model, batch)

    def policy_update(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict:
        cfg = self.cfg
        model = self.policy.model
        model.train()
        mask = batch.completion_mask
        n = mask.shape[0]
        # The sampling policy's log-probs: with mu == 1 the first (only) epoch's own log-probs,
        # detached, are exactly these, so the extra forward pass is skipped.
        old_logp = self._logprobs_no_grad(model, batch) if cfg.mu > 1 else None
        ref_logp = self._reference_logprobs(batch)
        normaliser = {"token_mean": float(mask.sum()), "sequence_mean": float(n),
                      "dr_grpo": float(n * cfg.sampling.max_new_tokens)}[cfg.loss_mode]
        totals: dict[str, float] = {}
        for _ in range(cfg.mu):
            self.policy_opt.zero_grad()
            for s in range(0, n, cfg.micro_batch):
                rows = slice(s, s + cfg.micro_batch)
                logp = rollout_logprobs(model, batch, rows, cfg.sampling.temperature)
                old = old_logp[rows] if old_logp is not None else logp.detach()
                out = policy_loss(logp, old, advantages[rows].to(logp.device), mask[rows],
                                  ref_logp[rows] if ref_logp is not None else None, cfg.beta,
                                  cfg.clip_low, cfg.clip_high, cfg.loss_mode, normaliser)
                out.loss.backward()
                # Losses are already this micro-batch's share of the whole-batch loss (whole-batch
                # normaliser), so they add up; per-token means are weighted by token share.
                share = float(mask[rows].sum()) / max(float(mask.sum()), 1.0)
                for k, v in out.stats.items():
                    totals[k] = totals.get(k, 0.0) + (v if k in SUMMED_STATS else v * share) / cfg.mu
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.max_grad_norm)
            self.policy_opt.step()
        totals["grad_norm"] = float(grad_norm)
        return totals

    def tool_update(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict:
        if not self.train_tool:
            return {}
        weights = rollout_weights(advantages, batch.group_size, self.cfg.tool_weighting)
        calls = [batch.group_calls(i) for i in range(len(batch.records))]
        loss, n_valid = tool_loss(self.tool, batch.embeddings, calls, batch.targets, self.cfg.tool_loss, weights)
        self.tool_opt.zero_grad()
        (self.cfg.lambda_tool * loss).backward()
        torch.nn.utils.clip_grad_norm_(self.tool_opt.param_groups[0]["params"], self.cfg.max_grad_norm)
        self.tool_opt.step()
        return {"tool_loss": loss.item(), "tool_valid_rollouts": n_valid}

    def step(self) -> dict:
        step = self.state.step
        torch.manual_seed(self.cfg.seed * 1_000_003 + step)  # sampling noise is a function of (seed, step)
        batch = self.rollouts(step)
        rewards = batch.rewards
        advantages, zero_std = group_advantages(rewards.total, batch.group_size, self.cfg.scale_by_std)
        metrics = {"reward_mean": rewards.total.mean().item(), "reward_std": rewards.total.std().item(),
                   "format_rate": rewards.format_ok.float().mean().item(), "iou": rewards.iou.mean().item(),
                   "zero_std_groups": zero_std,
                   "completion_tokens": batch.completion_mask.sum(1).float().mean().item()}
        metrics.update(self.policy_update(batch, advantages))
        metrics.update(self.tool_update(batch, advantages))
        self.state.step += 1
        return metrics

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_val(self) -> dict:
        records = self.val_records[:self.cfg.eval_limit] if self.cfg.eval_limit else self.val_records
        meter = SegmentationMeter()
        self.policy.model.eval()
        for pred in predict_records(self.policy, self.tool, records, self.root, self.cfg.eval_batch_size,
                                    self.cfg.sampling.max_new_tokens, self.require_think):
            meter.add(pred.mask, pred.record.decode_mask(), pred.parsed.format_ok)
        s = meter.summary()
        return {"val_giou": s["giou"], "val_ciou": s["ciou"], "val_format_rate": s["format_rate"]}

    # -- checkpoints ---------------------------------------------------------------------------

    def save_system(self, out: Path) -> None:
        """policy/ + tool/ in the checkpoint layout every stage reads."""
        save_policy(self.policy, out / POLICY_DIR)
        save_sam(self.tool.sam, self.tool.arch, out / TOOL_DIR)

    def save_checkpoint(self, directory: Path) -> None:
        """Everything a killed run needs to go on, swapped in atomically."""
        with atomic_dir(directory) as tmp:
            self.save_system(tmp)
            torch.save({"policy": self.policy_opt.state_dict(),
                        "tool": self.tool_opt.state_dict() if self.tool_opt else None}, tmp / "optim.pt")
            torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
            write_json(tmp / "rng.json", {"numpy": _jsonable(np.random.get_state()),
                                          "python": _jsonable(random.getstate())})
            write_json(tmp / "state.json", {"state": asdict(self.state), "resume_key": self.cfg.resume_key()})

    def load_checkpoint(self, directory: Path) -> None:
        from grto_cli.core.tool import load_sam

        sam, _ = load_sam(directory / TOOL_DIR)
        self.tool.sam.load_state_dict(sam.state_dict())
        load_policy_weights(self.policy, directory / POLICY_DIR)
        optim = torch.load(directory / "optim.pt", map_location="cpu", weights_only=True)
        self.policy_opt.load_state_dict(optim["policy"])
        if self.tool_opt is not None and optim["tool"] is not None:
            self.tool_opt.load_state_dict(optim["tool"])
        torch.set_rng_state(torch.load(directory / "rng.pt", weights_only=True)["torch"])
        rng = json.loads((directory / "rng.json").read_text())
        np.random.set_state(_unjson_numpy(rng["numpy"]))
        random.setstate(_unjson_python(rng["python"]))
        saved = json.loads((directory / "state.json").read_text())
        self.state = TrainState(**saved["state"])
        self.state.resumed_from = self.state.step


def checkpoint_matches(directory: Path, cfg: RLConfig) -> bool:
    state = directory / "state.json"
    if not state.is_file():
        return False
    saved = json.loads(state.read_text())
    return json.loads(json.dumps(saved.get("resume_key"))) == json.loads(json.dumps(cfg.resume_key()))


def save_policy(policy: Policy, out: Path) -> None:
    """Model (a LoRA model saves its adapter, which from_pretrained loads onto its base) + processor."""
    policy.model.save_pretrained(out)
    policy.processor.save_pretrained(out)


def load_policy_weights(policy: Policy, directory: Path) -> None:
    model = policy.model
    if hasattr(model, "load_adapter") and hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(directory)))
        return
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(str(directory), dtype=next(model.parameters()).dtype)
    model.load_state_dict(loaded.state_dict())


def _jsonable(state):
    if isinstance(state, tuple):
        return [_jsonable(s) for s in state]
    if isinstance(state, np.ndarray):
        return {"ndarray": state.tolist(), "dtype": str(state.dtype)}
    return state


def _unjson_numpy(state):
    name, keys, pos, has_gauss, cached = state
    return (name, np.array(keys["ndarray"], dtype=keys["dtype"]), pos, has_gauss, cached)


def _unjson_python(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
