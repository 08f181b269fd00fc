"""What every stage shares: its config from params.yaml (+ command-line overrides), device choice,
progress bars, the end-of-stage summary table and the small run record."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeVar

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from grto_cli import __version__
from grto_cli.core.answer import COORD_CONVENTIONS, DEFAULT_TEMPLATE, check_template
from grto_cli.core.config import check_choice
from grto_cli.core.data.records import Record, read_manifest
from grto_cli.core.io import hash_path, write_json
from grto_cli.core.project import packaged_params
from grto_cli.core.tool import DEFAULT_CACHE_BYTES, DEFAULT_ENCODE_BATCH

console = Console(stderr=True)
DTYPES = ("auto", "float32", "bfloat16", "float16")
T = TypeVar("T")


class ConfigError(ValueError):
    """A params file or override that does not fit the stage's config."""


DEFAULT_PARAMS = "params.yaml"
_told: set[Path] = set()  # packaged-defaults notes already printed by this process


def resolve_params(path: str | Path | None) -> Path:
    """The params file a command reads: ``--params`` if given; else ./params.yaml; else the packaged
    defaults of the embedded default (said once, with the file's path)."""
    if path is not None:
        return Path(path)
    if Path(DEFAULT_PARAMS).is_file():
        return Path(DEFAULT_PARAMS)
    packaged = packaged_params()
    if packaged not in _told:
        _told.add(packaged)
        console.print(f"no {DEFAULT_PARAMS} here: using grto's packaged defaults ({packaged}); "
                      f"`grto init` writes a project of your own")
    return packaged


def load_params(path: str | Path | None) -> dict:
    path = resolve_params(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (run from the project root, or pass --params PATH)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of stage sections")
    return data


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """``section.key=value`` pairs, dotted from the top of params.yaml; values are parsed as YAML."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (dotted keys for nesting)")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


FLAT = {"flat": True}  # field metadata: a nested config whose keys sit at its parent's level


def _flat_fields(cls) -> dict[str, str]:
    """key -> the FLAT field of ``cls`` that owns it."""
    hints = typing.get_type_hints(cls)
    owners = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("flat"):
            owners.update({k.name: f.name for k in dataclasses.fields(hints[f.name])})
    return owners


def _as(value: Any, kind: type) -> tuple[bool, Any]:
    """(fits, value) for one plain type; a YAML 1.1 float written without a dot (``1e-5``, which
    PyYAML reads as a string) counts as a float, and an int as a float where a float is wanted."""
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    origin = typing.get_origin(kind) or kind
    if isinstance(origin, type):
        return isinstance(value, origin), value
    return True, value  # Any, Literal, ...: not checked here


def typed_value(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the field's type asks, or a ConfigError naming the key, the value and the type.
    A mapping given to a dataclass field (or an ``X | None`` one, e.g. train.lora) is built into it."""
    if hint is None or hint is Any:
        return value
    args = typing.get_args(hint)
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = [a for a in args if a is not type(None)] if is_union else [hint]
    if value is None:
        if is_union and type(None) in args:
            return None
        raise ConfigError(f"{name}: expected {_type_name(hint)}, got null")
    for kind in options:
        if dataclasses.is_dataclass(kind):
            if isinstance(value, dict):
                return build_config(kind, value, name)
            continue
        fits, converted = _as(value, kind)
        if fits:
            return converted
    raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def build_config(cls: type[T], data: dict, where: str = "") -> T:
    """Build a (nested) dataclass from a mapping, refusing unknown keys by name.

    A field with ``metadata=FLAT`` is a dataclass composed in whose keys are written at this level
    (``train.method`` fills ``TrainConfig.rl.method``), so params files stay flat.
    """
    hints = typing.get_type_hints(cls)
    flat = _flat_fields(cls)
    names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("flat")}
    unknown = sorted(set(data) - names - set(flat))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or cls.__name__}; known: {sorted(names | set(flat))}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in flat:
            continue
        kwargs[key] = typed_value(value, hints.get(key), f"{where}.{key}" if where else key)
    for name in set(flat.values()):
        part = {k: v for k, v in data.items() if flat.get(k) == name}
        kwargs[name] = build_config(hints[name], part, where)
    return cls(**kwargs)


def stage_config(cls: type[T], params_path: str | Path | None, section: str, overrides: list[str] | None = None,
                 **explicit: Any) -> T:
    """The stage's config: params.yaml section, then ``--set`` overrides, then explicit CLI options.
    A config with a ``validate()`` method is checked here, before a stage loads anything."""
    params = apply_overrides(load_params(params_path), overrides)
    data = dict(params.get(section) or {})
    for key, value in explicit.items():
        if value is not None:
            data[key] = value
    cfg = build_config(cls, data, section)
    try:
        getattr(cfg, "validate", lambda: None)()
    except ValueError as exc:
        raise ConfigError(f"{section}: {exc}") from None
    return cfg


@dataclasses.dataclass
class PolicyParams:
    """The ``policy`` section every stage that runs the policy shares."""

    prompt_template: str = DEFAULT_TEMPLATE
    require_think: bool = False  # format reward/parse demands <think>...</think> before <answer>
    coord_convention: str | None = None  # None: by model family (absolute for Qwen2.5-VL)
    trust_remote_code: bool = False
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU (train: float32 for a full fine-tune)
    # Bounds on an image's area after the processor's resize (Qwen: one visual token per 28x28
    # pixels); null keeps the checkpoint's processor config (Qwen2.5-VL: up to ~16k tokens).
    min_pixels: int | None = None
    max_pixels: int | None = None

    def validate(self) -> None:
        try:
            check_template(self.prompt_template)
        except ValueError as exc:
            raise ConfigError(f"policy.prompt_template: {exc}") from None
        check_choice("coord_convention", self.coord_convention, (None, *COORD_CONVENTIONS))
        check_choice("dtype", self.dtype, DTYPES)
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ConfigError(f"policy.min_pixels ({self.min_pixels}) > policy.max_pixels ({self.max_pixels})")


def policy_params(params_path: str | Path | None, overrides: list[str] | None = None) -> PolicyParams:
    return stage_config(PolicyParams, params_path, "policy", overrides)


@dataclasses.dataclass
class ToolParams:
    """The ``tool`` section: how SAM's image encoder runs, shared by every stage that runs the tool."""
    encode_batch: int = DEFAULT_ENCODE_BATCH  # images per encoder pass (ViT-H at 1024²: ~3 GB each)
    cache_bytes: int = DEFAULT_CACHE_BYTES  # CPU memory for cached embeddings (ViT-H: 4 MiB per image)
    cache_dir: str | None = None  # also keep embeddings on disk here (re-used across runs)

    def validate(self) -> None:
        if self.encode_batch < 1 or self.cache_bytes < 0:
            raise ConfigError(f"tool.encode_batch must be >= 1 and tool.cache_bytes >= 0, got "
                              f"{self.encode_batch} and {self.cache_bytes}")


def tool_params(params_path: str | Path | None, overrides: list[str] | None = None) -> ToolParams:
    return stage_config(ToolParams, params_path, "tool", overrides)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def join_processes(device: str = "auto"):
    """This invocation's processes (``core.distributed.Processes``): the launcher's when started by
    ``accelerate launch`` / torchrun, else a lone process. Processes other than the main one print
    nothing (one progress bar, one summary)."""
    from grto_cli.core.distributed import Processes

    processes = Processes.from_environment(cpu=not pick_device(device).startswith("cuda"))
    console.quiet = not processes.is_main
    return processes


def process_device(device: str, processes) -> str:
    """The device a stage runs on: the launcher's GPU for this process when several share a machine."""
    chosen = pick_device(device)
    if processes.distributed and chosen.startswith("cuda"):
        return str(processes.device)
    return chosen


def pick_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def cpu_threads() -> int:
    """This process's share of the CPU: ``OMP_NUM_THREADS`` when set (a launcher such as
    ``accelerate launch`` sets it per process), else every core the process may run on."""
    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested.isdigit() and int(requested) > 0:
        return int(requested)
    available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, len(available))


def set_threads() -> None:
    """Torch's intra-op threads: this process's share of the CPU (two trainings side by side that
    each took every core ran 10x slower each on the 2-core machine)."""
    import torch

    torch.set_num_threads(cpu_threads())


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


LOG_EVERY_S = 30.0  # where the console is no terminal (a log file, DVC, a batch job): a line this often


@contextmanager
def progress_bar(description: str, total: int, log_every: float = LOG_EVERY_S,
                 clock: typing.Callable[[], float] = time.monotonic) -> Iterator[typing.Callable[[int], None]]:
    """A rich progress bar; yields ``advance(n, info)`` (``completed=k`` sets the count instead).
    Where the console is no terminal, rich draws nothing until the end, so a plain line
    (``description k/total, elapsed, info``) is printed at most every ``log_every`` seconds, and
    after the first and the last update: a killed job's log still says how far it got."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    started = clock()
    last_line = [None]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "", completed: int | None = None) -> None:
            if completed is not None:
                progress.update(task, completed=completed, info=info)
            else:
                progress.update(task, advance=n, info=info)
            if console.is_terminal:
                return
            now, done = clock(), int(progress.tasks[0].completed)
            if last_line[0] is None or now - last_line[0] >= log_every or done >= total:
                last_line[0] = now
                console.print(f"{description} {done}/{total}, {now - started:.0f} s" + (f", {info}" if info else ""),
                              highlight=False, markup=False)

        yield advance


def summary_table(title: str, row: dict) -> None:
    table = Table(title=title)
    for key in row:
        table.add_column(str(key))
    table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()])
    console.print(table)


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
        "params": to_dict(config) if dataclasses.is_dataclass(config) else config,
        "inputs": {name: {"path": str(p), "sha256": hash_path(p)} for name, p in inputs.items() if p and Path(p).exists()},
        "versions": versions(),
    }
    if results:
        record["results"] = results
    write_json(path, record)


def training_records(manifest: Path) -> list[Record]:
    """A manifest's records for RL or the bootstrap: empty-target records (kept by `prepare.keep_empty`)
    are left out, since the answer format has no "nothing here" call to reward; evaluation keeps them."""
    records, _ = read_manifest(manifest)
    kept = [r for r in records if not r.empty_target]
    if len(kept) < len(records):
        console.print(f"{manifest}: {len(records) - len(kept)} empty-target record(s) left out of training")
    return kept
