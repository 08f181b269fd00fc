"""Train the embedded default's tiny base models to the point a pretrained model starts from.

The SAM learns from prompts derived from ground truth (jittered boxes, points inside the mask);
the policy gets a short supervised warm-up so it emits the answer format and localises roughly,
leaving headroom for RL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from grto_cli.core.answer import ToolCall, format_answer
from grto_cli.core.data.images import load_rgb
from grto_cli.core.data.masks import interior_point
from grto_cli.core.data.records import Record
from grto_cli.core.metrics import SFT_LOSS, TOOL_LOSS
from grto_cli.core.policy import Policy, encode_prompts, resized_sizes
from grto_cli.core.tool import SamTool, seg_loss

StepCallback = Callable[[int, dict], None]


def warmup_cosine(optim: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optim, factor)


def jittered_box(box: Sequence[float], rng: np.random.Generator, jitter: float, size: tuple[int, int]) -> tuple:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    noise = rng.normal(0.0, jitter, 4) * np.array([w, h, w, h])
    x1, y1, x2, y2 = np.array(box) + noise
    H, W = size
    x1, x2 = sorted((float(np.clip(x1, 0, W)), float(np.clip(x2, 0, W))))
    y1, y2 = sorted((float(np.clip(y1, 0, H)), float(np.clip(y2, 0, H))))
    return (x1, y1, max(x2, x1 + 1), max(y2, y1 + 1))


def gt_prompt(record: Record, mask: np.ndarray, rng: np.random.Generator, jitter: float) -> ToolCall:
    """A prompt a good policy could emit: jittered box, a random interior point, or both."""
    ys, xs = np.nonzero(mask)
    k = int(rng.integers(len(xs)))
    point = ((float(xs[k]) + 0.5, float(ys[k]) + 0.5),)
    box = jittered_box(record.bbox, rng, jitter, mask.shape)
    choice = rng.random()
    if choice < 0.2:
        return ToolCall(box=None, points=point)
    if choice < 0.5:
        return ToolCall(box=box, points=())
    return ToolCall(box=box, points=point)


@dataclass
class SamTrainConfig:
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    box_jitter: float = 0.1
    loss: str = "dice_bce"


def train_sam(tool: SamTool, records: list[Record], root: Path, cfg: SamTrainConfig, seed: int,
              on_step: StepCallback | None = None) -> dict:
    """Train the whole tiny SAM (encoder included: it starts from random) on ground-truth prompts."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    sam = tool.sam.train()
    optim = torch.optim.AdamW(sam.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = warmup_cosine(optim, max(1, cfg.steps // 10), cfg.steps)
    images = {}
    last = {}
    for step in range(cfg.steps):
        batch = [records[int(i)] for i in rng.integers(len(records), size=cfg.batch_size)]
        for r in batch:
            if r.id not in images:
                images[r.id] = (load_rgb(r.image_path(root)), r.decode_mask())
        pixels = torch.cat([tool.preprocess(images[r.id][0]) for r in batch])
        embeddings = sam.image_encoder(pixels)
        losses = []
        for i, r in enumerate(batch):
            mask = images[r.id][1]
            call = gt_prompt(r, mask, rng, cfg.box_jitter)
            logits = tool.decode(embeddings[i:i + 1], [call], mask.shape)
            losses.append(seg_loss(logits, torch.as_tensor(mask)[None], cfg.loss))
        loss = torch.cat(losses).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
        last = {TOOL_LOSS: loss.item()}
        if on_step:
            on_step(step, last)
    sam.eval()
    return last


@dataclass
class PolicySftConfig:
    steps: int = 800
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 50


def sft_answer(policy: Policy, record: Record, mask: np.ndarray, resized: tuple[int, int]) -> str:
    return format_answer(record.bbox, interior_point(mask), (record.height, record.width), resized,
                         policy.coord_convention)


def train_policy_sft(policy: Policy, records: list[Record], root: Path, cfg: PolicySftConfig, seed: int,
                     on_step: StepCallback | None = None) -> dict:
    """Supervised warm-up on ground-truth answers; loss on answer tokens (and EOS) only."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = policy.model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = warmup_cosine(optim, cfg.warmup, cfg.steps)
    cache: dict[str, tuple] = {}
    last = {}
    for step in range(cfg.steps):
        batch = [records[int(i)] for i in rng.integers(len(records), size=cfg.batch_size)]
        for r in batch:
            if r.id not in cache:
                cache[r.id] = (load_rgb(r.image_path(root), pil=True), r.decode_mask())
        images = [cache[r.id][0] for r in batch]
        prompt_only = encode_prompts(policy, images, [r.query for r in batch])
        resized = resized_sizes(policy, prompt_only)
        answers = [sft_answer(policy, r, cache[r.id][1], size) for r, size in zip(batch, resized)]
        inputs = encode_prompts(policy, images, [r.query for r in batch], answers=answers)
        labels = _answer_labels(inputs, prompt_only)
        out = model(**inputs, labels=labels)
        optim.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        last = {SFT_LOSS: out.loss.item()}
        if on_step:
            on_step(step, last)
    model.eval()
    return last


def _answer_labels(full: dict, prompt_only: dict) -> torch.Tensor:
    """Labels that keep only the answer tokens: with left padding they are each row's last
    (full length - prompt length) tokens."""
    full_len = full["attention_mask"].sum(1)
    prompt_len = prompt_only["attention_mask"].sum(1)
    width = full["input_ids"].shape[1]
    positions = torch.arange(width, device=full_len.device)[None]
    keep = positions >= (width - (full_len - prompt_len))[:, None]
    return torch.where(keep, full["input_ids"], torch.full_like(full["input_ids"], -100))
