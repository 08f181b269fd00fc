"""A PNG sheet of overlays: image, ground truth, prediction with the call drawn on it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from grto_cli.core.io import atomic_path
from grto_cli.core.answer import ToolCall

GT_COLOR = np.array([0, 200, 0])
PRED_COLOR = np.array([230, 0, 200])


def overlay(image: np.ndarray, mask: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * color
    return out.astype(np.uint8)


def _draw_call(tile: Image.Image, call: ToolCall | None, scale: float) -> None:
    if call is None:
        return
    draw = ImageDraw.Draw(tile)
    if call.box is not None:
        draw.rectangle([c * scale for c in call.box], outline=(255, 255, 0), width=2)
    for x, y in call.points:
        r = 3
        draw.ellipse([x * scale - r, y * scale - r, x * scale + r, y * scale + r], fill=(255, 0, 0))


def overlay_sheet(path: str | Path, rows: Sequence[dict], tile: int = 192) -> None:
    """One row per sample: image | ground truth | prediction + call, captioned with query and IoU.

    Each row dict holds ``image`` (HxWx3 uint8), ``target`` and ``pred`` (bool HxW), ``call``
    (ToolCall or None), ``caption`` (str).
    """
    caption_h = 30
    sheet = Image.new("RGB", (3 * tile, max(1, len(rows)) * (tile + caption_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        image = row["image"]
        h, w = image.shape[:2]
        scale = tile / max(h, w)
        size = (round(w * scale), round(h * scale))
        panels = [image, overlay(image, row["target"], GT_COLOR), overlay(image, row["pred"], PRED_COLOR)]
        y0 = i * (tile + caption_h)
        for j, panel in enumerate(panels):
            im = Image.fromarray(panel).resize(size, Image.NEAREST)
            if j == 2:
                _draw_call(im, row["call"], scale)
            sheet.paste(im, (j * tile, y0))
        draw.text((4, y0 + tile + 2), row["caption"][:90], fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
