"""Image loading with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from grto_cli.core.data.records import DataError


def load_rgb(path: str | Path, pil: bool = False) -> np.ndarray | Image.Image:
    """Decode an image fully as RGB; a missing or corrupt file raises DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            rgb.load()
    except Exception as exc:
        raise DataError(f"unreadable image {path}: {exc}") from exc
    return rgb if pil else np.asarray(rgb)
