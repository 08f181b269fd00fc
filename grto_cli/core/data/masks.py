"""Binary masks as COCO RLE (pycocotools), the one mask encoding every manifest uses."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils

Rle = dict  # {"size": [h, w], "counts": str}


def encode_rle(mask: np.ndarray) -> Rle:
    """Encode an HxW boolean/0-1 mask as a JSON-serialisable compressed RLE."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: Rle) -> np.ndarray:
    """Decode a compressed (string counts) or uncompressed (list counts) RLE to an HxW bool mask."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("RLE must be a dict with 'size' and 'counts'")
    h, w = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        if sum(counts) != h * w:
            raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected {h * w}")
        compressed = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    elif isinstance(counts, (str, bytes)):
        compressed = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"RLE counts must be a string or a list, got {type(counts).__name__}")
    decoded = mask_utils.decode(compressed)
    if decoded.shape != (h, w):
        raise ValueError(f"RLE decodes to {decoded.shape}, expected {(h, w)}")
    return decoded.astype(bool)


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO-style flat polygons [x1, y1, x2, y2, ...] exactly as pycocotools does."""
    polys = [list(map(float, p)) for p in polygons if len(p) >= 6]
    if not polys:
        return np.zeros((height, width), dtype=bool)
    rles = mask_utils.frPyObjects(polys, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def mask_bbox(mask: np.ndarray) -> list[float]:
    """Tight box [x1, y1, x2, y2] in pixel-edge coordinates (x2 = last column + 1)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """A point well inside the mask: its centroid when that lies on the mask, else the nearest mask pixel."""
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    i = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
    return float(xs[i]) + 0.5, float(ys[i]) + 0.5
