"""Registry of raw-data readers and the helpers they share.

A reader turns one dataset's published on-disk layout into normalised records:
``reader(raw, options) -> {split: (records, SkipReport)}``. Readers never raise on a single bad
item: they skip it and record why (by the item's own id) so the stage can report or, with
``--strict``, fail. They raise ``DataError`` only when the raw data as a whole is missing or laid
out differently from what the dataset publishes; that message names the path looked at and the
expected layout.

Reader modules are imported lazily so that importing the registry stays cheap and the reader
modules can import the helpers below without an import cycle.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image

from grto_cli.core.data.masks import encode_rle, mask_bbox
from grto_cli.core.data.records import EMPTY_TARGET, DataError, Record, SkipReport

ReaderFn = Callable[[Path, dict], dict[str, tuple[list[Record], SkipReport]]]

# Skip reasons: fixed strings so that SkipReport counts group cleanly across items.
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
MISSING_MASK = "missing mask"
UNREADABLE_MASK = "unreadable mask"
EMPTY_MASK = "empty mask"
MISSING_ANNOTATION = "missing annotation"
UNREADABLE_ANNOTATION = "unreadable annotation"
SIZE_MISMATCH = "size mismatch"
EMPTY_QUERY = "empty query"
DUPLICATE_ID = "duplicate id"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# name -> (module under grto_cli.core.data, function)
_REGISTRY: dict[str, tuple[str, str]] = {
    "refcoco": ("refer", "read_refcoco"),
    "refcoco+": ("refer", "read_refcoco_plus"),
    "refcocog": ("refer", "read_refcocog"),
    "reasonseg": ("reasonseg", "read_reasonseg"),
    "cod10k": ("cod", "read_cod10k"),
    "nc4k": ("cod", "read_nc4k"),
    "earthreason": ("earthreason", "read_earthreason"),
    "custom": ("custom", "read_custom"),
}


def _lazy_reader(module: str, func: str) -> ReaderFn:
    def reader(raw: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
        mod = importlib.import_module(f"grto_cli.core.data.{module}")
        return getattr(mod, func)(Path(raw), options)

    reader.__name__ = func
    reader.__qualname__ = func
    return reader


READERS: dict[str, ReaderFn] = {name: _lazy_reader(mod, fn) for name, (mod, fn) in _REGISTRY.items()}


def read_source(name: str, raw: Path, options: dict) -> dict[str, tuple[list[Record], SkipReport]]:
    """Read dataset ``name`` from its raw layout under ``raw``; see the module docstring."""
    if name not in READERS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(READERS))}")
    options = dict(options or {})
    if isinstance(options.get("splits"), str):
        options["splits"] = [options["splits"]]
    result = READERS[name](Path(raw), options)
    wanted = options.get("splits")
    if wanted:
        missing = [s for s in wanted if s not in result]
        if missing:
            raise DataError(f"{name}: split(s) {missing} not found under {Path(raw)}; "
                            f"found: {sorted(result) or 'none'}")
    return result


# ---------------------------------------------------------------------------------------------
# Layout helpers


def missing_data_error(dataset: str, looked_at: Iterable[Path], layout: str, detail: str = "") -> DataError:
    """The one error a reader raises when the raw data is absent or laid out differently."""
    places = "\n".join(f"  {p}" for p in looked_at)
    extra = f"{detail}\n" if detail else ""
    return DataError(f"{dataset}: raw data not found; looked at:\n{places}\n{extra}"
                     f"expected layout under RAW:\n{layout.rstrip()}")


def find_root(raw: Path, subdirs: Sequence[str], is_root: Callable[[Path], bool], dataset: str,
              layout: str) -> Path:
    """First of ``raw / sub`` (in order) that ``is_root`` accepts, else a DataError with the layout.

    Lets users point RAW at the dataset folder itself or at the folder that holds it.
    """
    candidates = [raw / sub if sub else raw for sub in subdirs]
    for cand in candidates:
        if cand.is_dir() and is_root(cand):
            return cand
    raise missing_data_error(dataset, candidates, layout)


def wanted_split(split: str, options: dict) -> bool:
    splits = options.get("splits")
    if isinstance(splits, str):  # a lone name, not a string of characters to test membership in
        splits = [splits]
    return not splits or split in splits


def list_files(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """Map file stem -> path for plain, non-hidden files with one of ``extensions`` (any case).

    Stray files (``.DS_Store``, ``Thumbs.db``, ``readme.txt``) fall outside the extensions or are
    hidden, so they are ignored rather than reported as bad items. When two files share a stem,
    the first extension in ``extensions`` wins, so the choice does not depend on directory order.
    """
    found: dict[str, Path] = {}
    rank = {ext: i for i, ext in enumerate(extensions)}
    for path in sorted(folder.iterdir()):
        ext = path.suffix.lower()
        if path.name.startswith(".") or ext not in rank or not path.is_file():
            continue
        prev = found.get(path.stem)
        if prev is None or rank[ext] < rank[prev.suffix.lower()]:
            found[path.stem] = path
    return dict(sorted(found.items()))


def pair_by_stem(parts: dict[str, dict[str, Path]], dataset: str, split: str,
                 report: SkipReport) -> Iterator[str]:
    """Stems present in every one of ``parts`` (skip reason -> stem -> path), in sorted order.

    A stem missing from some part is skipped as ``{dataset}-{split}-{stem}`` with the reason of
    the first part (in ``parts`` order) that lacks it. A generator, so these skips interleave with
    the caller's own per-item skips in stem order.
    """
    stems: set[str] = set()
    for files in parts.values():
        stems |= set(files)
    for stem in sorted(stems):
        missing = next((reason for reason, files in parts.items() if stem not in files), None)
        if missing is not None:
            report.skip(f"{dataset}-{split}-{stem}", missing)
            continue
        yield stem


# ---------------------------------------------------------------------------------------------
# Item helpers


class ImageError(DataError):
    """A single image is missing or does not decode; ``reason`` is the skip reason."""

    def __init__(self, path: Path, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))
        self.path = path
        self.reason = reason


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image, after checking that the whole file decodes.

    ``verify()``/the header alone accept truncated files; ``load()`` decodes every pixel, so a
    half-downloaded JPEG is caught here rather than in the middle of training.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, MISSING_IMAGE)
    try:
        with Image.open(path) as im:
            im.load()
            return int(im.size[0]), int(im.size[1])
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageError(path, UNREADABLE_IMAGE, exc.__class__.__name__) from exc


class ImageSizes:
    """Per-reader cache of ``image_size`` results (refer datasets hold many refs per image)."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[int, int] | str] = {}

    def get(self, path: Path) -> tuple[int, int]:
        if path not in self._cache:
            try:
                self._cache[path] = image_size(path)
            except ImageError as exc:
                self._cache[path] = exc.reason
        value = self._cache[path]
        if isinstance(value, str):
            raise ImageError(path, value)
        return value


def read_gray(path: Path) -> np.ndarray | None:
    """An 8-bit single-channel image as the COD/SOD evaluation code reads it, or None."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    # imdecode (not imread) so a path with non-ASCII characters still reads on every platform.
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


def resolved(path: Path) -> str:
    return str(path.resolve())


def skip_all(report: SkipReport, ids: Iterable[str], reason: str) -> None:
    for rid in ids:
        report.skip(rid, reason)


def finish(records: list[Record], report: SkipReport) -> tuple[list[Record], SkipReport]:
    report.kept = len(records)
    return records, report


def query_subset(n: int, options: dict) -> range:
    """Indices of the queries to keep: all, or only the first (what LISA/SegEarth-R1 evaluate)."""
    return range(min(n, 1)) if options.get("first_query_only") else range(n)


def image_size_or_skip(image: Path, ids: Iterable[str], report: SkipReport) -> tuple[int, int] | None:
    """``image_size(image)``, or None after skipping every id in ``ids`` with the image's reason."""
    try:
        return image_size(image)
    except ImageError as exc:
        skip_all(report, ids, exc.reason)
        return None


def queries_on_image(base: str, n_queries: int, image: Path, options: dict,
                     report: SkipReport) -> tuple[dict[int, str], int, int] | None:
    """(ids, width, height) for an image asked ``n_queries`` queries, or None if the image is bad.

    ``ids`` maps each query index that ``query_subset`` keeps to its record id ``{base}-{k}``; a
    missing or unreadable image skips all of them.
    """
    ids = {k: f"{base}-{k}" for k in query_subset(n_queries, options)}
    size = image_size_or_skip(image, ids.values(), report)
    if size is None:
        return None
    return ids, size[0], size[1]


def records_per_query(mask: np.ndarray, queries: Sequence, ids: dict[int, str], report: SkipReport, *,
                      image: Path, width: int, height: int, dataset: str, split: str,
                      meta: dict | None = None, keep_empty: bool = False) -> list[Record]:
    """One record per query index in ``ids`` (index -> record id), all on one image and mask.

    An empty mask skips every id, unless ``keep_empty``: then each becomes an empty-target record
    (meta ``empty_target: true``, box [0, 0, 0, 0]). An empty or non-string query skips its own id.
    Each record's meta is ``meta`` plus its ``query_index``.
    """
    empty = not mask.any()
    if empty and not keep_empty:
        skip_all(report, ids.values(), EMPTY_MASK)
        return []
    rle, bbox = encode_rle(mask), mask_bbox(mask)
    meta = {**(meta or {}), EMPTY_TARGET: True} if empty else meta
    records = []
    for k, rid in ids.items():
        query = queries[k]
        if not isinstance(query, str) or not query.strip():
            report.skip(rid, EMPTY_QUERY)
            continue
        records.append(Record(id=rid, image=resolved(image), width=width, height=height, query=query.strip(),
                              mask=dict(rle), bbox=list(bbox), dataset=dataset, split=split,
                              meta={**(meta or {}), "query_index": k}))
    return records
