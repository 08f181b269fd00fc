"""The embedded default's base system, shipped inside the package (``grto_cli/assets/base``).

`grto pretrain` builds it (the tiny policy's 5,000-step warm-up is most of an hour's CPU on 2
cores, far more than the 10 minutes `dvc repro` may take), and the shipped copy is that output,
with its run record. `grto pretrain` uses it only when it was built from the very config and
training data asked for (``mismatches``); anything else is trained from scratch. A test fails when
params.yaml's `pretrain` section no longer matches what the shipped base records.
"""

from __future__ import annotations

import json
from pathlib import Path

from grto_cli.core.io import hash_path

SHIPPED_BASE = Path(__file__).resolve().parents[1] / "assets" / "base"
# What decides the base's weights. Paths (data, out, live) and `parallel` (the tool's warm-up in a
# second process, with the same seed and steps) do not.
PRETRAIN_KEYS = ("seed", "vlm", "sft", "sam")
POLICY_KEYS = ("prompt_template", "require_think", "coord_convention", "min_pixels", "max_pixels")


def shipped_record(base: Path = SHIPPED_BASE) -> dict | None:
    """The shipped base's run record (`grto pretrain`'s run.json), or None if none is shipped."""
    path = base / "run.json"
    return json.loads(path.read_text()) if path.is_file() else None


def mismatches(record: dict | None, pretrain: dict, policy: dict, train_manifest: Path) -> list[str]:
    """Why the shipped base is not what this pretrain would build: each differing key as
    ``section.key: shipped X, asked Y``, and the training data's hash. Empty: it is.

    >>> rec = {"params": {"pretrain": {"seed": 0, "vlm": {}, "sft": {"steps": 5}, "sam": {}},
    ...                   "policy": {"prompt_template": "t"}}, "inputs": {}}
    >>> mismatches(rec, {"seed": 0, "vlm": {}, "sft": {"steps": 9}, "sam": {}, "out": "x"},
    ...            {"prompt_template": "t"}, Path("missing.jsonl"))
    ['pretrain.sft: shipped {"steps": 5}, asked {"steps": 9}', 'train data: the shipped base records no hash of it']
    """
    if record is None:
        return ["no base is shipped with this grto"]
    out = []
    for section, keys, asked in (("pretrain", PRETRAIN_KEYS, pretrain), ("policy", POLICY_KEYS, policy)):
        shipped = record["params"].get(section, {})
        for key in keys:
            a, b = shipped.get(key), asked.get(key)
            if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
                out.append(f"{section}.{key}: shipped {json.dumps(a, sort_keys=True)}, asked {json.dumps(b, sort_keys=True)}")
    recorded = record.get("inputs", {}).get("train_manifest", {}).get("sha256")
    if recorded is None:
        out.append("train data: the shipped base records no hash of it")
    elif not train_manifest.is_file() or hash_path(train_manifest) != recorded:
        out.append(f"train data: {train_manifest} is not the manifest the shipped base was trained on")
    return out
