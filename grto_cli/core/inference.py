"""Policy -> parse -> tool -> mask, batched: what evaluate and predict run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from grto_cli.core.data.images import load_rgb
from grto_cli.core.data.records import Record
from grto_cli.core.answer import ParsedAnswer, parse_answer
from grto_cli.core.policy import Policy, decode_completions, encode_prompts, generate, resized_sizes, sampling_config
from grto_cli.core.tool import SamTool


@dataclass
class Prediction:
    record: Record
    completion: str
    parsed: ParsedAnswer
    probability: np.ndarray  # HxW float32 in [0, 1]; all zeros for an unparsable answer

    @property
    def mask(self) -> np.ndarray:
        return self.probability > 0.5


@torch.no_grad()
def predict_batch(policy: Policy, tool: SamTool, images: Sequence[np.ndarray], queries: Sequence[str],
                  max_new_tokens: int, require_think: bool = False
                  ) -> list[tuple[str, ParsedAnswer, np.ndarray]]:
    """Greedy answers and masks for a batch of (image, query) pairs."""
    batch = encode_prompts(policy, [Image.fromarray(im) for im in images], queries)
    completion_ids, _ = generate(policy, batch, sampling_config(policy, max_new_tokens, greedy=True))
    texts = decode_completions(policy, completion_ids)
    out = []
    embeddings = tool.embed(images)
    for i, (image, text, resized) in enumerate(zip(images, texts, resized_sizes(policy, batch))):
        size = image.shape[:2]
        parsed = parse_answer(text, size, resized, policy.coord_convention, require_think)
        logits = tool.decode(embeddings[i:i + 1], [parsed.call], size)[0]
        prob = torch.sigmoid(logits).float().cpu().numpy() if parsed.call else np.zeros(size, np.float32)
        out.append((text, parsed, prob))
    return out


def predict_records(policy: Policy, tool: SamTool, records: Sequence[Record], root: Path, batch_size: int,
                    max_new_tokens: int, require_think: bool = False) -> Iterator[Prediction]:
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = [load_rgb(r.image_path(root)) for r in chunk]
        for r, (text, parsed, prob) in zip(chunk, predict_batch(policy, tool, images, [r.query for r in chunk],
                                                                max_new_tokens, require_think)):
            yield Prediction(record=r, completion=text, parsed=parsed, probability=prob)
