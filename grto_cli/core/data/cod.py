"""Camouflaged object detection sets: an image folder and a binary-mask folder matched by stem.

COD10K-v3 ships ``Train/Image`` + ``Train/GT_Object`` and ``Test/Image`` + ``Test/GT_Object``;
NC4K ships ``Imgs`` + ``GT`` (test only). Every record gets the same query, the COD instruction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from grto_cli.core.data.masks import encode_rle, mask_bbox
from grto_cli.core.data.records import Record, SkipReport
from grto_cli.core.data.sources import (EMPTY_MASK, IMAGE_EXTENSIONS, MISSING_IMAGE, MISSING_MASK,
                                        SIZE_MISMATCH, UNREADABLE_MASK, find_root, finish, image_size_or_skip,
                                        list_files, missing_data_error, pair_by_stem, read_gray, resolved,
                                        wanted_split)

DEFAULT_INSTRUCTION = "Segment the camouflaged object in the image."
DEFAULT_THRESHOLD = 128
# Masks are PNG in both datasets; other image types are accepted so a re-encoded copy still reads.
MASK_EXTENSIONS = (".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png")

COD10K_LAYOUT = ("  Train/Image/COD10K-CAM-*.jpg      Train/GT_Object/COD10K-CAM-*.png\n"
                 "  Test/Image/COD10K-CAM-*.jpg       Test/GT_Object/COD10K-CAM-*.png\n"
                 "(RAW is the COD10K-v3/ folder, or the folder that holds it)")
NC4K_LAYOUT = ("  Imgs/*.jpg\n"
               "  GT/*.png\n"
               "(RAW is the NC4K/ folder, or the folder that holds it)")


def _is_noncam(stem: str) -> bool:
    # COD10K also holds non-camouflaged images (COD10K-NonCAM-*), which have no object mask and
    # are not part of the COD benchmark (3040 train / 2026 test camouflaged images).
    return "-NonCAM-" in stem


def _binary_mask(path: Path, threshold: int) -> np.ndarray | None:
    gray = read_gray(path)
    return None if gray is None else gray >= threshold


def _item(stem: str, image: Path, mask_path: Path, dataset: str, split: str, options: dict,
          report: SkipReport) -> Record | None:
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
                  meta={"mask_file": mask_path.name})


def read_pairs(image_dir: Path, mask_dir: Path, dataset: str, split: str, options: dict,
               exclude: Callable[[str], bool] = lambda stem: False) -> tuple[list[Record], SkipReport]:
    """Pair images and masks by file stem; unpaired files are reported, stray non-images ignored."""
    images = {s: p for s, p in list_files(image_dir, IMAGE_EXTENSIONS).items() if not exclude(s)}
    masks = {s: p for s, p in list_files(mask_dir, MASK_EXTENSIONS).items() if not exclude(s)}
    records: list[Record] = []
    report = SkipReport()
    for stem in pair_by_stem({MISSING_MASK: masks, MISSING_IMAGE: images}, dataset, split, report):
        record = _item(stem, images[stem], masks[stem], dataset, split, options, report)
        if record is not None:
            records.append(record)
    return finish(records, report)


def _split_dirs(root: Path, folder: str, dataset: str) -> tuple[Path, Path]:
    image_dir, mask_dir = root / folder / "Image", root / folder / "GT_Object"
    if not mask_dir.is_dir():
        raise missing_data_error(dataset, [mask_dir], COD10K_LAYOUT,
                                 detail=f"found {image_dir} but not its mask folder")
    return image_dir, mask_dir


def read_cod10k(raw: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    """COD10K-v3 camouflaged images: splits ``train`` and ``test``."""
    root = find_root(Path(raw), ("", "COD10K-v3", "COD10K"),
                     lambda p: (p / "Train" / "Image").is_dir() or (p / "Test" / "Image").is_dir(),
                     "cod10k", COD10K_LAYOUT)
    out = {}
    for split, folder in (("train", "Train"), ("test", "Test")):
        if (root / folder / "Image").is_dir() and wanted_split(split, options):
            image_dir, mask_dir = _split_dirs(root, folder, "cod10k")
            out[split] = read_pairs(image_dir, mask_dir, "cod10k", split, options, exclude=_is_noncam)
    return out


def read_nc4k(raw: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    """NC4K: a test-only set, split ``test``."""
    root = find_root(Path(raw), ("", "NC4K"), lambda p: (p / "Imgs").is_dir() and (p / "GT").is_dir(),
                     "nc4k", NC4K_LAYOUT)
    if not wanted_split("test", options):
        return {}
    return {"test": read_pairs(root / "Imgs", root / "GT", "nc4k", "test", options)}
