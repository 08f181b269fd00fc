"""Custom JSONL reader: each mask kind, relative/absolute paths, bad lines skipped by id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from grto_cli.core.data.masks import decode_rle
from grto_cli.core.data.records import DataError, validate_record
from grto_cli.core.data.sources import read_source

W, H = 32, 24


def _target() -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[3:15, 4:20] = 1
    m[18:22, 25:30] = 1
    return m


def _compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def _uncompressed(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [H, W], "counts": counts}


POLYGON = [[2, 2, 20, 2, 20, 12, 2, 12], [22.5, 14, 30, 14, 30, 22, 22.5, 22]]


def make_custom(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "images" / "a.jpg")
    Image.fromarray((_target() * 200).astype(np.uint8)).save(root / "masks" / "a.png")
    absolute = str((root / "images" / "a.jpg").resolve())
    rows = [
        {"id": "rle-str", "image": "images/a.jpg", "query": "the blocks", "mask_rle": _compressed(_target())},
        {"id": "rle-list", "image": absolute, "query": "the blocks again", "mask_rle": _uncompressed(_target()),
         "meta": {"source": "me"}},
        {"image": "images/a.jpg", "query": "from a png", "mask_png": "masks/a.png"},
        {"id": "poly", "image": "images/a.jpg", "query": "two squares", "polygon": POLYGON},
        "",
        {"id": "two-kinds", "image": "images/a.jpg", "query": "x", "polygon": POLYGON, "mask_png": "masks/a.png"},
        {"id": "no-image", "image": "images/missing.jpg", "query": "x", "polygon": POLYGON},
        {"id": "no-query", "image": "images/a.jpg", "query": "  ", "polygon": POLYGON},
        {"id": "poly", "image": "images/a.jpg", "query": "dup", "polygon": POLYGON},
        {"id": "wrong-size", "image": "images/a.jpg", "query": "x",
         "mask_rle": {"size": [5, 5], "counts": [0, 25]}},
        {"id": "no-png", "image": "images/a.jpg", "query": "x", "mask_png": "masks/nothing.png"},
    ]
    lines = [json.dumps(r) if isinstance(r, dict) else r for r in rows] + ["{broken json"]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "val.jsonl").write_text(json.dumps(rows[0]) + "\n")
    return root


def test_each_mask_kind(tmp_path: Path) -> None:
    root = make_custom(tmp_path)
    out = read_source("custom", root, {})
    assert list(out) == ["train", "val"]
    records, report = out["train"]
    by_id = {r.id: r for r in records}
    assert list(by_id) == ["rle-str", "rle-list", "custom-train-3", "poly"]
    target = _target().astype(bool)
    for rid in ("rle-str", "rle-list", "custom-train-3"):
        assert np.array_equal(decode_rle(by_id[rid].mask), target), rid
    expected_poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(POLYGON, H, W))).astype(bool)
    assert np.array_equal(decode_rle(by_id["poly"].mask), expected_poly)
    assert expected_poly[5, 5] and expected_poly[18, 26] and not expected_poly[13, 21]
    assert by_id["rle-list"].meta == {"source": "me"}
    for rec in records:
        assert rec.image == str((root / "images" / "a.jpg").resolve())
        assert (rec.width, rec.height) == (W, H) and rec.dataset == "custom" and rec.split == "train"
        assert validate_record(rec, root) is None
    assert report.kept == 4
    assert report.skipped == {
        "unreadable annotation": ["two-kinds", "custom-train-12"],
        "missing image": ["no-image"],
        "empty query": ["no-query"],
        "duplicate id": ["poly"],
        "size mismatch": ["wrong-size"],
        "missing mask": ["no-png"],
    }


def test_manifest_selection(tmp_path: Path) -> None:
    root = make_custom(tmp_path)
    assert list(read_source("custom", root, {"custom_manifest": "val.jsonl"})) == ["val"]
    assert list(read_source("custom", root / "val.jsonl", {})) == ["val"]
    assert list(read_source("custom", root, {"splits": ["val"]})) == ["val"]


def test_missing_raw_names_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        read_source("custom", tmp_path, {})
    msg = str(err.value)
    assert str(tmp_path / "*.jsonl") in msg and "expected layout under RAW:" in msg
    assert "<split>.jsonl" in msg and "mask_rle / mask_png / polygon" in msg
    with pytest.raises(DataError, match="other.jsonl"):
        read_source("custom", tmp_path, {"custom_manifest": ["other.jsonl"]})
