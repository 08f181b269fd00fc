"""Camouflaged object detection sets: an image folder and a binary-mask folder matched by stem.

COD10K is read in either of two layouts:

- COD10K-v3 as published: ``Train/Image`` + ``Train/GT_Object`` and ``Test/Image`` + ``Test/GT_Object``.
- As SINet-V2 and most later COD papers repackage it: ``TrainDataset/{Imgs,GT}`` and
  ``TestDataset/COD10K/{Imgs,GT}`` (``TestDataset/`` also holds CAMO, CHAMELEON and NC4K). That
  ``TrainDataset`` is the combined COD10K-train (3040) + CAMO-train (1000) set the papers train on,
  so the ``train`` split then holds CAMO images too; ``meta["source"]`` says which set each came
  from ("COD10K" or "CAMO", from the file stem). ``test`` is ``TestDataset/COD10K`` only.

Non-camouflaged COD10K images (``COD10K-NonCAM-*``) are left out in both layouts. NC4K ships
``Imgs`` + ``GT`` (test only), also found as ``TestDataset/NC4K`` in the repackaged copy. Every
record gets the same query, the COD instruction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from grto_cli.core.data.masks import encode_rle, mask_bbox
from grto_cli.core.data.records import Record, SkipReport
from grto_cli.core.data.sources import (EMPTY_MASK, IMAGE_EXTENSIONS, MISSING_IMAGE, MISSING_MASK,
                                        SIZE_MISMATCH, UNREADABLE_MASK, finish, image_size_or_skip,
                                        list_files, missing_data_error, pair_by_stem, read_gray, resolved,
                                        wanted_split)

DEFAULT_INSTRUCTION = "Segment the camouflaged object in the image."
DEFAULT_THRESHOLD = 128
# Masks are PNG in both datasets; other image types are accepted so a re-encoded copy still reads.
MASK_EXTENSIONS = (".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png")

_V3_SUBDIRS = ("", "COD10K-v3", "COD10K")
# The repackaged training folder: TrainDataset/ in the archives, TrainValDataset/ in SINet-V2's scripts.
_SINET_TRAIN = ("TrainDataset", "TrainValDataset")
_SINET_TEST = "TestDataset/COD10K"
# stem prefix -> the set a repackaged training image came from ("camourflage" is CAMO's own spelling)
_SOURCES = (("COD10K-", "COD10K"), ("camourflage_", "CAMO"))

COD10K_V3_LAYOUT = ("  Train/Image/COD10K-CAM-*.jpg      Train/GT_Object/COD10K-CAM-*.png\n"
                    "  Test/Image/COD10K-CAM-*.jpg       Test/GT_Object/COD10K-CAM-*.png\n"
                    "(RAW is the COD10K-v3/ folder, or the folder that holds it)")
COD10K_SINET_LAYOUT = ("  TrainDataset/Imgs/*.jpg           TrainDataset/GT/*.png   (COD10K-train + CAMO-train)\n"
                       "  TestDataset/COD10K/Imgs/*.jpg     TestDataset/COD10K/GT/*.png\n"
                       "(RAW is the folder holding TrainDataset/ and TestDataset/, or the folder that holds it;\n"
                       " TrainValDataset/ is read as TrainDataset/)")
COD10K_LAYOUT = ("COD10K-v3 as published:\n" + COD10K_V3_LAYOUT
                 + "\nor as repackaged by SINet-V2 and later COD papers:\n" + COD10K_SINET_LAYOUT)
NC4K_LAYOUT = ("  Imgs/*.jpg\n"
               "  GT/*.png\n"
               "(RAW is the NC4K/ folder, or the folder that holds it)\n"
               "or as repackaged by SINet-V2 and later COD papers:\n"
               "  TestDataset/NC4K/Imgs/*.jpg       TestDataset/NC4K/GT/*.png\n"
               "(RAW is the folder holding TestDataset/, or the folder that holds it)")


def _is_noncam(stem: str) -> bool:
    # COD10K also holds non-camouflaged images (COD10K-NonCAM-*), which have no object mask and
    # are not part of the COD benchmark (3040 train / 2026 test camouflaged images).
    return "-NonCAM-" in stem


def _source_meta(stem: str) -> dict:
    """Which set a repackaged training image came from; None for a stem of neither kind."""
    return {"source": next((source for prefix, source in _SOURCES if stem.startswith(prefix)), None)}


def _binary_mask(path: Path, threshold: int) -> np.ndarray | None:
    gray = read_gray(path)
    return None if gray is None else gray >= threshold


def _item(stem: str, image: Path, mask_path: Path, dataset: str, split: str, options: dict,
          report: SkipReport, meta: dict) -> Record | None:
    rid = f"{dataset}-{split}-{stem}"
    size = image_size_or_skip(image, [rid], report)
    if size is None:
        return None
    width, height = size
    mask = _binary_mask(mask_path, int(options.get("threshold", DEFAULT_THRESHOLD)))
    if mask is None:
        report.skip(rid, UNREADABLE_MASK)
        return None
    if mask.shape != (height, width):
        report.skip(rid, SIZE_MISMATCH)
        return None
    if not mask.any():
        report.skip(rid, EMPTY_MASK)
        return None
    return Record(id=rid, image=resolved(image), width=width, height=height,
                  query=str(options.get("instruction") or DEFAULT_INSTRUCTION), mask=encode_rle(mask),
                  bbox=mask_bbox(mask), dataset=dataset, split=split,
                  meta={"mask_file": mask_path.name, **meta})


def read_pairs(image_dir: Path, mask_dir: Path, dataset: str, split: str, options: dict,
               exclude: Callable[[str], bool] = lambda stem: False,
               meta_of: Callable[[str], dict] = lambda stem: {}) -> tuple[list[Record], SkipReport]:
    """Pair images and masks by file stem; unpaired files are reported, stray non-images ignored.

    ``meta_of(stem)`` adds to each record's meta (after ``mask_file``).
    """
    images = {s: p for s, p in list_files(image_dir, IMAGE_EXTENSIONS).items() if not exclude(s)}
    masks = {s: p for s, p in list_files(mask_dir, MASK_EXTENSIONS).items() if not exclude(s)}
    records: list[Record] = []
    report = SkipReport()
    for stem in pair_by_stem({MISSING_MASK: masks, MISSING_IMAGE: images}, dataset, split, report):
        record = _item(stem, images[stem], masks[stem], dataset, split, options, report, meta_of(stem))
        if record is not None:
            records.append(record)
    return finish(records, report)


def _checked_dirs(image_dir: Path, mask_dir: Path, dataset: str, layout: str) -> tuple[Path, Path]:
    if not mask_dir.is_dir():
        raise missing_data_error(dataset, [mask_dir], layout, detail=f"found {image_dir} but not its mask folder")
    return image_dir, mask_dir


def _first_dir(candidates: Sequence[Path], is_root: Callable[[Path], bool]) -> Path | None:
    return next((c for c in candidates if c.is_dir() and is_root(c)), None)


def _here_and_inside(raw: Path, sub: str) -> list[Path]:
    """``raw/sub``, then ``<folder>/sub`` for each folder directly in ``raw`` (sorted).

    The repackaged copies sit in a folder with no fixed name (SINet-V2's ``Dataset/``), so RAW
    may be that folder or the one above it.
    """
    try:
        inside = sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # not a folder, or not readable: only raw itself is a candidate
        inside = []
    return [p / sub if sub else p for p in [raw, *inside]]


def _is_v3_root(p: Path) -> bool:
    return (p / "Train" / "Image").is_dir() or (p / "Test" / "Image").is_dir()


def _sinet_train_dir(root: Path) -> Path | None:
    return next((root / name for name in _SINET_TRAIN if (root / name / "Imgs").is_dir()), None)


def _is_sinet_root(p: Path) -> bool:
    return _sinet_train_dir(p) is not None or (p / _SINET_TEST / "Imgs").is_dir()


def _read_v3(root: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    out = {}
    for split, folder in (("train", "Train"), ("test", "Test")):
        if (root / folder / "Image").is_dir() and wanted_split(split, options):
            image_dir, mask_dir = _checked_dirs(root / folder / "Image", root / folder / "GT_Object", "cod10k",
                                                COD10K_V3_LAYOUT)
            out[split] = read_pairs(image_dir, mask_dir, "cod10k", split, options, exclude=_is_noncam)
    return out


def _read_sinet(root: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    out = {}
    for split, base in (("train", _sinet_train_dir(root)), ("test", root / _SINET_TEST)):
        if base is not None and (base / "Imgs").is_dir() and wanted_split(split, options):
            image_dir, mask_dir = _checked_dirs(base / "Imgs", base / "GT", "cod10k", COD10K_SINET_LAYOUT)
            out[split] = read_pairs(image_dir, mask_dir, "cod10k", split, options, exclude=_is_noncam,
                                    meta_of=_source_meta)
    return out


def read_cod10k(raw: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    """COD10K camouflaged images: splits ``train`` and ``test``, from either layout (module docstring).

    COD10K-v3 is looked for first, so a folder holding both layouts reads the original archive.
    """
    raw = Path(raw)
    v3_candidates = [raw / sub if sub else raw for sub in _V3_SUBDIRS]
    root = _first_dir(v3_candidates, _is_v3_root)
    if root is not None:
        return _read_v3(root, options)
    root = _first_dir(_here_and_inside(raw, ""), _is_sinet_root)
    if root is not None:
        return _read_sinet(root, options)
    raise missing_data_error("cod10k", [*v3_candidates, raw / "*"], COD10K_LAYOUT)


def read_nc4k(raw: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    """NC4K: a test-only set, split ``test``; ``NC4K/`` as published or ``TestDataset/NC4K/``."""
    raw = Path(raw)
    root = _first_dir([raw, raw / "NC4K", *_here_and_inside(raw, "TestDataset/NC4K")],
                      lambda p: (p / "Imgs").is_dir() and (p / "GT").is_dir())
    if root is None:
        looked_at = [raw, raw / "NC4K", raw / "TestDataset" / "NC4K", raw / "*" / "TestDataset" / "NC4K"]
        raise missing_data_error("nc4k", looked_at, NC4K_LAYOUT)
    if not wanted_split("test", options):
        return {}
    return {"test": read_pairs(root / "Imgs", root / "GT", "nc4k", "test", options)}
