"""EarthReason reader: SegEarth-R1's RSReasonSeg/<split>/{images,labels,QAs} layout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grto_cli.core.data.masks import decode_rle
from grto_cli.core.data.records import DataError, validate_record
from grto_cli.core.data.sources import read_source

W, H = 48, 36


def _dirs(base: Path) -> tuple[Path, Path, Path]:
    parts = tuple(base / p for p in ("images", "labels", "QAs"))
    for p in parts:
        p.mkdir(parents=True)
    return parts  # type: ignore[return-value]


def _sample(base: Path, stem: str, label: np.ndarray | None, questions: list[str] | None,
            answer: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(base / "images" / f"{stem}.jpg")
    if label is not None:
        Image.fromarray(label).save(base / "labels" / f"{stem}.png")
    if questions is not None:
        (base / "QAs" / f"{stem}.json").write_text(json.dumps({"questions": questions, "answer": answer}))


def _label() -> np.ndarray:
    label = np.zeros((H, W), dtype=np.uint8)
    label[4:20, 6:30] = 255
    label[30, 40] = 1  # any nonzero value is target, as SegEarth-R1 reads it
    return label


def make_earthreason(root: Path) -> Path:
    base = root / "RSReasonSeg"
    train = base / "train"
    _dirs(train)
    _sample(train, "airport_1", _label(), ["Where could planes land?", "Which area serves air travel?"],
            ["The runway ..."])
    _sample(train, "desert_2", np.zeros((H, W), np.uint8), ["Where is the lake?"], [], seed=1)  # no target
    _sample(train, "farm_3", _label(), None, [], seed=2)  # no QA file
    (train / "labels" / "Thumbs.db").write_bytes(b"junk")
    # val unpacked one level deeper, as extracting val.zip into val/ gives
    _dirs(base / "val" / "val")
    _sample(base / "val" / "val", "port_4", _label(), ["Where do ships dock?"], ["The harbour."], seed=3)
    return base


def test_earthreason_reads_questions_and_masks(tmp_path: Path) -> None:
    base = make_earthreason(tmp_path)
    out = read_source("earthreason", tmp_path, {})
    assert list(out) == ["train", "val"]
    train, report = out["train"]
    assert [r.id for r in train] == ["earthreason-train-airport_1-0", "earthreason-train-airport_1-1"]
    assert [r.query for r in train] == ["Where could planes land?", "Which area serves air travel?"]
    assert np.array_equal(decode_rle(train[0].mask), _label() != 0)
    assert train[0].bbox == [6.0, 4.0, 41.0, 31.0]
    assert Path(train[0].image) == (base / "train" / "images" / "airport_1.jpg").resolve()
    assert validate_record(train[0], tmp_path) is None
    assert report.skipped == {"empty mask": ["earthreason-train-desert_2-0"],
                              "missing annotation": ["earthreason-train-farm_3"]}
    val, val_report = out["val"]
    assert [r.id for r in val] == ["earthreason-val-port_4-0"] and val_report.n_skipped == 0


def test_first_query_only_and_splits(tmp_path: Path) -> None:
    make_earthreason(tmp_path)
    out = read_source("earthreason", tmp_path / "RSReasonSeg", {"first_query_only": True, "splits": ["train"]})
    assert list(out) == ["train"]
    assert [r.id for r in out["train"][0]] == ["earthreason-train-airport_1-0"]


def test_unpaired_files_report_the_first_missing_part(tmp_path: Path) -> None:
    """A stem lacking several parts is reported once, for the first in images, labels, QAs order."""
    base = make_earthreason(tmp_path)
    train = base / "train"
    _sample(train, "beach_5", None, None, [], seed=4)  # image only: the label is missing first
    (train / "QAs" / "city_6.json").write_text(json.dumps({"questions": ["Where is downtown?"]}))  # QA only
    Image.fromarray(_label()).save(train / "labels" / "dam_7.png")  # label only
    _, report = read_source("earthreason", tmp_path, {"splits": ["train"]})["train"]
    assert report.skipped == {"empty mask": ["earthreason-train-desert_2-0"],
                              "missing mask": ["earthreason-train-beach_5"],
                              "missing image": ["earthreason-train-city_6", "earthreason-train-dam_7"],
                              "missing annotation": ["earthreason-train-farm_3"]}


def test_blank_questions_are_skipped_one_by_one(tmp_path: Path) -> None:
    base = make_earthreason(tmp_path)
    _sample(base / "train", "beach_5", _label(), ["", " Where do waves break? ", "  "], [], seed=4)
    train, report = read_source("earthreason", tmp_path, {"splits": ["train"]})["train"]
    beach = [r for r in train if r.id.startswith("earthreason-train-beach_5")]
    assert [(r.id, r.query, r.meta) for r in beach] == [
        ("earthreason-train-beach_5-1", "Where do waves break?", {"query_index": 1})]
    assert report.skipped["empty query"] == ["earthreason-train-beach_5-0", "earthreason-train-beach_5-2"]


def test_missing_raw_and_missing_part_name_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        read_source("earthreason", tmp_path, {})
    msg = str(err.value)
    assert str(tmp_path) in msg and "expected layout under RAW:" in msg
    assert "<split>/images/<name>.jpg" in msg and "<split>/labels/<name>.png" in msg
    assert "<split>/QAs/<name>.json" in msg
    base = make_earthreason(tmp_path)
    (base / "train" / "QAs").rename(tmp_path / "moved")
    with pytest.raises(DataError, match="QAs"):
        read_source("earthreason", tmp_path, {})


def test_no_target_samples_are_kept_behind_keep_empty(tmp_path: Path) -> None:
    """EarthReason's deliberate no-target samples: skipped by default; with keep_empty, records with
    an empty mask, marked so, that a manifest reads back as valid, and --strict can pass on them."""
    from grto_cli.core.data.records import EMPTY_TARGET, read_manifest, write_manifest

    make_earthreason(tmp_path)
    train, report = read_source("earthreason", tmp_path, {"keep_empty": True})["train"]
    empty = [r for r in train if r.empty_target]
    assert [r.id for r in empty] == ["earthreason-train-desert_2-0"] and empty[0].meta[EMPTY_TARGET] is True
    assert not decode_rle(empty[0].mask).any() and empty[0].bbox == [0.0, 0.0, 0.0, 0.0]
    assert "empty mask" not in report.skipped and not train[0].empty_target
    write_manifest(tmp_path / "train.jsonl", train)
    back, back_report = read_manifest(tmp_path / "train.jsonl")
    assert [r.id for r in back] == [r.id for r in train] and back_report.n_skipped == 0
    # an empty mask that is not marked is still a bad record, and a marked one must be empty
    unmarked = dataclasses.replace(empty[0], meta={})
    assert validate_record(unmarked, tmp_path) == "empty mask"
    assert "not empty" in validate_record(dataclasses.replace(train[0], meta={EMPTY_TARGET: True}), tmp_path)


def test_prepare_keep_empty_lets_strict_pass(tmp_path: Path) -> None:
    from grto_cli.stages import prepare

    make_earthreason(tmp_path / "raw")
    (tmp_path / "raw" / "RSReasonSeg" / "train" / "QAs" / "farm_3.json").write_text(
        json.dumps({"questions": ["Where are the crops?"], "answer": ["fields"]}))
    params = tmp_path / "params.yaml"
    params.write_text("prepare: {}\n")
    with pytest.raises(DataError, match="empty mask"):
        prepare.run(str(params), dataset="earthreason", raw=str(tmp_path / "raw"), out=str(tmp_path / "a"), strict=True)
    summary = prepare.run(str(params), dataset="earthreason", raw=str(tmp_path / "raw"), out=str(tmp_path / "b"),
                          strict=True, keep_empty=True)
    assert summary["train"]["skipped"] == 0 and summary["train"]["kept"] == 4
