"""COD10K / NC4K readers: image + mask folders matched by stem, stray files, bad items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grto_cli.core.data.masks import decode_rle
from grto_cli.core.data.records import DataError, validate_record
from grto_cli.core.data.sources import ImageError, image_size, read_source

W, H = 40, 30
STRAYS = (".DS_Store", "Thumbs.db", "readme.txt")


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def _mask(seed: int) -> np.ndarray:
    """A 0/255 mask with a few grey pixels either side of the default threshold."""
    m = np.zeros((H, W), dtype=np.uint8)
    m[5 + seed:20, 8:30] = 255
    m[25, 2] = 127  # just below 128: background
    m[26, 2] = 128  # at 128: target
    return m


def _pair(image_dir: Path, mask_dir: Path, stem: str, seed: int) -> np.ndarray:
    _image(image_dir / f"{stem}.jpg", seed)
    mask = _mask(seed)
    Image.fromarray(mask).save(mask_dir / f"{stem}.png")
    return mask


def _strays(*folders: Path) -> None:
    for folder in folders:
        for name in STRAYS:
            (folder / name).write_bytes(b"not an image")


def make_cod10k(root: Path) -> dict[str, np.ndarray]:
    base = root / "COD10K-v3"
    masks = {}
    for folder in ("Train", "Test"):
        img_dir, gt_dir = base / folder / "Image", base / folder / "GT_Object"
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        _strays(img_dir, gt_dir)
    tr_img, tr_gt = base / "Train" / "Image", base / "Train" / "GT_Object"
    masks["COD10K-CAM-1-Aquatic-1-BatFish-1"] = _pair(tr_img, tr_gt, "COD10K-CAM-1-Aquatic-1-BatFish-1", 0)
    masks["COD10K-CAM-2-Terrestrial-23-Cat-5"] = _pair(tr_img, tr_gt, "COD10K-CAM-2-Terrestrial-23-Cat-5", 1)
    # corrupt image with a valid mask: skipped as unreadable
    _pair(tr_img, tr_gt, "COD10K-CAM-3-Flying-53-Bird-7", 2)
    bad = tr_img / "COD10K-CAM-3-Flying-53-Bird-7.jpg"
    bad.write_bytes(bad.read_bytes()[:150])
    # image with no mask
    _image(tr_img / "COD10K-CAM-4-Amphibian-67-Frog-9.jpg", 3)
    # non-camouflaged images are not part of the benchmark and have no object mask
    _image(tr_img / "COD10K-NonCAM-5-Background-1-Sky-1.jpg", 4)
    te_img, te_gt = base / "Test" / "Image", base / "Test" / "GT_Object"
    masks["COD10K-CAM-1-Aquatic-3-Crab-2"] = _pair(te_img, te_gt, "COD10K-CAM-1-Aquatic-3-Crab-2", 5)
    return masks


def test_cod10k_pairs_masks_and_reports_bad_items(tmp_path: Path) -> None:
    masks = make_cod10k(tmp_path)
    out = read_source("cod10k", tmp_path, {})
    assert list(out) == ["train", "test"]
    train, report = out["train"]
    assert [r.id for r in train] == ["cod10k-train-COD10K-CAM-1-Aquatic-1-BatFish-1",
                                     "cod10k-train-COD10K-CAM-2-Terrestrial-23-Cat-5"]
    assert report.kept == 2
    assert report.skipped == {"unreadable image": ["cod10k-train-COD10K-CAM-3-Flying-53-Bird-7"],
                              "missing mask": ["cod10k-train-COD10K-CAM-4-Amphibian-67-Frog-9"]}
    for rec in train + out["test"][0]:
        stem = rec.id.split("-", 2)[2]
        assert np.array_equal(decode_rle(rec.mask), masks[stem] >= 128)
        assert rec.query == "Segment the camouflaged object in the image."
        assert (rec.width, rec.height) == (W, H)
        assert Path(rec.image).is_absolute() and Path(rec.image).name == f"{stem}.jpg"
        assert validate_record(rec, tmp_path) is None
    assert decode_rle(train[0].mask)[26, 2] and not decode_rle(train[0].mask)[25, 2]
    assert out["test"][1].n_skipped == 0 and len(out["test"][0]) == 1


def test_cod_options_threshold_instruction_splits(tmp_path: Path) -> None:
    make_cod10k(tmp_path)
    out = read_source("cod10k", tmp_path / "COD10K-v3",
                      {"threshold": 200, "instruction": "Find the hidden animal.", "splits": ["test"]})
    assert list(out) == ["test"]
    rec = out["test"][0][0]
    assert rec.query == "Find the hidden animal."
    assert not decode_rle(rec.mask)[26, 2]  # 128 < 200


def test_nc4k_layout(tmp_path: Path) -> None:
    base = tmp_path / "NC4K"
    (base / "Imgs").mkdir(parents=True)
    (base / "GT").mkdir()
    _strays(base / "Imgs", base / "GT")
    expected = _pair(base / "Imgs", base / "GT", "1", 0)
    _pair(base / "Imgs", base / "GT", "2", 1)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(base / "GT" / "2.png")  # empty mask
    Image.fromarray(_mask(0)).save(base / "GT" / "3.png")  # mask without image
    out = read_source("nc4k", tmp_path, {})
    assert list(out) == ["test"]
    records, report = out["test"]
    assert [r.id for r in records] == ["nc4k-test-1"]
    assert np.array_equal(decode_rle(records[0].mask), expected >= 128)
    assert report.skipped == {"empty mask": ["nc4k-test-2"], "missing image": ["nc4k-test-3"]}


def test_missing_raw_or_mask_folder_names_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        read_source("cod10k", tmp_path / "nope", {})
    msg = str(err.value)
    assert str(tmp_path / "nope") in msg and "expected layout under RAW:" in msg
    assert "Train/Image/" in msg and "Train/GT_Object/" in msg and "Test/GT_Object/" in msg
    with pytest.raises(DataError, match=r"Imgs/\*\.jpg"):
        read_source("nc4k", tmp_path, {})
    (tmp_path / "COD10K-v3" / "Test" / "Image").mkdir(parents=True)
    with pytest.raises(DataError, match="GT_Object"):
        read_source("cod10k", tmp_path, {})


def _folder_pair(base: Path) -> tuple[Path, Path]:
    img_dir, gt_dir = base / "Imgs", base / "GT"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    _strays(img_dir, gt_dir)
    return img_dir, gt_dir


def make_sinet(root: Path, train_folder: str = "TrainDataset") -> dict[str, np.ndarray]:
    """COD data as SINet-V2 and later COD papers repackage it, under ``root/Dataset``.

    ``TrainDataset/{Imgs,GT}`` mixes COD10K-train and CAMO-train; ``TestDataset/<name>/{Imgs,GT}``
    holds one folder per test set.
    """
    base = root / "Dataset"
    masks = {}
    tr_img, tr_gt = _folder_pair(base / train_folder)
    for seed, stem in enumerate(("COD10K-CAM-1-Aquatic-1-BatFish-1", "camourflage_00012",
                                 "COD10K-CAM-2-Terrestrial-23-Cat-5", "camourflage_01000")):
        masks[stem] = _pair(tr_img, tr_gt, stem, seed)
    masks["animal-7"] = _pair(tr_img, tr_gt, "animal-7", 4)  # neither prefix: kept, source unknown
    _image(tr_img / "camourflage_00500.jpg", 5)  # image with no mask
    # a NonCAM pair slipped into the folder is still left out
    _pair(tr_img, tr_gt, "COD10K-NonCAM-5-Background-1-Sky-1", 6)
    te_img, te_gt = _folder_pair(base / "TestDataset" / "COD10K")
    masks["COD10K-CAM-1-Aquatic-3-Crab-2"] = _pair(te_img, te_gt, "COD10K-CAM-1-Aquatic-3-Crab-2", 7)
    for name in ("CAMO", "CHAMELEON"):  # other test sets: not part of cod10k
        img_dir, gt_dir = _folder_pair(base / "TestDataset" / name)
        _pair(img_dir, gt_dir, f"{name.lower()}_1", 8)
    nc_img, nc_gt = _folder_pair(base / "TestDataset" / "NC4K")
    masks["nc4k-1"] = _pair(nc_img, nc_gt, "1", 9)
    return masks


SINET_TRAIN_IDS = ["cod10k-train-COD10K-CAM-1-Aquatic-1-BatFish-1",
                   "cod10k-train-COD10K-CAM-2-Terrestrial-23-Cat-5", "cod10k-train-animal-7",
                   "cod10k-train-camourflage_00012", "cod10k-train-camourflage_01000"]


@pytest.mark.parametrize("where", ["Dataset", ""])
def test_cod10k_sinet_layout(tmp_path: Path, where: str) -> None:
    masks = make_sinet(tmp_path)
    out = read_source("cod10k", tmp_path / where if where else tmp_path, {})
    assert list(out) == ["train", "test"]
    train, report = out["train"]
    assert [r.id for r in train] == SINET_TRAIN_IDS
    assert [r.meta["source"] for r in train] == ["COD10K", "COD10K", None, "CAMO", "CAMO"]
    assert report.kept == 5
    assert report.skipped == {"missing mask": ["cod10k-train-camourflage_00500"]}
    test, test_report = out["test"]
    assert [r.id for r in test] == ["cod10k-test-COD10K-CAM-1-Aquatic-3-Crab-2"]  # TestDataset/COD10K only
    assert test_report.n_skipped == 0 and test[0].meta["source"] == "COD10K"
    for rec in train + test:
        stem = rec.id.split("-", 2)[2]
        assert np.array_equal(decode_rle(rec.mask), masks[stem] >= 128)
        assert rec.dataset == "cod10k" and rec.query == "Segment the camouflaged object in the image."
        assert Path(rec.image).is_absolute() and Path(rec.image).name == f"{stem}.jpg"
        assert rec.meta["mask_file"] == f"{stem}.png"
        assert validate_record(rec, tmp_path) is None


def test_cod10k_sinet_split_option_and_train_only(tmp_path: Path) -> None:
    make_sinet(tmp_path, train_folder="TrainValDataset")  # the name SINet-V2's own scripts use
    out = read_source("cod10k", tmp_path / "Dataset", {"splits": ["train"]})
    assert list(out) == ["train"] and [r.id for r in out["train"][0]] == SINET_TRAIN_IDS
    # a copy without TestDataset/COD10K has only the train split
    for name in ("COD10K", "CAMO", "CHAMELEON", "NC4K"):
        (tmp_path / "Dataset" / "TestDataset" / name).rename(tmp_path / name)
    assert list(read_source("cod10k", tmp_path / "Dataset", {})) == ["train"]


def test_cod10k_sinet_missing_gt_folder_names_layout(tmp_path: Path) -> None:
    make_sinet(tmp_path)
    gt = tmp_path / "Dataset" / "TrainDataset" / "GT"
    gt.rename(tmp_path / "GT")
    with pytest.raises(DataError) as err:
        read_source("cod10k", tmp_path, {})
    msg = str(err.value)
    assert str(gt) in msg and "expected layout under RAW:" in msg and "TrainDataset/GT/" in msg


def test_cod10k_v3_still_preferred_and_ids_unchanged(tmp_path: Path) -> None:
    make_cod10k(tmp_path)
    make_sinet(tmp_path)  # both layouts side by side: the original archive wins
    out = read_source("cod10k", tmp_path, {})
    assert [r.id for r in out["train"][0]] == ["cod10k-train-COD10K-CAM-1-Aquatic-1-BatFish-1",
                                               "cod10k-train-COD10K-CAM-2-Terrestrial-23-Cat-5"]
    assert all("source" not in r.meta for r in out["train"][0] + out["test"][0])
    assert Path(out["train"][0][0].image).parent == (tmp_path / "COD10K-v3" / "Train" / "Image").resolve()


def test_cod10k_neither_layout_shows_both(tmp_path: Path) -> None:
    (tmp_path / "Dataset" / "TestDataset" / "CAMO" / "Imgs").mkdir(parents=True)  # not COD10K
    (tmp_path / "Train").mkdir()
    with pytest.raises(DataError) as err:
        read_source("cod10k", tmp_path, {})
    msg = str(err.value)
    assert str(tmp_path) in msg and "expected layout under RAW:" in msg
    assert "Train/Image/" in msg and "Test/GT_Object/" in msg  # COD10K-v3 as published
    assert "TrainDataset/Imgs/" in msg and "TrainDataset/GT/" in msg  # the SINet-V2 repackaging
    assert "TestDataset/COD10K/Imgs/" in msg and "TestDataset/COD10K/GT/" in msg


@pytest.mark.parametrize("where", ["Dataset", ""])
def test_nc4k_in_sinet_test_dataset(tmp_path: Path, where: str) -> None:
    masks = make_sinet(tmp_path)
    out = read_source("nc4k", tmp_path / where if where else tmp_path, {})
    records, report = out["test"]
    assert [r.id for r in records] == ["nc4k-test-1"] and report.n_skipped == 0
    assert np.array_equal(decode_rle(records[0].mask), masks["nc4k-1"] >= 128)
    assert Path(records[0].image).parent == (tmp_path / "Dataset" / "TestDataset" / "NC4K" / "Imgs").resolve()


def test_nc4k_missing_names_sinet_place(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        read_source("nc4k", tmp_path, {})
    msg = str(err.value)
    assert str(tmp_path / "TestDataset" / "NC4K") in msg and "TestDataset/NC4K/Imgs/" in msg


def test_image_size_decodes_the_whole_file(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    _image(good, 0)
    assert image_size(good) == (W, H)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:-200])
    with Image.open(truncated) as im:  # the header alone still looks fine
        assert im.size == (W, H)
    with pytest.raises(ImageError) as err:
        image_size(truncated)
    assert err.value.reason == "unreadable image" and isinstance(err.value, DataError)
    with pytest.raises(ImageError) as err:
        image_size(tmp_path / "absent.jpg")
    assert err.value.reason == "missing image"
