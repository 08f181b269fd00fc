"""EarthReason (SegEarth-R1, arXiv 2504.09644) in its published layout.

Per split, three folders matched by file stem, as the official SegEarth-R1 loaders read them
(``segearth_r1/train/train_dataset.py``, ``segearth_r1/eval_and_test/eval_dataset/RS_val_dataset.py``):

    RSReasonSeg/<split>/images/<name>.jpg   (or .jpeg / .png)
    RSReasonSeg/<split>/labels/<name>.png   nonzero = target
    RSReasonSeg/<split>/QAs/<name>.json     {"questions": [...], "answer": [...]}

One record per question. Samples whose label is empty (the dataset's deliberate "no target"
cases, with an empty ``answer`` list) are skipped as "empty mask", or, with the ``keep_empty``
option (``prepare.keep_empty``), kept as empty-target records that evaluation scores by LISA's
rule (an empty prediction on an empty target has IoU 1) and counts (``n_empty_targets``).
"""

from __future__ import annotations

import json
from pathlib import Path

from grto_cli.core.data.records import Record, SkipReport
from grto_cli.core.data.sources import (MISSING_ANNOTATION, MISSING_IMAGE, MISSING_MASK, SIZE_MISMATCH,
                                        UNREADABLE_ANNOTATION, UNREADABLE_MASK, find_root, finish, list_files,
                                        missing_data_error, pair_by_stem, queries_on_image, read_gray,
                                        records_per_query, skip_all, wanted_split)

SPLITS = ("train", "val", "test")
LAYOUT = ("  <split>/images/<name>.jpg   (.jpg/.jpeg/.png)\n"
          "  <split>/labels/<name>.png   (nonzero = target)\n"
          "  <split>/QAs/<name>.json     ({\"questions\": [...], \"answer\": [...]})\n"
          "  for <split> in train, val, test\n"
          "(RAW is the RSReasonSeg/ folder, or a folder holding RSReasonSeg/ or rs_reason_seg/RSReasonSeg/)")
_PARTS = ("images", "labels", "QAs")


def _split_base(root: Path, split: str) -> Path | None:
    """The folder holding images/labels/QAs for ``split``.

    Besides ``<split>/images``, accept ``<split>/<split>/images``: unpacking the per-split
    archives into a folder of the same name nests them one level deeper.
    """
    for base in (root / split, root / split / split):
        if (base / "images").is_dir():
            return base
    return None


def _parts(root: Path, split: str, base: Path) -> tuple[Path, Path, Path]:
    found = []
    for part in _PARTS:
        # The nested case sometimes leaves labels/QAs at the outer level; take whichever exists.
        options = [base / part, root / split / part]
        hit = next((p for p in options if p.is_dir()), None)
        if hit is None:
            raise missing_data_error("earthreason", options, LAYOUT,
                                     detail=f"found {base / 'images'} but not its {part}/ folder")
        found.append(hit)
    return found[0], found[1], found[2]


def _load_questions(path: Path) -> list:
    data = json.loads(path.read_text(encoding="utf-8"))
    questions = data["questions"]
    if isinstance(questions, str):
        questions = [questions]
    if not isinstance(questions, list) or not questions:
        raise ValueError("questions must be a non-empty list")
    return questions


def _item_records(split: str, stem: str, image: Path, label: Path, qa: Path, options: dict,
                  report: SkipReport) -> list[Record]:
    base = f"earthreason-{split}-{stem}"
    try:
        questions = _load_questions(qa)
    except Exception:
        report.skip(base, UNREADABLE_ANNOTATION)
        return []
    found = queries_on_image(base, len(questions), image, options, report)
    if found is None:
        return []
    ids, width, height = found
    gray = read_gray(label)
    if gray is None:
        skip_all(report, ids.values(), UNREADABLE_MASK)
        return []
    mask = gray != 0  # SegEarth-R1: mask[mask != 0] = 1
    if mask.shape != (height, width):
        skip_all(report, ids.values(), SIZE_MISMATCH)
        return []
    return records_per_query(mask, questions, ids, report, image=image, width=width, height=height,
                             dataset="earthreason", split=split, keep_empty=bool(options.get("keep_empty")))


def read_split(root: Path, split: str, base: Path, options: dict) -> tuple[list[Record], SkipReport]:
    image_dir, label_dir, qa_dir = _parts(root, split, base)
    images = list_files(image_dir, (".jpg", ".jpeg", ".png"))
    labels = list_files(label_dir, (".png",))
    qas = list_files(qa_dir, (".json", ".txt"))
    records: list[Record] = []
    report = SkipReport()
    for stem in pair_by_stem({MISSING_IMAGE: images, MISSING_MASK: labels, MISSING_ANNOTATION: qas},
                             "earthreason", split, report):
        records.extend(_item_records(split, stem, images[stem], labels[stem], qas[stem], options, report))
    return finish(records, report)


def read_earthreason(raw: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    """Read every EarthReason split found under ``raw``; see the module docstring for the layout."""
    root = find_root(Path(raw), ("", "RSReasonSeg", "rs_reason_seg/RSReasonSeg", "EarthReason"),
                     lambda p: any(_split_base(p, s) for s in SPLITS), "earthreason", LAYOUT)
    out = {}
    for split in SPLITS:
        base = _split_base(root, split)
        if base is not None and wanted_split(split, options):
            out[split] = read_split(root, split, base, options)
    return out
