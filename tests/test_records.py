import json

import numpy as np
import pytest
from PIL import Image

from grto_cli.core.data.masks import decode_rle, encode_rle, mask_bbox, polygons_to_mask
from grto_cli.core.data.records import DataError, Record, read_manifest, record_from_mask, write_manifest


def _good(tmp_path, rid="ok", size=(8, 6)):
    w, h = size
    Image.new("RGB", (w, h), (10, 20, 30)).save(tmp_path / f"{rid}.png")
    mask = np.zeros((h, w), bool)
    mask[1:3, 2:5] = True
    return record_from_mask(rid, f"{rid}.png", "the thing", mask, "test", "train")


def test_rle_round_trip_and_bbox():
    mask = np.zeros((7, 9), bool)
    mask[2:5, 3:8] = True
    mask[6, 0] = True
    assert (decode_rle(encode_rle(mask)) == mask).all()
    assert mask_bbox(mask) == [0.0, 2.0, 8.0, 7.0]
    json.dumps(encode_rle(mask))  # manifests are JSON


def test_uncompressed_rle_decodes_like_compressed():
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    # column-major runs: 5 zeros, then per column ...
    flat = mask.flatten(order="F")
    counts, run, current = [], 0, False
    for v in flat:
        if v != current:
            counts.append(run)
            run, current = 0, v
        run += 1
    counts.append(run)
    assert (decode_rle({"size": [4, 5], "counts": counts}) == mask).all()


def test_polygon_rasterisation_fills_square():
    mask = polygons_to_mask([[1, 1, 5, 1, 5, 5, 1, 5]], 8, 8)
    assert mask[2:5, 2:5].all() and not mask[6:, :].any()


def test_validation_reports_bad_records_by_id(tmp_path):
    good = _good(tmp_path)
    bad_rle = Record(**{**good.to_dict(), "id": "bad-rle", "mask": {"size": [6, 8], "counts": 12}})
    missing = Record(**{**good.to_dict(), "id": "no-image", "image": "nowhere.png"})
    empty = record_from_mask("empty", "ok.png", "the thing", np.zeros((6, 8), bool), "test", "train")
    Image.new("RGB", (8, 6)).save(tmp_path / "corrupt.png")
    (tmp_path / "corrupt.png").write_bytes((tmp_path / "corrupt.png").read_bytes()[:20])
    corrupt = Record(**{**good.to_dict(), "id": "corrupt", "image": "corrupt.png"})
    write_manifest(tmp_path / "m.jsonl", [good, bad_rle, missing, empty, corrupt])

    records, report = read_manifest(tmp_path / "m.jsonl", on_error="skip")
    assert [r.id for r in records] == ["ok"]
    by_id = {rid: reason for reason, ids in report.skipped.items() for rid in ids}
    assert by_id["bad-rle"].startswith("bad mask RLE")
    assert by_id["no-image"].startswith("missing image")
    assert by_id["empty"] == "empty mask"
    assert by_id["corrupt"].startswith("unreadable image")
    assert report.kept == 1 and report.n_skipped == 4

    with pytest.raises(DataError) as err:
        read_manifest(tmp_path / "m.jsonl", on_error="fail")
    for rid in ("bad-rle", "no-image", "empty", "corrupt"):
        assert rid in str(err.value)


def test_missing_manifest_names_path_and_layout(tmp_path):
    with pytest.raises(DataError, match="manifest not found: .*nope.jsonl.*grto prepare"):
        read_manifest(tmp_path / "nope.jsonl")


def test_atomic_dir_swap_interrupted_between_renames_is_recovered(tmp_path):
    import os

    from grto_cli.core.io import atomic_dir, recover_dir

    target = tmp_path / "last"
    with atomic_dir(target) as tmp:
        (tmp / "state.json").write_text("1")
    os.replace(target, tmp_path / ".last.old")  # killed after moving the old copy aside
    (tmp_path / ".last.abc.tmp").mkdir()  # and a half-written new one
    assert recover_dir(target) == target
    assert (target / "state.json").read_text() == "1"
    assert not (tmp_path / ".last.abc.tmp").exists()
