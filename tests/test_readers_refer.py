"""refer-layout readers (RefCOCO/+/g): masks decoded exactly as pycocotools' COCO does."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from grto_cli.core.data.masks import decode_rle
from grto_cli.core.data.records import DataError, validate_record
from grto_cli.core.data.refer import load_refs
from grto_cli.core.data.sources import READERS, read_source

IMAGES = {1: (64, 48), 2: (80, 60), 3: (32, 32)}  # id -> (width, height); image 3 is not on disk


def _file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def _crowd_rle(height: int, width: int) -> dict:
    """An uncompressed (list counts) RLE, the format COCO uses for iscrowd=1."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[10:30, 20:50] = 1
    mask[40:55, 5:15] = 1
    flat = mask.flatten(order="F")  # COCO RLE runs go down columns
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return {"size": [height, width], "counts": [int(c) for c in counts]}


def _compressed_rle(height: int, width: int) -> dict:
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    mask[5:20, 5:12] = 1
    rle = mask_utils.encode(mask)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _instances() -> dict:
    images = [{"id": i, "width": w, "height": h, "file_name": _file_name(i)} for i, (w, h) in IMAGES.items()]
    anns = [
        {"id": 101, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [[10.5, 5.2, 40.3, 8.0, 35.7, 30.9, 12.1, 25.4]]},
        {"id": 102, "image_id": 1, "category_id": 2, "iscrowd": 0,  # two separate parts
         "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12], [45.5, 30, 60, 30, 60, 44.5, 50, 46]]},
        {"id": 103, "image_id": 2, "category_id": 3, "iscrowd": 1, "segmentation": _crowd_rle(60, 80)},
        {"id": 104, "image_id": 2, "category_id": 3, "iscrowd": 0, "segmentation": _compressed_rle(60, 80)},
        {"id": 105, "image_id": 3, "category_id": 1, "iscrowd": 0,
         "segmentation": [[1, 1, 20, 1, 20, 20, 1, 20]]},
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": c} for c in (1, 2, 3)]}


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, sents: list[tuple[int, str]]) -> dict:
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "sent_ids": [s for s, _ in sents],
            "sentences": [{"sent_id": s, "sent": t, "raw": t, "tokens": t.split()} for s, t in sents]}


REFS = [
    _ref(1, 101, 1, "train", [(11, "the left shape"), (10, "a polygon")]),
    _ref(2, 102, 1, "val", [(20, "two little pieces")]),
    _ref(3, 103, 2, "test", [(30, "the crowd")]),
    _ref(4, 104, 2, "train", [(40, "compressed one")]),
    _ref(5, 105, 3, "test", [(50, "image missing")]),
    _ref(6, 999, 1, "val", [(60, "dangling annotation")]),
]


def _write_images(image_dir: Path) -> None:
    rng = np.random.default_rng(0)
    image_dir.mkdir(parents=True, exist_ok=True)
    for image_id, (w, h) in IMAGES.items():
        if image_id == 3:
            continue
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image_dir / _file_name(image_id))


def make_refer(root: Path, dataset: str = "refcocog", split_by: str = "umd", refs: list | None = None) -> Path:
    data = root / "data"
    (data / dataset).mkdir(parents=True)
    with (data / dataset / f"refs({split_by}).p").open("wb") as fh:
        pickle.dump(REFS if refs is None else refs, fh, protocol=2)
    (data / dataset / "instances.json").write_text(json.dumps(_instances()))
    _write_images(data / "images" / "mscoco" / "images" / "train2014")
    return data


def test_refcocog_masks_match_pycocotools(tmp_path: Path) -> None:
    data = make_refer(tmp_path)
    out = read_source("refcocog", data, {})
    assert list(out) == ["train", "val", "test"]
    coco = COCO(str(data / "refcocog" / "instances.json"))
    by_id = {r.id: r for recs, _ in out.values() for r in recs}
    assert sorted(by_id) == ["refcocog-1-10", "refcocog-1-11", "refcocog-2-20", "refcocog-3-30", "refcocog-4-40"]
    for rec in by_id.values():
        ann = coco.anns[rec.meta["ann_id"]]
        expected = coco.annToMask(ann).astype(bool)
        got = decode_rle(rec.mask)
        assert got.shape == expected.shape == (rec.height, rec.width)
        assert np.array_equal(got, expected), rec.id
        assert expected.sum() > 0
        ys, xs = np.nonzero(expected)
        assert rec.bbox == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert Path(rec.image).is_absolute() and Path(rec.image).is_file()
        assert Path(rec.image).name == coco.imgs[ann["image_id"]]["file_name"]
        assert validate_record(rec, data) is None
    # The multi-polygon annotation really has two disjoint parts, both kept.
    multi = decode_rle(by_id["refcocog-2-20"].mask)
    assert multi[5, 5] and multi[40, 55] and not multi[20, 30]
    assert by_id["refcocog-1-10"].query == "a polygon"
    assert by_id["refcocog-1-10"].meta == {"ref_id": 1, "ann_id": 101, "image_id": 1, "category_id": 1,
                                           "sent_id": 10}
    assert [r.id for r in out["train"][0]] == ["refcocog-1-10", "refcocog-1-11", "refcocog-4-40"]


def test_refcocog_skips_are_reported_by_id(tmp_path: Path) -> None:
    out = read_source("refcocog", make_refer(tmp_path), {})
    assert out["test"][1].skipped == {"missing image": ["refcocog-5-50"]}
    assert out["val"][1].skipped == {"unreadable annotation": ["refcocog-6-60"]}
    assert out["train"][1].n_skipped == 0
    assert [rep.kept for _, rep in out.values()] == [3, 1, 1]


def test_corrupt_coco_image_is_skipped(tmp_path: Path) -> None:
    data = make_refer(tmp_path)
    path = data / "images" / "mscoco" / "images" / "train2014" / _file_name(2)
    path.write_bytes(path.read_bytes()[:200])
    out = read_source("refcocog", data, {})
    assert out["test"][1].skipped["unreadable image"] == ["refcocog-3-30"]
    assert out["train"][1].skipped == {"unreadable image": ["refcocog-4-40"]}


def test_raw_may_be_parent_of_data_and_splits_restrict(tmp_path: Path) -> None:
    make_refer(tmp_path)
    out = read_source("refcocog", tmp_path, {"splits": ["val"]})
    assert list(out) == ["val"]
    with pytest.raises(DataError, match="testB"):
        read_source("refcocog", tmp_path, {"splits": ["testB"]})


def test_refcoco_uses_unc_file_and_plain_train2014_folder(tmp_path: Path) -> None:
    data = make_refer(tmp_path, dataset="refcoco+", split_by="unc",
                      refs=[_ref(7, 101, 1, "testA", [(70, "left")])])
    (data / "images" / "mscoco" / "images" / "train2014").rename(data / "train2014")
    out = read_source("refcoco+", data, {})
    assert list(out) == ["testA"]
    assert [r.id for r in out["testA"][0]] == ["refcoco+-7-70"]
    assert out["testA"][0][0].dataset == "refcoco+"


def test_missing_raw_data_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        read_source("refcocog", tmp_path / "nowhere", {})
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg
    assert "expected layout under RAW:" in msg
    assert "refcocog/refs(umd).p" in msg and "refcocog/instances.json" in msg
    assert "images/mscoco/images/train2014/COCO_train2014_*.jpg" in msg
    with pytest.raises(DataError, match=r"refcoco/refs\(unc\)\.p"):
        read_source("refcoco", tmp_path, {})


@pytest.mark.parametrize("dataset, split_by", [("refcocog", "umd"), ("refcoco", "unc"), ("refcoco+", "unc")])
def test_raw_may_be_the_dataset_folder(tmp_path: Path, dataset: str, split_by: str) -> None:
    # RAW = data/<dataset>/, the folder holding refs(*).p and instances.json; images under its parent.
    data = make_refer(tmp_path, dataset=dataset, split_by=split_by)
    from_data = read_source(dataset, data, {})
    from_folder = read_source(dataset, data / dataset, {})
    assert list(from_folder) == list(from_data) == ["train", "val", "test"]
    for split, (records, report) in from_data.items():
        assert [r.to_dict() for r in from_folder[split][0]] == [r.to_dict() for r in records]
        assert from_folder[split][1] == report
    image = Path(from_folder["train"][0][0].image)
    assert image.parent == (data / "images" / "mscoco" / "images" / "train2014").resolve()


def test_dataset_folder_given_as_relative_path_and_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_refer(tmp_path)
    monkeypatch.chdir(data / "refcocog")
    assert read_source("refcocog", Path("."), {"splits": ["train"]})["train"][1].kept == 3
    monkeypatch.chdir(data)
    assert read_source("refcocog", Path("refcocog"), {"splits": ["train"]})["train"][1].kept == 3


def test_dataset_folder_without_images_beside_it_is_a_layout_error(tmp_path: Path) -> None:
    data = make_refer(tmp_path)
    (data / "images").rename(tmp_path / "elsewhere")
    with pytest.raises(DataError) as err:
        read_source("refcocog", data / "refcocog", {})
    msg = str(err.value)
    assert str(data / "images" / "mscoco" / "images" / "train2014") in msg and "expected layout under RAW:" in msg


def test_wrong_folder_names_path_and_all_three_forms(tmp_path: Path) -> None:
    data = make_refer(tmp_path, dataset="refcoco+", split_by="unc")
    for raw in (data / "images", data / "refcoco+"):  # not a refcocog folder at all / another dataset's
        with pytest.raises(DataError) as err:
            read_source("refcocog", raw, {})
        msg = str(err.value)
        assert str(raw) in msg and "expected layout under RAW:" in msg
        assert "refcocog/refs(umd).p" in msg and "refcocog/instances.json" in msg
        assert "data/refcocog/" in msg and "holds data/" in msg  # the layout names all three RAW forms
    # refcoco and refcoco+ share refs(unc).p: the folder name tells them apart, so refcoco+'s
    # folder is not read as refcoco.
    with pytest.raises(DataError) as err:
        read_source("refcoco", data / "refcoco+", {})
    msg = str(err.value)
    assert str(data / "refcoco+") in msg and "refcoco/refs(unc).p" in msg and "named refcoco" in msg


def test_missing_image_folder_is_a_layout_error(tmp_path: Path) -> None:
    data = make_refer(tmp_path)
    (data / "images").rename(tmp_path / "elsewhere")
    with pytest.raises(DataError, match="train2014"):
        read_source("refcocog", data, {})


def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(DataError) as err:
        read_source("refclef", Path("."), {})
    for name in ("refcoco", "refcoco+", "refcocog", "reasonseg", "cod10k", "nc4k", "earthreason", "custom"):
        assert name in str(err.value)
    assert set(READERS) == {"refcoco", "refcoco+", "refcocog", "reasonseg", "cod10k", "nc4k", "earthreason",
                            "custom"}


# --- the pickle is untrusted input -----------------------------------------------------------


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload_cls", [_SystemPayload, _ExecPayload])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_refs_pickle_is_refused_without_running(tmp_path: Path, payload_cls, protocol: int) -> None:
    marker = tmp_path / "pwned"
    data = make_refer(tmp_path, refs=[])
    refs_path = data / "refcocog" / "refs(umd).p"
    with refs_path.open("wb") as fh:
        pickle.dump([{"ref_id": 1, "evil": payload_cls(marker)}], fh, protocol=protocol)
    with pytest.raises(DataError) as err:
        read_source("refcocog", data, {})
    assert not marker.exists()
    msg = str(err.value)
    assert str(refs_path) in msg and "refused" in msg
    # protocols < 3 spell builtins as __builtin__; either way the refused global is named
    assert ("system" in msg) if payload_cls is _SystemPayload else ("exec" in msg)


def _py2_pickle(obj) -> bytes:
    """What Python 2's cPickle protocol 2 writes for plain data: str as SHORT_BINSTRING (bytes)."""
    def enc(o) -> bytes:
        if isinstance(o, dict):
            return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
        if isinstance(o, list):
            return b"](" + b"".join(enc(v) for v in o) + b"e"
        if isinstance(o, int):
            return b"J" + struct.pack("<i", o)
        raw = o.encode("utf-8")
        return b"U" + bytes([len(raw)]) + raw
    return b"\x80\x02" + enc(obj) + b"."


def test_python2_refs_pickle_with_byte_strings(tmp_path: Path) -> None:
    data = make_refer(tmp_path, refs=[])
    refs = [_ref(1, 101, 1, "train", [(10, "caf\u00e9 sign")])]
    (data / "refcocog" / "refs(umd).p").write_bytes(_py2_pickle(refs))
    loaded = load_refs(data / "refcocog" / "refs(umd).p")
    assert loaded[0]["sentences"][0]["sent"] == "caf\u00e9 sign"
    out = read_source("refcocog", data, {})
    assert [(r.id, r.query) for r in out["train"][0]] == [("refcocog-1-10", "caf\u00e9 sign")]


@pytest.mark.parametrize("payload_cls", [_SystemPayload, _ExecPayload])
def test_payloads_are_live_under_plain_pickle(tmp_path: Path, payload_cls) -> None:
    # Control for the refusal test above: the same bytes do run code under a plain unpickler.
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps([{"evil": payload_cls(marker)}], protocol=2))
    assert marker.exists()
