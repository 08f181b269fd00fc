"""The normalised record and its JSONL manifest.

One record per (image, query, target mask). ``image`` is a path; a relative path is resolved
against the directory that holds the manifest, so a prepared dataset can be moved as a whole.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
from PIL import Image

from grto_cli.core.data.masks import Rle, decode_rle, encode_rle, mask_bbox
from grto_cli.core.io import write_jsonl

RECORD_FIELDS = ("id", "image", "width", "height", "query", "mask", "bbox", "dataset", "split")
# meta key of a record's query kind, where its dataset has kinds (synthetic: attribute, relation, ...);
# `grto evaluate` breaks its metrics down by it.
QUERY_KIND = "query_kind"
# meta key of a deliberate no-target sample (EarthReason's, kept with `prepare.keep_empty`): its mask
# is empty and it is scored by LISA's rule (an empty prediction on an empty target has IoU 1).
EMPTY_TARGET = "empty_target"
# meta key of a synthetic record drawn in a look other than plain (`prepare.look`: camo)
LOOK = "look"
OnError = Literal["skip", "fail"]


@dataclass
class Record:
    id: str
    image: str
    width: int
    height: int
    query: str
    mask: Rle
    bbox: list[float]
    dataset: str
    split: str
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["meta"]:
            del d["meta"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        missing = [k for k in RECORD_FIELDS if k not in d]
        if missing:
            raise ValueError(f"missing fields {missing}")
        return cls(**{k: d[k] for k in RECORD_FIELDS}, meta=d.get("meta", {}))

    def image_path(self, root: str | Path) -> Path:
        p = Path(self.image)
        return p if p.is_absolute() else Path(root) / p

    def decode_mask(self) -> np.ndarray:
        return decode_rle(self.mask)

    @property
    def empty_target(self) -> bool:
        return bool(self.meta.get(EMPTY_TARGET))


class DataError(RuntimeError):
    """Bad input that the user must fix: names the path and what was expected."""


@dataclass
class SkipReport:
    """What a reader read: records kept and, by reason, the ids it skipped."""

    kept: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, record_id: str, reason: str) -> None:
        self.skipped.setdefault(reason, []).append(record_id)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in sorted(self.skipped.items())}

    def to_dict(self) -> dict:
        return {"kept": self.kept, "skipped": self.n_skipped, "skipped_by_reason": self.counts(),
                "skipped_ids": {k: v for k, v in sorted(self.skipped.items())}}

    def merge(self, other: "SkipReport") -> None:
        self.kept += other.kept
        for reason, ids in other.skipped.items():
            self.skipped.setdefault(reason, []).extend(ids)


def validate_record(record: Record, root: str | Path, check_image: bool = True) -> str | None:
    """Return the reason the record is unusable, or None when it is valid."""
    try:
        mask = record.decode_mask()
    except Exception as exc:  # pycocotools raises plain ValueError/TypeError on garbage
        return f"bad mask RLE ({exc})"
    if mask.shape != (record.height, record.width):
        return f"mask size {list(mask.shape)} != image size {[record.height, record.width]}"
    if not mask.any() and not record.empty_target:
        return "empty mask"
    if mask.any() and record.empty_target:
        return f"mask marked {EMPTY_TARGET} is not empty"
    if not isinstance(record.query, str) or not record.query.strip():
        return "empty query"
    if check_image:
        path = record.image_path(root)
        if not path.is_file():
            return f"missing image {path}"
        try:
            with Image.open(path) as im:
                im.verify()
                size = im.size
        except Exception as exc:
            return f"unreadable image {path} ({exc.__class__.__name__})"
        if size != (record.width, record.height):
            return f"image size {list(size)} != record size {[record.width, record.height]}"
    return None


def write_manifest(path: str | Path, records: Iterable[Record]) -> int:
    rows = [r.to_dict() for r in records]
    write_jsonl(path, rows)
    return len(rows)


def read_manifest(path: str | Path, on_error: OnError = "fail", check_images: bool = True
                  ) -> tuple[list[Record], SkipReport]:
    """Read and validate every record of a JSONL manifest.

    Bad records are reported by id: with ``on_error="fail"`` the first pass collects all of them
    and raises one DataError listing them; with ``"skip"`` they are dropped and counted.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path} (expected a JSONL file written by `grto prepare`, "
                        f"one record per line with fields {', '.join(RECORD_FIELDS)})")
    root = path.parent
    records: list[Record] = []
    report = SkipReport()
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = Record.from_dict(json.loads(line))
            except Exception as exc:
                report.skip(f"{path.name}:{line_no}", f"unparsable record ({exc})")
                continue
            reason = validate_record(record, root, check_image=check_images)
            if reason is None:
                records.append(record)
            else:
                report.skip(record.id, reason)
    report.kept = len(records)
    if report.n_skipped and on_error == "fail":
        lines = [f"  {rid}: {reason}" for reason, ids in report.skipped.items() for rid in ids[:20]]
        raise DataError(f"{report.n_skipped} bad record(s) in {path}:\n" + "\n".join(lines))
    return records, report


def record_from_mask(record_id: str, image: str, query: str, mask: np.ndarray, dataset: str, split: str,
                     meta: dict | None = None) -> Record:
    """Build a record from a decoded mask, deriving size, RLE and bbox from it."""
    h, w = mask.shape
    return Record(id=record_id, image=image, width=int(w), height=int(h), query=query,
                  mask=encode_rle(mask), bbox=mask_bbox(mask), dataset=dataset, split=split,
                  meta=dict(meta or {}))

