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
from grto_cli.core.tool import Tool, seg_loss

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
    """The tiny SAM's warm-up on ground-truth prompts (params.yaml ``pretrain.sam``)."""

    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    box_jitter: float = 0.1
    loss: str = "dice_bce"


def warm_up(module: torch.nn.Module, steps: int, lr: float, warmup: int, loss_at: Callable[[int], torch.Tensor],
            stat: str, max_grad_norm: float | None = None, on_step: StepCallback | None = None) -> dict:
    """The loop both warm-ups share: AdamW (weight decay 0.01) on every weight of ``module``, linear
    warm-up then cosine decay, one ``loss_at(step)`` per step (clipped to ``max_grad_norm`` when
    given); returns the last step's ``{stat: loss}``."""
    optim = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01)
    sched = warmup_cosine(optim, warmup, steps)
    last = {}
    for step in range(steps):
        loss = loss_at(step)
        optim.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)
        optim.step()
        sched.step()
        last = {stat: loss.item()}
        if on_step:
            on_step(step, last)
    return last


def train_sam(tool: Tool, records: list[Record], root: Path, cfg: SamTrainConfig, seed: int,
              on_step: StepCallback | None = None) -> dict:
    """Train the whole tiny tool (SAM or SAM2, encoder included: it starts from random) on ground-truth prompts."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = tool.module.train()
    images = {}

    def loss_at(step: int) -> torch.Tensor:
        batch = [records[int(i)] for i in rng.integers(len(records), size=cfg.batch_size)]
        for r in batch:
            if r.id not in images:
                images[r.id] = (load_rgb(r.image_path(root)), r.decode_mask())
        embeddings = tool.encode_trainable([images[r.id][0] for r in batch])  # len(batch) images
        losses = []
        for i, r in enumerate(batch):
            mask = images[r.id][1]
            call = gt_prompt(r, mask, rng, cfg.box_jitter)
            logits = tool.decode(embeddings[i:i + 1], [call], mask.shape)
            losses.append(seg_loss(logits, torch.as_tensor(mask)[None], cfg.loss))
        return torch.cat(losses).mean()

    last = warm_up(model, cfg.steps, cfg.lr, max(1, cfg.steps // 10), loss_at, TOOL_LOSS, on_step=on_step)
    model.eval()
    return last


@dataclass
class PolicySftConfig:
    """The tiny VLM's supervised warm-up on formatted ground-truth answers (params.yaml
    ``pretrain.sft``): it learns the answer format and rough coordinates, RL does the rest."""

    steps: int = 800
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 50
    # Distance-aware labels on coordinate tokens: a share ``coord_mix`` of each coordinate's target
    # goes to the other coordinate tokens by a Gaussian of width ``coord_sigma`` (in coordinate
    # units), so an answer one pixel off earns more than one forty pixels off. 0: plain cross-entropy.
    coord_sigma: float = 0.0
    coord_mix: float = 0.5


def coordinate_tokens(tokenizer) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
    """Token ids that spell a whole coordinate, by whether they carry a leading space (byte-level
    BPE's "Ġ"): {space: (ids, values)}. "012", "²" and fragments are not coordinates."""
    groups: dict[bool, tuple[list[int], list[int]]] = {False: ([], []), True: ([], [])}
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):  # by id: a fixed order
        space = token.startswith("Ġ")
        core = token[1:] if space else token
        if core.isascii() and core.isdigit() and (core == "0" or not core.startswith("0")):
            groups[space][0].append(i)
            groups[space][1].append(int(core))
    return {space: (torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float32))
            for space, (ids, values) in groups.items()}


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, coords: dict[bool, tuple[torch.Tensor, torch.Tensor]],
             sigma: float = 0.0, mix: float = 0.5) -> torch.Tensor:
    """Mean next-token loss over the labelled positions (labels -100 elsewhere), as the model's own
    loss computes it, with distance-aware targets on coordinate tokens when ``sigma > 0``:
    target = (1 - mix) * one-hot + mix * Gaussian(values; target value, sigma) over the coordinate
    tokens of the same spelling (with or without a leading space)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    logp = torch.log_softmax(logits[keep].float(), dim=-1)  # (T, V)
    targets = labels[keep]  # (T,)
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)  # (T,)
    if sigma <= 0:
        return nll.mean()
    loss = nll.clone()
    for ids, values in coords.values():
        if len(ids) == 0:
            continue
        ids, values = ids.to(targets.device), values.to(targets.device)
        hit = (targets[:, None] == ids[None]).nonzero()  # (n, 2): position, index into ids
        if len(hit) == 0:
            continue
        rows, which = hit[:, 0], hit[:, 1]
        weights = torch.softmax(-(values[None] - values[which][:, None]) ** 2 / (2 * sigma ** 2), dim=-1)  # (n, K)
        soft = -(weights * logp[rows][:, ids]).sum(-1)  # (n,)
        loss[rows] = (1 - mix) * nll[rows] + mix * soft
    return loss.mean()


def sft_answer(policy: Policy, record: Record, mask: np.ndarray, resized: tuple[int, int]) -> str:
    return format_answer(record.bbox, interior_point(mask), (record.height, record.width), resized,
                         policy.coord_convention)


def train_policy_sft(policy: Policy, records: list[Record], root: Path, cfg: PolicySftConfig, seed: int,
                     on_step: StepCallback | None = None) -> dict:
    """Supervised warm-up on ground-truth answers; loss on answer tokens (and EOS) only."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = policy.model.train()
    coords = coordinate_tokens(policy.tokenizer)
    cache: dict[str, tuple] = {}

    def loss_at(step: int) -> torch.Tensor:
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
        return sft_loss(model(**inputs).logits, labels, coords, cfg.coord_sigma, cfg.coord_mix)

    last = warm_up(model, cfg.steps, cfg.lr, cfg.warmup, loss_at, SFT_LOSS, max_grad_norm=1.0, on_step=on_step)
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
