"""Policy -> parse -> tool -> mask, batched: what evaluate and predict run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from grto_cli.core.answer import ParsedAnswer, ToolCall, parse_answer
from grto_cli.core.data.images import load_rgb
from grto_cli.core.data.masks import interior_point
from grto_cli.core.data.records import Record
from grto_cli.core.distributed import Processes
from grto_cli.core.policy import (Generating, Policy, decode_completions, encode_prompts, generate, resized_sizes,
                                  sampling_config)
from grto_cli.core.tool import Tool


@dataclass
class Prediction:
    record: Record
    completion: str
    parsed: ParsedAnswer
    probability: np.ndarray  # HxW float32 in [0, 1]; all zeros for an unparsable answer
    oracle: np.ndarray | None = None  # HxW bool: the tool on the ground-truth prompt (when asked for)

    @property
    def mask(self) -> np.ndarray:
        return self.probability > 0.5


def oracle_call(record: Record) -> ToolCall | None:
    """The prompt a perfect policy would give: the target's box and a point well inside it; no
    prompt at all (an empty mask) for an empty target."""
    if record.empty_target:
        return None
    return ToolCall(box=tuple(record.bbox), points=(interior_point(record.decode_mask()),))


@torch.no_grad()
def predict_batch(policy: Policy, tool: Tool, images: Sequence[np.ndarray], queries: Sequence[str],
                  max_new_tokens: int, require_think: bool = False,
                  oracle_calls: Sequence[ToolCall] | None = None, generating: Generating | None = None
                  ) -> list[tuple[str, ParsedAnswer, np.ndarray, np.ndarray | None]]:
    """Greedy answers and masks for a batch of (image, query) pairs: (text, parsed, probability,
    oracle mask). With ``oracle_calls``, the tool also decodes those prompts on the same embeddings."""
    batch = encode_prompts(policy, [Image.fromarray(im) for im in images], queries)
    completion_ids, _ = generate(policy, batch, sampling_config(policy, max_new_tokens), generating=generating)
    texts = decode_completions(policy, completion_ids)
    out = []
    embeddings = tool.embed(images)
    for i, (image, text, resized) in enumerate(zip(images, texts, resized_sizes(policy, batch))):
        size = image.shape[:2]
        parsed = parse_answer(text, size, resized, policy.coord_convention, require_think)
        logits = tool.decode(embeddings[i:i + 1], [parsed.call], size)[0]
        prob = torch.sigmoid(logits).float().cpu().numpy() if parsed.call else np.zeros(size, np.float32)
        oracle = None
        if oracle_calls is not None:
            oracle = (tool.decode(embeddings[i:i + 1], [oracle_calls[i]], size)[0] > 0).cpu().numpy()
        out.append((text, parsed, prob, oracle))
    return out


def predict_records(policy: Policy, tool: Tool, records: Sequence[Record], root: Path, batch_size: int,
                    max_new_tokens: int, require_think: bool = False, oracle: bool = False,
                    processes: Processes | None = None, generating: Generating | None = None) -> Iterator[Prediction]:
    """Predictions in record order; ``oracle`` adds the tool's mask on each record's ground-truth prompt.
    Over several processes, each predicts every world_size-th batch and every process receives
    all predictions in order (a batch is the same batch as in one process, so the same answers)."""
    def batch(chunk: Sequence[Record], start: int) -> list[Prediction]:
        images = [load_rgb(r.image_path(root)) for r in chunk]
        oracle_calls = [oracle_call(r) for r in chunk] if oracle else None
        return [Prediction(record=r, completion=text, parsed=parsed, probability=prob, oracle=oracle_mask)
                for r, (text, parsed, prob, oracle_mask) in zip(chunk, predict_batch(
                    policy, tool, images, [r.query for r in chunk], max_new_tokens, require_think, oracle_calls,
                    generating))]

    yield from (processes or Processes()).in_batches(records, batch_size, batch)
