"""The small run record each stage writes beside its outputs: params, input hashes, versions."""

from __future__ import annotations

import dataclasses
import platform
import sys
from pathlib import Path
from typing import Any

from grto_cli import __version__
from grto_cli.core.io import hash_path, write_json


def versions() -> dict:
    import torch
    import transformers

    return {"grto": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "transformers": str(transformers.__version__)}


def write_run_record(path: str | Path, stage: str, config: Any, inputs: dict[str, str | Path],
                     results: dict | None = None) -> None:
    """A small, deterministic record of how an output was made: params, input hashes, versions."""
    record = {
        "stage": stage,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "params": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
        "inputs": {name: {"path": str(p), "sha256": hash_path(p)} for name, p in inputs.items() if p and Path(p).exists()},
        "versions": versions(),
    }
    if results:
        record["results"] = results
    write_json(path, record)
