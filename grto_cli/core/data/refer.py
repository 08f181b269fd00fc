"""RefCOCO / RefCOCO+ / RefCOCOg in the layout of the public refer toolkit (lichengunc/refer).

``data/<dataset>/refs(<splitBy>).p`` lists the referring expressions (a Python 2 pickle),
``data/<dataset>/instances.json`` holds the COCO train2014 images and annotations they point at,
and the images live in ``data/images/mscoco/images/train2014``. One record per sentence; the
mask is the referred annotation decoded exactly as ``pycocotools.coco.COCO.annToMask`` does.

RAW may be ``data/`` itself, the folder that holds ``data/``, or the dataset's own folder
``data/<dataset>/`` (the one holding the refs and instances files; the images are then looked
for under its parent). That folder must keep its toolkit name: refcoco and refcoco+ both ship
``refs(unc).p``, so the name is what tells them apart.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from grto_cli.core.data.masks import encode_rle, mask_bbox
from grto_cli.core.data.records import DataError, Record, SkipReport
from grto_cli.core.data.sources import (EMPTY_MASK, EMPTY_QUERY, SIZE_MISMATCH, UNREADABLE_ANNOTATION,
                                        ImageError, ImageSizes, find_root, finish, missing_data_error,
                                        resolved, skip_all, wanted_split)

# dataset -> (folder under data/, splitBy, published splits in their usual order)
_SPEC: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "refcoco": ("refcoco", "unc", ("train", "val", "testA", "testB")),
    "refcoco+": ("refcoco+", "unc", ("train", "val", "testA", "testB")),
    "refcocog": ("refcocog", "umd", ("train", "val", "test")),
}
_IMAGE_DIRS = ("images/mscoco/images/train2014", "images/train2014", "train2014")


def layout(dataset: str) -> str:
    folder, split_by, _ = _SPEC[dataset]
    return (f"  {folder}/refs({split_by}).p\n"
            f"  {folder}/instances.json\n"
            "  images/mscoco/images/train2014/COCO_train2014_*.jpg   (or images/train2014/, train2014/)\n"
            f"(RAW is the refer toolkit's data/ folder, the folder that holds data/, or data/{folder}/\n"
            " itself, the dataset folder holding the two files above; the images are then found in data/)")


# ---------------------------------------------------------------------------------------------
# Safe pickle loading


class _RefusingUnpickler(pickle.Unpickler):
    """Builds plain containers and scalars only.

    Every way a pickle can reach code (GLOBAL/STACK_GLOBAL/INST/OBJ/EXT*) goes through
    ``find_class``, so refusing all of it leaves nothing a crafted file could call: the refs
    files hold only lists, dicts, strings and numbers, which need no lookup at all.
    """

    def __init__(self, fh: io.BufferedIOBase, source: Path) -> None:
        # Python 2 ``str`` arrives as bytes; ``_to_text`` decodes it afterwards (utf-8 first).
        super().__init__(fh, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        raise DataError(f"{self._source}: refused to unpickle global {module}.{name}; "
                        "a refs file holds only plain lists, dicts, strings and numbers")


def _to_text(obj: Any) -> Any:
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return obj.decode("latin-1")
    if isinstance(obj, dict):
        return {_to_text(k): _to_text(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_text(v) for v in obj]
    return obj


def load_refs(path: Path) -> list:
    """Load a ``refs(*).p`` file without executing anything it contains."""
    try:
        with path.open("rb") as fh:
            data = _RefusingUnpickler(fh, path).load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: unreadable refs pickle ({exc.__class__.__name__}: {exc})") from exc
    data = _to_text(data)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of refs, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------
# COCO annotations


def ann_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation as ``COCO.annToRLE`` + ``decode`` do (polygons merged)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        counts = segmentation["counts"]
        rle = {"size": [int(s) for s in segmentation["size"]],
               "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def _load_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
        images = {int(im["id"]): im for im in data["images"] if isinstance(im, dict) and "id" in im}
        anns = {int(a["id"]): a for a in data["annotations"] if isinstance(a, dict) and "id" in a}
    except Exception as exc:
        raise DataError(f"{path}: unreadable COCO instances file ({exc.__class__.__name__}: {exc})") from exc
    return images, anns


# ---------------------------------------------------------------------------------------------
# Reader


class _Ctx:
    """What every ref of one dataset needs: its name, images, annotations and the size cache."""

    def __init__(self, dataset: str, image_dir: Path, images: dict, anns: dict) -> None:
        self.dataset = dataset
        self.image_dir = image_dir
        self.images = images
        self.anns = anns
        self.sizes = ImageSizes()


def _holds_files(folder: Path, split_by: str) -> bool:
    return (folder / f"refs({split_by}).p").is_file() and (folder / "instances.json").is_file()


def _find_data_dir(raw: Path, dataset: str) -> Path:
    """The refer ``data/`` folder: RAW itself, ``RAW/data``, or the parent of RAW = ``data/<dataset>/``.

    RAW counts as the dataset folder only under its toolkit name (refcoco and refcoco+ share
    ``refs(unc).p``); a folder holding the files under another name is an error, not a guess.
    """
    folder, split_by, _ = _SPEC[dataset]
    here = Path(os.path.abspath(raw))  # normalises "." and "..", keeps symlinked folders where they are
    if _holds_files(here, split_by):
        if here.name == folder:
            return here.parent
        if not _holds_files(here / folder, split_by):
            detail = (f"{raw} holds refs({split_by}).p and instances.json but is named {here.name!r}, "
                      f"not {folder!r}; refcoco and refcoco+ share these file names, so the dataset "
                      f"folder must be named {folder}/")
            raise missing_data_error(dataset, [raw], layout(dataset), detail=detail)
    return find_root(raw, ("", "data"), lambda p: _holds_files(p / folder, split_by), dataset, layout(dataset))


def _locate(raw: Path, dataset: str) -> tuple[Path, Path]:
    root = _find_data_dir(raw, dataset)
    for sub in _IMAGE_DIRS:
        if (root / sub).is_dir():
            return root, root / sub
    raise missing_data_error(dataset, [root / sub for sub in _IMAGE_DIRS], layout(dataset),
                             detail="found the refs and instances files but no COCO train2014 image folder")


def _sentences(ref: dict) -> list[tuple[int, str]]:
    sents = [(int(s["sent_id"]), s["sent"]) for s in ref["sentences"]]
    return sorted(sents, key=lambda item: item[0])


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _ref_target(ref: dict, ctx: _Ctx) -> tuple[np.ndarray, Path, dict]:
    """The referred annotation's mask, its image path and the annotation; _Skip if unusable."""
    try:
        ann = ctx.anns[int(ref["ann_id"])]
        img = ctx.images[int(ann["image_id"])]
        height, width = int(img["height"]), int(img["width"])
        mask = ann_to_mask(ann["segmentation"], height, width)
    except Exception:
        raise _Skip(UNREADABLE_ANNOTATION) from None
    path = ctx.image_dir / str(img["file_name"])
    try:
        size = ctx.sizes.get(path)
    except ImageError as exc:
        raise _Skip(exc.reason) from None
    if mask.shape != (height, width) or size != (width, height):
        raise _Skip(SIZE_MISMATCH)
    if not mask.any():
        raise _Skip(EMPTY_MASK)
    return mask, path, ann


def _ref_records(ref: dict, split: str, ctx: _Ctx, report: SkipReport) -> list[Record]:
    ref_id = int(ref["ref_id"])
    try:
        sents = _sentences(ref)
    except Exception:
        report.skip(f"{ctx.dataset}-{ref_id}", UNREADABLE_ANNOTATION)
        return []
    ids = [f"{ctx.dataset}-{ref_id}-{sent_id}" for sent_id, _ in sents]
    try:
        mask, path, ann = _ref_target(ref, ctx)
    except _Skip as skip:
        skip_all(report, ids, skip.reason)
        return []
    height, width = mask.shape
    rle, bbox = encode_rle(mask), mask_bbox(mask)
    meta = {"ref_id": ref_id, "ann_id": int(ref["ann_id"]), "image_id": int(ann["image_id"]),
            "category_id": ref.get("category_id", ann.get("category_id"))}
    records = []
    for rid, (sent_id, sent) in zip(ids, sents):
        if not isinstance(sent, str) or not sent.strip():
            report.skip(rid, EMPTY_QUERY)
            continue
        records.append(Record(id=rid, image=resolved(path), width=width, height=height, query=sent.strip(),
                              mask={"size": list(rle["size"]), "counts": rle["counts"]}, bbox=list(bbox),
                              dataset=ctx.dataset, split=split, meta={**meta, "sent_id": sent_id}))
    return records


def _sorted_refs(refs: list, dataset: str, report: SkipReport) -> list[dict]:
    good = []
    for index, ref in enumerate(refs):
        try:
            int(ref["ref_id"])
            ref.get("split")  # a dict, not some other subscriptable
            good.append(ref)
        except Exception:
            report.skip(f"{dataset}-ref#{index}", UNREADABLE_ANNOTATION)
    return sorted(good, key=lambda r: int(r["ref_id"]))


def read_refer(raw: Path, options: dict, dataset: str) -> dict[str, tuple[list[Record], SkipReport]]:
    """Read one refer-layout dataset; returns ``{split: (records, report)}`` for each split found."""
    folder, split_by, known_splits = _SPEC[dataset]
    root, image_dir = _locate(Path(raw), dataset)
    refs = load_refs(root / folder / f"refs({split_by}).p")
    images, anns = _load_instances(root / folder / "instances.json")
    ctx = _Ctx(dataset, image_dir, images, anns)

    orphan = SkipReport()  # refs so broken their split is unknown
    out: dict[str, tuple[list[Record], SkipReport]] = {}
    for ref in _sorted_refs(refs, dataset, orphan):
        split = ref.get("split")
        if not isinstance(split, str):
            orphan.skip(f"{dataset}-{int(ref['ref_id'])}", UNREADABLE_ANNOTATION)
            continue
        if not wanted_split(split, options):
            continue
        records, report = out.setdefault(split, ([], SkipReport()))
        records.extend(_ref_records(ref, split, ctx, report))
    if orphan.n_skipped:
        # A ref too broken to know its split still has to be counted: charge it to the first split.
        first = next(iter(out), None) or (options.get("splits") or known_splits)[0]
        out.setdefault(first, ([], SkipReport()))[1].merge(orphan)
    order = {s: i for i, s in enumerate(known_splits)}
    ordered = sorted(out, key=lambda s: (order.get(s, len(order)), s))
    return {s: finish(*out[s]) for s in ordered}


def read_refcoco(raw: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    return read_refer(raw, options, "refcoco")


def read_refcoco_plus(raw: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    return read_refer(raw, options, "refcoco+")


def read_refcocog(raw: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    return read_refer(raw, options, "refcocog")
