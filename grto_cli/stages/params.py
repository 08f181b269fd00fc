"""A stage's params: the params file (``--params``, ./params.yaml, or grto's packaged defaults),
``--set`` overrides dotted from its top, and each section built into its config type, checked
before anything loads. A command reads its params once (``Params``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from grto_cli.core.project import packaged_params
from grto_cli.stages.console import console

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


class Params:
    """A run's params, read once: the params file with its ``--set`` overrides applied; each stage
    takes its sections from it (``section``)."""

    def __init__(self, path: str | Path | None, overrides: list[str] | None = None):
        self.data = apply_overrides(load_params(path), overrides)

    def section(self, cls: type[T], section: str, **explicit: Any) -> T:
        """A section as its config type: the file's values, overridden, then explicit CLI options.
        A config with a ``validate()`` method is checked here, before a stage loads anything.
        ``section`` may be dotted (``train.rewards``: a sub-section another stage shares)."""
        data: Any = self.data
        for part in section.split("."):
            data = data.get(part) if isinstance(data, dict) else None
        data = dict(data or {})
        for key, value in explicit.items():
            if value is not None:
                data[key] = value
        cfg = build_config(cls, data, section)
        try:
            getattr(cfg, "validate", lambda: None)()
        except ValueError as exc:
            raise ConfigError(f"{section}: {exc}") from None
        return cfg


def stage_config(cls: type[T], params_path: str | Path | None, section: str, overrides: list[str] | None = None,
                 **explicit: Any) -> T:
    """One section of a params file (for a command that needs no other)."""
    return Params(params_path, overrides).section(cls, section, **explicit)
