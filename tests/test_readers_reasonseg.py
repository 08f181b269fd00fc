"""ReasonSeg reader: LISA layout, LISA's rasterisation, ignore regions, query kinds."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from grto_cli.core.data.masks import decode_rle
from grto_cli.core.data.records import DataError, validate_record
from grto_cli.core.data.sources import read_source

W, H = 96, 72
TARGET = [[10.7, 8.2], [80.9, 12.5], [70.4, 60.6], [15.3, 55.1]]
IGNORE = [[30.5, 25.5], [50.2, 25.9], [50.8, 40.4], [30.1, 40.7]]  # inside TARGET, smaller
FLAG = [[0, 0], [95, 0], [95, 71], [0, 71]]  # deprecated: must not count at all


def _image(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def _json(path: Path, texts: list[str], is_sentence: bool, shapes: list[dict]) -> None:
    path.write_text(json.dumps({"text": texts, "is_sentence": is_sentence, "shapes": shapes}))


def _shape(label: str, points: list) -> dict:
    return {"label": label, "points": points, "shape_type": "polygon", "group_id": None, "flags": {}}


def _raster(points: list) -> np.ndarray:
    """Direct cv2 rasterisation of one polygon, outline included, on int32 points."""
    out = np.zeros((H, W), dtype=np.uint8)
    pts = np.array([points], dtype=np.int32)
    cv2.polylines(out, pts, True, 1, 1)
    cv2.fillPoly(out, pts, 1)
    return out.astype(bool)


def make_reasonseg(root: Path) -> Path:
    base = root / "ReasonSeg"
    for split in ("train", "val"):
        (base / split).mkdir(parents=True)
    _image(base / "train" / "cat_01.jpg")
    _json(base / "train" / "cat_01.json", ["the cat", "furry animal"], False,
          # ignore listed first: LISA draws larger shapes first, so it still ends up on top
          [_shape("Ignore", IGNORE), _shape("flag", FLAG), _shape("target", TARGET)])
    _image(base / "train" / "dog_02.jpg", seed=1)
    _json(base / "train" / "dog_02.json", ["What would guard a house at night?"], True,
          [_shape("target", TARGET)])
    _json(base / "val" / "lost_03.json", ["no image here"], False, [_shape("target", TARGET)])
    _image(base / "val" / "blank_04.jpg", seed=2)
    _json(base / "val" / "blank_04.json", ["only ignore"], False, [_shape("ignore", IGNORE)])
    _image(base / "val" / "noann_05.jpg", seed=3)
    (base / "val" / ".DS_Store").write_bytes(b"\x00\x01")
    return base


def test_masks_follow_lisa_rasterisation_with_ignore(tmp_path: Path) -> None:
    base = make_reasonseg(tmp_path)
    out = read_source("reasonseg", tmp_path, {})
    assert list(out) == ["train", "val"]
    train, report = out["train"]
    assert [r.id for r in train] == ["reasonseg-train-cat_01-0", "reasonseg-train-cat_01-1",
                                     "reasonseg-train-dog_02-0"]
    assert report.n_skipped == 0 and report.kept == 3
    cat = train[0]
    target, ignore = _raster(TARGET), _raster(IGNORE)
    assert np.array_equal(decode_rle(cat.mask), target & ~ignore)
    assert np.array_equal(decode_rle(cat.meta["ignore"]), ignore)
    # LISA truncates the vertex (10.7, 8.2) to (10, 8); rounding would start at column 11.
    assert decode_rle(cat.mask)[8, 10] and not decode_rle(cat.mask)[8, 9]
    assert (cat.width, cat.height) == (W, H)
    assert cat.query == "the cat" and train[1].query == "furry animal"
    assert cat.meta["is_sentence"] is False and cat.meta["query_index"] == 0
    assert Path(cat.image) == (base / "train" / "cat_01.jpg").resolve()
    assert validate_record(cat, tmp_path) is None
    dog = train[2]
    assert np.array_equal(decode_rle(dog.mask), target) and "ignore" not in dog.meta


def test_bad_items_are_skipped_and_counted(tmp_path: Path) -> None:
    make_reasonseg(tmp_path)
    _, report = read_source("reasonseg", tmp_path, {})["val"]
    assert report.kept == 0
    assert report.skipped == {"missing image": ["reasonseg-val-lost_03"],
                              "empty mask": ["reasonseg-val-blank_04-0"],
                              "missing annotation": ["reasonseg-val-noann_05"]}


def test_unreadable_json_and_corrupt_image(tmp_path: Path) -> None:
    base = make_reasonseg(tmp_path)
    (base / "train" / "dog_02.json").write_text("{not json")
    img = base / "train" / "cat_01.jpg"
    img.write_bytes(img.read_bytes()[:300])
    _, report = read_source("reasonseg", base, {"splits": ["train"]})["train"]
    assert report.skipped == {"unreadable annotation": ["reasonseg-train-dog_02"],
                              "unreadable image": ["reasonseg-train-cat_01-0", "reasonseg-train-cat_01-1"]}


@pytest.mark.parametrize("kind, expected", [
    ("short", ["reasonseg-train-cat_01-0", "reasonseg-train-cat_01-1"]),
    ("long", ["reasonseg-train-dog_02-0"]),
    ("all", ["reasonseg-train-cat_01-0", "reasonseg-train-cat_01-1", "reasonseg-train-dog_02-0"]),
])
def test_query_kind(tmp_path: Path, kind: str, expected: list[str]) -> None:
    make_reasonseg(tmp_path)
    records, _ = read_source("reasonseg", tmp_path, {"query_kind": kind, "splits": ["train"]})["train"]
    assert [r.id for r in records] == expected


def test_first_query_only(tmp_path: Path) -> None:
    make_reasonseg(tmp_path)
    records, _ = read_source("reasonseg", tmp_path, {"first_query_only": True})["train"]
    assert [r.id for r in records] == ["reasonseg-train-cat_01-0", "reasonseg-train-dog_02-0"]


def test_bad_query_kind_and_missing_raw(tmp_path: Path) -> None:
    make_reasonseg(tmp_path)
    with pytest.raises(DataError, match="query_kind"):
        read_source("reasonseg", tmp_path, {"query_kind": "medium"})
    with pytest.raises(DataError) as err:
        read_source("reasonseg", tmp_path / "empty", {})
    msg = str(err.value)
    assert str(tmp_path / "empty") in msg and "expected layout under RAW:" in msg
    assert "train/<name>.jpg + train/<name>.json" in msg
