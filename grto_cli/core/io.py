"""Atomic writes (a reader never sees a half-written output or checkpoint) and content hashes.

Temporary files and directories are created private (``mkstemp``/``mkdtemp`` give 0600/0700 and
ignore the umask); before one is renamed into place it gets the permissions a plain write would
have given it (0666/0777 less the umask), so outputs are as readable as the user's umask says.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def plain_permissions(path: Path) -> None:
    """Give a file or directory the mode a plain ``open``/``mkdir`` would have: 0666/0777 less the umask."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            plain_permissions(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; swap it in for ``path`` only if the block succeeds.

    The old directory (if any) is moved aside first and removed after the swap, so at every
    instant either the old or the new complete directory exists under ``path``'s name or its
    ``.old`` sibling.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        plain_permissions(tmp)
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def recover_dir(path: str | Path) -> Path:
    """Undo a swap that `atomic_dir` was killed in the middle of: if ``path`` is gone but its
    ``.old`` sibling survived, put it back. Leftover temporary siblings are removed."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        os.replace(old, path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp") if path.parent.exists() else []:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def hash_path(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a directory's files (relative names + contents), in sorted order.

    Files over 64 MiB are hashed by size and their first and last MiB, so hashing a 7B checkpoint
    stays cheap; that is enough to tell checkpoints apart for provenance and resume keys.
    """
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with f.open("rb") as fh:
            if size <= 64 << 20:
                for block in iter(lambda: fh.read(chunk), b""):
                    h.update(block)
            else:
                h.update(fh.read(chunk))
                fh.seek(-chunk, os.SEEK_END)
                h.update(fh.read(chunk))
    return h.hexdigest()
