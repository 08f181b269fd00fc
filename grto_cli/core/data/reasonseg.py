"""ReasonSeg in LISA's layout: ``ReasonSeg/{train,val,test}/<name>.jpg`` + ``<name>.json``.

The JSON is labelme-style: ``text`` (the queries), ``is_sentence`` (long query or short phrase)
and ``shapes`` (polygons). Masks are rasterised the way LISA's ``get_mask_from_json`` does, so
our ground truth is pixel-identical to the one the published numbers were computed on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from grto_cli.core.data.masks import encode_rle
from grto_cli.core.data.records import DataError, Record, SkipReport
from grto_cli.core.data.sources import (MISSING_ANNOTATION, MISSING_IMAGE, UNREADABLE_ANNOTATION, find_root,
                                        finish, list_files, pair_by_stem, queries_on_image, records_per_query,
                                        skip_all, wanted_split)

SPLITS = ("train", "val", "test")
IGNORE_VALUE = 255  # LISA's value for "ignored during evaluation"
LAYOUT = ("  train/<name>.jpg + train/<name>.json\n"
          "  val/<name>.jpg   + val/<name>.json\n"
          "  test/<name>.jpg  + test/<name>.json\n"
          "(RAW is LISA's ReasonSeg/ folder, or a folder holding ReasonSeg/ or reason_seg/ReasonSeg/)")
QUERY_KINDS = ("short", "long", "all")


def load_annotation(path: Path) -> dict:
    # Some ReasonSeg files are not valid UTF-8; LISA falls back to cp1252 and so do we.
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text = path.read_text(encoding="cp1252")
    return json.loads(text)


def _polygon(points: Any) -> np.ndarray:
    # LISA passes np.array([points], dtype=np.int32): coordinates truncate toward zero.
    return np.array([points], dtype=np.int32)


def lisa_label_mask(shapes: list, height: int, width: int) -> np.ndarray:
    """LISA's label map: 0 background, 1 target, 255 ignore.

    Shapes labelled "flag" are deprecated and dropped; a label containing "ignore" (any case)
    marks pixels excluded from evaluation. Larger shapes are drawn first so a smaller shape
    inside them (e.g. an ignore hole) overwrites them, exactly as LISA orders them.
    """
    areas, valid = [], []
    for shape in shapes:
        if str(shape["label"]).lower() == "flag":
            continue
        tmp = np.zeros((height, width), dtype=np.uint8)
        poly = _polygon(shape["points"])
        cv2.polylines(tmp, poly, True, 1, 1)
        cv2.fillPoly(tmp, poly, 1)
        areas.append(tmp.sum())
        valid.append(shape)
    mask = np.zeros((height, width), dtype=np.uint8)
    for index in list(np.argsort(areas)[::-1].astype(np.int32)):
        shape = valid[index]
        value = IGNORE_VALUE if "ignore" in str(shape["label"]).lower() else 1
        poly = _polygon(shape["points"])
        cv2.polylines(mask, poly, True, value, 1)
        cv2.fillPoly(mask, poly, value)
    return mask


def _parse(anno: dict) -> tuple[list[str], bool, list]:
    texts = anno["text"]
    texts = [texts] if isinstance(texts, str) else list(texts)
    is_sentence = anno["is_sentence"]
    if not isinstance(is_sentence, bool):
        raise ValueError("is_sentence must be a boolean")
    shapes = anno["shapes"]
    if not isinstance(shapes, list):
        raise ValueError("shapes must be a list")
    return texts, is_sentence, shapes


def _kind_matches(is_sentence: bool, kind: str) -> bool:
    return kind == "all" or (kind == "long") == is_sentence


def _item_records(split: str, stem: str, image: Path, ann_path: Path, options: dict,
                  report: SkipReport) -> list[Record]:
    base = f"reasonseg-{split}-{stem}"
    try:
        texts, is_sentence, shapes = _parse(load_annotation(ann_path))
    except Exception:
        report.skip(base, UNREADABLE_ANNOTATION)
        return []
    if not _kind_matches(is_sentence, options.get("query_kind", "all")):
        return []
    found = queries_on_image(base, len(texts), image, options, report)
    if found is None:
        return []
    ids, width, height = found
    try:
        label = lisa_label_mask(shapes, height, width)
    except Exception:
        skip_all(report, ids.values(), UNREADABLE_ANNOTATION)
        return []
    target, ignore = label == 1, label == IGNORE_VALUE
    meta: dict = {"is_sentence": is_sentence}
    if ignore.any():
        meta["ignore"] = encode_rle(ignore)
    return records_per_query(target, texts, ids, report, image=image, width=width, height=height,
                             dataset="reasonseg", split=split, meta=meta)


def read_split(split_dir: Path, split: str, options: dict) -> tuple[list[Record], SkipReport]:
    images = list_files(split_dir, (".jpg", ".jpeg", ".png"))
    annotations = list_files(split_dir, (".json",))
    records: list[Record] = []
    report = SkipReport()
    for stem in pair_by_stem({MISSING_ANNOTATION: annotations, MISSING_IMAGE: images}, "reasonseg", split,
                             report):
        records.extend(_item_records(split, stem, images[stem], annotations[stem], options, report))
    return finish(records, report)


def read_reasonseg(raw: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    """Read every ReasonSeg split found under ``raw``; see the module docstring for the layout."""
    kind = options.get("query_kind", "all")
    if kind not in QUERY_KINDS:
        raise DataError(f"reasonseg: query_kind must be one of {list(QUERY_KINDS)}, got {kind!r}")
    root = find_root(Path(raw), ("", "ReasonSeg", "reason_seg/ReasonSeg"),
                     lambda p: any((p / s).is_dir() for s in SPLITS), "reasonseg", LAYOUT)
    return {split: read_split(root / split, split, options)
            for split in SPLITS if (root / split).is_dir() and wanted_split(split, options)}
