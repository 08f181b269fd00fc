"""A user's own data as JSONL: ``<raw>/<split>.jsonl``, one object per line.

Fields: ``image`` (path, relative to the JSONL's folder or absolute), ``query``, exactly one of
``mask_rle`` (COCO RLE dict, string or list counts), ``mask_png`` (path; nonzero = target) or
``polygon`` (list of flat ``[x1, y1, x2, y2, ...]`` lists, rasterised as pycocotools does);
optional ``id`` (default ``custom-<split>-<line>``) and ``meta`` (a dict kept as is).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from grto_cli.core.data.masks import decode_rle, encode_rle, mask_bbox, polygons_to_mask
from grto_cli.core.data.records import DataError, Record, SkipReport
from grto_cli.core.data.sources import (DUPLICATE_ID, EMPTY_MASK, EMPTY_QUERY, MISSING_MASK, SIZE_MISMATCH,
                                        UNREADABLE_ANNOTATION, UNREADABLE_MASK, ImageError, finish,
                                        image_size, missing_data_error, read_gray, resolved, wanted_split)

MASK_KEYS = ("mask_rle", "mask_png", "polygon")
LAYOUT = ("  <split>.jsonl   one JSON object per line, e.g.\n"
          '  {"image": "images/a.jpg", "query": "the red mug", "mask_png": "masks/a.png"}\n'
          "  with exactly one of mask_rle / mask_png / polygon; optional id, meta\n"
          "(or RAW is a single .jsonl file; options custom_manifest names the files to read)")


class _Bad(Exception):
    """An item problem; ``reason`` is the skip reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _manifests(raw: Path, options: dict) -> list[Path]:
    if raw.is_file():
        return [raw]
    names = options.get("custom_manifest")
    if names:
        paths = [raw / n for n in ([names] if isinstance(names, str) else names)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise missing_data_error("custom", missing, LAYOUT)
        return paths
    paths = sorted(p for p in raw.glob("*.jsonl") if p.is_file()) if raw.is_dir() else []
    if not paths:
        raise missing_data_error("custom", [raw / "*.jsonl"], LAYOUT)
    return paths


def _path(value: Any, folder: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise _Bad(UNREADABLE_ANNOTATION)
    p = Path(value)
    return p if p.is_absolute() else folder / p


def _polygon_mask(value: Any, height: int, width: int) -> np.ndarray:
    ok = isinstance(value, list) and value and all(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
        and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p) for p in value)
    if not ok:
        raise _Bad(UNREADABLE_ANNOTATION)
    return polygons_to_mask(value, height, width)


def _mask(obj: dict, folder: Path, height: int, width: int) -> np.ndarray:
    kinds = [k for k in MASK_KEYS if k in obj]
    if len(kinds) != 1:
        raise _Bad(UNREADABLE_ANNOTATION)
    kind = kinds[0]
    if kind == "polygon":
        return _polygon_mask(obj["polygon"], height, width)
    if kind == "mask_rle":
        try:
            mask = decode_rle(obj["mask_rle"])
        except Exception:
            raise _Bad(UNREADABLE_ANNOTATION) from None
    else:
        path = _path(obj["mask_png"], folder)
        if not path.is_file():
            raise _Bad(MISSING_MASK)
        gray = read_gray(path)
        if gray is None:
            raise _Bad(UNREADABLE_MASK)
        mask = gray != 0
    if mask.shape != (height, width):
        raise _Bad(SIZE_MISMATCH)
    return mask


def _record(obj: Any, rid: str, folder: Path, split: str) -> Record:
    if not isinstance(obj, dict):
        raise _Bad(UNREADABLE_ANNOTATION)
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise _Bad(EMPTY_QUERY)
    image = _path(obj.get("image"), folder)
    try:
        width, height = image_size(image)
    except ImageError as exc:
        raise _Bad(exc.reason) from None
    mask = _mask(obj, folder, height, width)
    if not mask.any():
        raise _Bad(EMPTY_MASK)
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return Record(id=rid, image=resolved(image), width=width, height=height, query=query.strip(),
                  mask=encode_rle(mask), bbox=mask_bbox(mask), dataset="custom", split=split, meta=dict(meta))


def _item_id(obj: Any, split: str, line_no: int) -> str:
    given = obj.get("id") if isinstance(obj, dict) else None
    return str(given) if isinstance(given, (str, int)) and str(given) else f"custom-{split}-{line_no}"


def read_manifest_file(path: Path, split: str) -> tuple[list[Record], SkipReport]:
    records: list[Record] = []
    report = SkipReport()
    seen: set[str] = set()
    folder = path.parent
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            report.skip(f"custom-{split}-{line_no}", UNREADABLE_ANNOTATION)
            continue
        rid = _item_id(obj, split, line_no)
        if rid in seen:
            report.skip(rid, DUPLICATE_ID)
            continue
        seen.add(rid)
        try:
            records.append(_record(obj, rid, folder, split))
        except _Bad as bad:
            report.skip(rid, bad.reason)
    return finish(records, report)


def read_custom(raw: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    """Read each ``<split>.jsonl`` under ``raw`` (the split is the file's stem)."""
    raw = Path(raw)
    if not raw.exists():
        raise missing_data_error("custom", [raw], LAYOUT)
    out = {}
    for path in _manifests(raw, options):
        split = path.stem
        if split in out:
            raise DataError(f"custom: two manifests give split {split!r}; split names come from file stems")
        if wanted_split(split, options):
            out[split] = read_manifest_file(path, split)
    return out
