"""The real-data pipelines under pipelines/<setting>/: params build every stage's config, every
`grto` command parses and resolves to the intended config, declared deps/outs match what the
stages read and write, and DVC itself parses each pipeline into the expected stage graph.

Fast: nothing trains, nothing loads a model, no data is needed.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
import subprocess
import sys
import types
import typing
from functools import lru_cache
from pathlib import Path

import pytest
import typer.main
import yaml

from grto_cli.cli import app
from grto_cli.core.data.sources import _REGISTRY as READER_MODULES
from grto_cli.core.answer import parse_answer
from grto_cli.core.trainer import LoraParams
from grto_cli.stages.bootstrap import BootstrapStageConfig
from grto_cli.stages.common import PolicyParams, stage_config
from grto_cli.stages.evaluate import EvaluateConfig
from grto_cli.stages.export import ExportConfig
from grto_cli.stages.prepare import PrepareConfig
from grto_cli.stages.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"

# setting -> the datasets it prepares, the split keys it evaluates the base / trained system on,
# and its stages that are not `grto` commands.
SETTINGS = {
    "refcocog": {"datasets": ["refcocog"], "base": ["test"], "trained": ["val", "test"], "extra": []},
    "reasonseg": {"datasets": ["reasonseg"], "base": ["test"], "trained": ["val", "test"], "extra": []},
    "cod": {"datasets": ["cod10k", "nc4k"], "base": ["cod10k_test", "nc4k_test"],
            "trained": ["cod10k_test", "nc4k_test"], "extra": ["split_val"]},
    "earthreason": {"datasets": ["earthreason"], "base": ["test"], "trained": ["val", "test"], "extra": []},
}

# params.yaml section -> the config class its stage builds from it
SECTION_CONFIGS = {"policy": PolicyParams, "prepare": PrepareConfig, "bootstrap": BootstrapStageConfig,
                   "train": TrainConfig, "export": ExportConfig}
# `grto` command -> (config class, params section); the config is built exactly as the stage's run() does
COMMAND_CONFIGS = {"prepare": (PrepareConfig, "prepare"), "evaluate": (EvaluateConfig, "evaluate"),
                   "bootstrap": (BootstrapStageConfig, "bootstrap"), "train": (TrainConfig, "train"),
                   "export": (ExportConfig, "export")}
POLICY_COMMANDS = {"evaluate", "bootstrap", "train", "export"}

ALL_SETTINGS = sorted(p.parent.name for p in PIPELINES.glob("*/params.yaml"))


def params_path(setting: str) -> str:
    return f"pipelines/{setting}/params.yaml"


def expected_stages(setting: str) -> list[str]:
    s = SETTINGS[setting]
    return ([f"prepare_{d}" for d in s["datasets"]] + s["extra"] + [f"evaluate_base@{k}" for k in s["base"]]
            + ["bootstrap", "train"] + [f"evaluate@{k}" for k in s["trained"]] + ["export"])


def load_params(setting: str) -> dict:
    return yaml.safe_load((ROOT / params_path(setting)).read_text())


# ------------------------------------------------------------------------------- DVC's view


def resolved_stages(setting: str) -> dict:
    return resolved_dvcfile(f"pipelines/{setting}/dvc.yaml")


@lru_cache(maxsize=None)
def resolved_dvcfile(dvcfile: str) -> dict:
    """Stage name -> what DVC resolved (templating, foreach, wdir): cmd, wdir, deps, params, outs."""
    from dvc.repo import Repo

    out = {}
    with Repo(str(ROOT)) as repo:
        for st in repo.stage.collect(dvcfile):
            params = {}
            for dep in st.deps:
                if hasattr(dep, "params"):
                    params[dep.def_path] = list(dep.params or [])
            outs = {o.def_path: {"cache": o.use_cache, "persist": o.persist, "metric": bool(o.metric),
                                 "plot": bool(o.plot)} for o in st.outs}
            deps = [d.def_path for d in st.deps if not hasattr(d, "params")]
            out[st.name] = {"cmd": st.cmd, "wdir": Path(st.wdir).resolve(), "deps": deps, "params": params,
                            "outs": outs}
    return out


@lru_cache(maxsize=None)
def dvc_dag() -> str:
    """`dvc dag --md` of the whole repository: fails on any output declared twice or nested in another."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "dag", "--md"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc dag failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dag_edges(markdown: str) -> set[tuple[str, str]]:
    nodes = dict(re.findall(r'(node\d+)\["([^"]+)"\]', markdown))
    return {(nodes[a], nodes[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", markdown)}


# ---------------------------------------------------------------------------------- params


def test_every_setting_is_there():
    assert ALL_SETTINGS == sorted(SETTINGS)
    for setting in SETTINGS:
        assert (PIPELINES / setting / "dvc.yaml").is_file()


def _check_types(cfg, where: str) -> None:
    """build_config does not check value types: a `1e-5` (a string to PyYAML) would only fail mid-run."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        allowed = typing.get_args(hint) if union else (hint,)
        if value is None:  # `base: null` = no system directory (policy + tool given explicitly)
            assert type(None) in allowed or f.name == "base", f"{where}.{f.name} is null"
            continue
        if dataclasses.is_dataclass(value):
            _check_types(value, f"{where}.{f.name}")
            continue
        plain = {typing.get_origin(a) or a for a in allowed}
        if float in plain:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}.{f.name}={value!r}"
        elif int in plain:
            assert isinstance(value, int) and not isinstance(value, bool), f"{where}.{f.name}={value!r}"
        elif bool in plain:
            assert isinstance(value, bool), f"{where}.{f.name}={value!r}"
        elif str in plain and dict not in plain:
            assert isinstance(value, str), f"{where}.{f.name}={value!r}"


@pytest.mark.parametrize("setting", ALL_SETTINGS)
def test_every_section_builds_its_stage_config(setting):
    path = ROOT / params_path(setting)
    params = load_params(setting)
    assert {"policy", "prepare", "evaluate", "bootstrap", "train", "export", "raw"} <= set(params)
    for section in params:
        if section == "raw":  # dataset -> raw folder, read by dvc.yaml's prepare stages
            assert isinstance(params["raw"], dict) and params["raw"]
            assert set(params["raw"]) == set(SETTINGS[setting]["datasets"])
            assert all(name in READER_MODULES and isinstance(p, str) for name, p in params["raw"].items())
            continue
        cls = EvaluateConfig if section.startswith("evaluate") else SECTION_CONFIGS.get(section)
        assert cls is not None, f"{path}: section {section!r} is read by no stage"
        cfg = stage_config(cls, path, section)
        _check_types(cfg, section)
        if cls is TrainConfig:
            cfg.rl.validate()
            assert cfg.rl.method == "b-grto" and cfg.rl.sampling.group_size == 8
            if cfg.rl.lora is not None:  # unknown LoRA keys must be refused as well
                assert isinstance(cfg.rl.lora, LoraParams)
                _check_types(cfg.rl.lora, "train.lora")


@pytest.mark.parametrize("setting", ALL_SETTINGS)
def test_lora_section_builds_lora_params(setting):
    cfg = stage_config(TrainConfig, ROOT / params_path(setting), "train")
    assert isinstance(cfg.rl.lora, LoraParams)


@pytest.mark.parametrize("setting", ALL_SETTINGS)
def test_prompt_template_formats_and_matches_the_parser(setting):
    pol = stage_config(PolicyParams, ROOT / params_path(setting), "policy")
    assert "{query}" in pol.prompt_template
    text = pol.prompt_template.format(query="the mug nearest the laptop")
    assert '"the mug nearest the laptop"' in text and "{query}" not in text
    assert pol.require_think and "<think>" in text
    # The answer shown in the prompt, with numbers for its placeholders, is what the parser accepts.
    example = [a for a in re.findall(r"<answer>(.*?)</answer>", text) if "bbox" in a][-1]
    numbers = iter(["10", "20", "60", "80", "30", "40", "35", "60"])
    filled = re.sub(r"\b(x1|y1|x2|y2|x|y)\b", lambda m: next(numbers), example)
    parsed = parse_answer(f"<think>it is the mug</think><answer>{filled}</answer>", (100, 100), require_think=True)
    assert parsed.status == "ok" and parsed.call.box == (10.0, 20.0, 60.0, 80.0) and len(parsed.call.points) == 2


# -------------------------------------------------------------------------------- dvc.yaml


def _commands() -> dict:
    group = typer.main.get_command(app)
    return dict(group.commands)


def _parse_grto(cmd: str):
    """`grto <command> ...` -> (command, click params, --set overrides, built config)."""
    tokens = shlex.split(cmd)
    assert tokens[0] == "grto", cmd
    commands = _commands()
    assert tokens[1] in commands, f"unknown grto command in {cmd!r}"
    ctx = commands[tokens[1]].make_context(tokens[1], tokens[2:])  # refuses unknown options, missing args
    kw = dict(ctx.params)
    params, overrides = kw.pop("params"), kw.pop("set_") or []
    kw.pop("fresh", None)  # `grto train --fresh`: what to do with old checkpoints, not a config key
    cls, section = COMMAND_CONFIGS[tokens[1]]
    cfg = stage_config(cls, ROOT / params, section, list(overrides), **kw)
    return tokens[1], params, list(overrides), cfg


@pytest.mark.parametrize("setting", ALL_SETTINGS)
def test_every_command_parses_and_reads_its_own_params(setting):
    stages = resolved_stages(setting)
    extra = set(SETTINGS[setting]["extra"])
    for name, st in stages.items():
        assert st["wdir"] == ROOT, f"{name}: stages must run from the repository root (wdir: ../..)"
        assert all(p == params_path(setting) for p in st["params"]), f"{name} tracks another params file"
        if name in extra:
            assert not st["cmd"].startswith("grto")
            continue
        command, params, overrides, _ = _parse_grto(st["cmd"])
        assert params == params_path(setting), f"{name}: --params {params}"
        assert name.split("@")[0].split("_")[0] == command, f"stage {name} runs `grto {command}`"
        assert all(o.startswith(f"{COMMAND_CONFIGS[command][1]}.") for o in overrides), overrides
        tracked = st["params"].get(params_path(setting), [])
        section = COMMAND_CONFIGS[command][1]
        assert section in tracked or any(t.startswith(section + ".") for t in tracked), f"{name}: {tracked}"
        if command in POLICY_COMMANDS:
            assert "policy" in tracked, f"{name} runs the policy but does not track the policy section"


def _grto_stage(setting: str, name: str):
    st = resolved_stages(setting)[name]
    return st, _parse_grto(st["cmd"])[3]


@pytest.mark.parametrize("setting", ALL_SETTINGS)
def test_declared_paths_match_what_the_stages_read_and_write(setting):
    params = load_params(setting)
    train_st, train = _grto_stage(setting, "train")
    boot_st, boot = _grto_stage(setting, "bootstrap")

    for dataset in SETTINGS[setting]["datasets"]:
        st, cfg = _grto_stage(setting, f"prepare_{dataset}")
        assert cfg.dataset == dataset and cfg.raw == params["raw"][dataset]
        assert cfg.raw in st["deps"] and f"grto_cli/core/data/{READER_MODULES[dataset][0]}.py" in st["deps"]
        assert list(st["outs"]) == [cfg.out] and cfg.out == f"data/prepared/{dataset}"

    # bootstrap: the base system from the external checkpoints (no base directory)
    assert boot.base is None and boot.policy and boot.tool and boot.tool_arch == "vit_h"
    assert {boot.data, boot.policy, boot.tool} <= set(boot_st["deps"])
    assert {boot.out, boot.cache, f"{boot.live}/plots/metrics"} <= set(boot_st["outs"])
    assert boot_st["outs"][f"{boot.live}/plots/metrics"]["plot"]

    # train: b-grto starts from the bootstrapped tool; checkpoints survive DVC for resuming
    assert train.base is None and train.policy == boot.policy and train.tool == boot.tool
    assert train.bootstrap == boot.out and train.data == boot.data
    assert {train.data, train.policy, train.bootstrap} <= set(train_st["deps"])
    assert set(train_st["outs"]) == {train.out, train.checkpoints, f"{train.live}/plots/metrics"}
    ckpt = train_st["outs"][train.checkpoints]
    assert ckpt["persist"] and not ckpt["cache"]
    live = train_st["outs"][f"{train.live}/plots/metrics"]
    assert live["plot"] and not live["cache"]

    # evaluate: the base system on the test split(s), the trained one on val/test; metrics out of the cache
    stages = resolved_stages(setting)
    trained_metrics = []
    for kind in ("base", "trained"):
        for key in SETTINGS[setting][kind]:
            name = f"evaluate_base@{key}" if kind == "base" else f"evaluate@{key}"
            st, cfg = _grto_stage(setting, name)
            assert cfg.out == f"results/{setting}/{kind}/{key}/metrics.json"
            assert st["outs"][cfg.out]["metric"] and not st["outs"][cfg.out]["cache"]
            folder = str(Path(cfg.out).parent)
            assert {f"{folder}/predictions.jsonl", f"{folder}/overlays.png"} <= set(st["outs"])
            assert cfg.data in st["deps"] and cfg.split in ("val", "test")
            assert cfg.split in key and cfg.limit is None  # reported numbers: whole splits
            if kind == "base":
                assert cfg.checkpoint is None and {cfg.policy, cfg.tool} <= set(st["deps"])
            else:  # explicit paths win over --checkpoint: they must be cleared for the trained system
                assert cfg.checkpoint == train.out and cfg.policy is None and cfg.tool is None
                assert train.out in st["deps"]
                trained_metrics.append(cfg.out)

    # export: the trained system, with every trained metrics file in its provenance
    st, export = _grto_stage(setting, "export")
    assert export.checkpoint == train.out and export.checkpoint in st["deps"]
    assert sorted(export.metrics) == sorted(trained_metrics) and set(trained_metrics) <= set(st["deps"])
    assert list(st["outs"]) == [export.out] == [f"bundles/{setting}"]

    # selection on val, never on a test split
    if setting == "cod":
        split_val = stages["split_val"]
        assert train.data in split_val["outs"] and "data/prepared/cod10k" in split_val["deps"]
        assert all(not d.startswith("data/prepared/nc4k") for d in (train.data, boot.data))


def _module_closure(modules: list[str]) -> set[str]:
    """Repository paths of the grto_cli modules that ``modules`` import, transitively, themselves
    included (lazy imports inside functions too). Package ``__init__`` files are left out: they hold
    no behaviour (see test_package_inits_hold_no_code)."""
    seen: set[Path] = set()
    todo = [ROOT / m for m in modules]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grto_cli"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("grto_cli")]
            for name in names:
                candidate = ROOT / Path(*name.split(".")).with_suffix(".py")
                if candidate.is_file():
                    todo.append(candidate)
    return {str(p.relative_to(ROOT)) for p in seen}


def stage_code(cmd: str) -> set[str]:
    """The code a `grto` stage command runs: its stage module's import closure, plus the reader that
    `grto prepare DATASET` picks from the registry by name (an import the AST cannot see)."""
    tokens = shlex.split(cmd)
    command = tokens[1]
    modules = [f"grto_cli/stages/{command}.py"]
    if command == "prepare" and tokens[2] in READER_MODULES:
        modules.append(f"grto_cli/core/data/{READER_MODULES[tokens[2]][0]}.py")
    return _module_closure(modules)


STUDY = "pipelines/study/dvc.yaml"  # the method study on the embedded default (no params file of its own)
DVC_FILES = ["dvc.yaml"] + [f"pipelines/{s}/dvc.yaml" for s in ALL_SETTINGS] + [STUDY]


@pytest.mark.parametrize("dvcfile", DVC_FILES)
def test_code_deps_are_exactly_the_modules_each_stage_runs(dvcfile):
    """A change to any module a stage imports re-runs it, and nothing else does: deps cannot drift."""
    for name, st in resolved_dvcfile(dvcfile).items():
        if not st["cmd"].startswith("grto "):
            continue
        declared = {d for d in st["deps"] if d.startswith("grto_cli/")}
        expected = stage_code(st["cmd"])
        assert declared == expected, (f"{dvcfile}:{name}: missing {sorted(expected - declared)}, "
                                      f"not imported {sorted(declared - expected)}")


def test_package_inits_hold_no_code():
    for init in ROOT.glob("grto_cli/**/__init__.py"):
        body = ast.parse(init.read_text()).body
        allowed = [n for n in body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                   or isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["__version__"]]
        assert body == allowed, f"{init} holds code: stage deps would not track it"


def _all_outs() -> dict[str, str]:
    owners: dict[str, str] = {}
    for setting in ALL_SETTINGS:
        for name, st in resolved_stages(setting).items():
            for out in st["outs"]:
                assert out not in owners, f"{out} is written by {owners[out]} and {setting}:{name}"
                owners[out] = f"{setting}:{name}"
    return owners


def test_outputs_of_settings_never_collide():
    owners = _all_outs()
    for out, owner in owners.items():
        setting = owner.split(":")[0]
        own = {setting} | set(SETTINGS[setting]["datasets"]) | {f"{d}-split" for d in SETTINGS[setting]["datasets"]}
        assert own & set(Path(out).parts), f"{out} ({owner}) does not name its setting or dataset"
    paths = sorted(owners)
    for a in paths:
        for b in paths:
            assert a == b or not b.startswith(a + "/"), f"{b} is inside {a}"
    # ... nor with the embedded default (and DVC agrees: it refuses overlapping outputs repo-wide)
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section in ("prepare", "pretrain", "bootstrap", "train", "export"):
        for key in ("out", "checkpoints", "live", "cache"):
            value = (default.get(section) or {}).get(key)
            if value:
                assert all(not (p == value or p.startswith(value + "/") or value.startswith(p + "/"))
                           for p in paths), f"default {section}.{key}={value} overlaps a pipeline output"
    dvc_dag()


def test_dvc_lists_each_pipeline_with_the_expected_stages():
    proc = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--fail", "--name-only", "-R", "pipelines"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    listed: dict[str, list[str]] = {}
    for line in proc.stdout.split():
        file, name = line.rsplit(":", 1)
        listed.setdefault(file, []).append(name)
    listed.pop(STUDY)  # checked by test_study_*
    assert listed == {f"pipelines/{s}/dvc.yaml": expected_stages(s) for s in ALL_SETTINGS}


@pytest.mark.parametrize("setting", ALL_SETTINGS)
def test_dvc_dag_runs_the_stages_in_order(setting):
    edges = dag_edges(dvc_dag())
    q = f"pipelines/{setting}/dvc.yaml:"
    s = SETTINGS[setting]
    # each evaluation key names its dataset (cod10k_test) or is a split of the setting's one dataset
    dataset_of = {k: next((d for d in s["datasets"] if k.startswith(d + "_")), s["datasets"][0])
                  for k in s["base"] + s["trained"]}
    must = {(q + "bootstrap", q + "train")}
    must |= {(q + f"prepare_{dataset_of[k]}", q + f"evaluate_base@{k}") for k in s["base"]}
    must |= {(q + f"prepare_{dataset_of[k]}", q + f"evaluate@{k}") for k in s["trained"]}
    must |= {(q + "train", q + f"evaluate@{k}") for k in s["trained"]}
    must |= {(q + f"evaluate@{k}", q + "export") for k in s["trained"]} | {(q + "train", q + "export")}
    if setting == "cod":
        must |= {(q + "prepare_cod10k", q + "split_val"), (q + "split_val", q + "bootstrap"),
                 (q + "split_val", q + "train")}
    else:
        must |= {(q + f"prepare_{setting}", q + "bootstrap"), (q + f"prepare_{setting}", q + "train")}
    assert must <= edges, sorted(must - edges)
    # the base evaluation is a side branch: nothing waits for it
    assert not any(a.startswith(q + "evaluate_base@") for a, _ in edges)


def test_docs_cover_every_setting():
    text = (ROOT / "docs" / "pipelines.md").read_text()
    for setting in ALL_SETTINGS:
        assert f"`pipelines/{setting}`" in text
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in text
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in text


# ------------------------------------------------------------------------------- the study


def _option(cmd: str, name: str) -> str:
    tokens = shlex.split(cmd)
    return tokens[tokens.index(name) + 1]


def _sets(cmd: str) -> dict[str, str]:
    tokens = shlex.split(cmd)
    return dict(tokens[i + 1].split("=", 1) for i, t in enumerate(tokens) if t == "--set")


def test_study_runs_every_method_and_seed_where_the_report_reads():
    """The study's commands write exactly where `grto report` reads (its StudyConfig paths)."""
    from grto_cli.stages.report import bootstrap_dir, build_study, run_dir, system_dir

    cfg = build_study(ROOT / "params.yaml")
    stages = resolved_dvcfile(STUDY)
    assert {n for n in stages if n.startswith("train@")} == {f"train@{m}-{s}" for m in cfg.methods for s in cfg.seeds}
    for seed in cfg.seeds:
        boot = stages[f"bootstrap@{seed}"]
        assert _option(boot["cmd"], "--out") == str(bootstrap_dir(cfg, seed))
        assert _sets(boot["cmd"])["bootstrap.seed"] == str(seed)
    for method in cfg.methods:
        for seed in cfg.seeds:
            train = stages[f"train@{method}-{seed}"]
            sets = _sets(train["cmd"])
            assert _option(train["cmd"], "--method") == method and sets["train.seed"] == str(seed)
            assert _option(train["cmd"], "--out") == str(system_dir(cfg, method, seed))
            assert sets["train.live"] == str(run_dir(cfg, method, seed) / "train")
            assert sets["train.bootstrap"] == str(bootstrap_dir(cfg, seed)) in train["deps"]
            # the same RL budget for every method: nothing but method, seed and paths is overridden
            assert set(sets) == {"train.seed", "train.bootstrap", "train.checkpoints", "train.live"}
            for split in cfg.splits:
                ev = stages[f"evaluate@{method}-{seed}-{split}"]
                assert _option(ev["cmd"], "--out") == str(run_dir(cfg, method, seed) / split / "metrics.json")
                assert _option(ev["cmd"], "--checkpoint") == str(system_dir(cfg, method, seed))
    rep = stages["report"]
    assert {cfg.runs, cfg.models, cfg.base} <= set(rep["deps"]) and {cfg.out, cfg.plots} <= set(rep["outs"])


def test_study_starts_from_the_embedded_defaults_base_and_ends_in_the_report():
    edges = dag_edges(dvc_dag())
    q = STUDY + ":"
    assert ("pretrain", q + "bootstrap@0") in edges and ("pretrain", q + "train@grpo-0") in edges
    assert (q + "bootstrap@1", q + "train@b-grto-1") in edges
    assert (q + "train@grto-2", q + "evaluate@grto-2-testB") in edges
    assert (q + "evaluate@b-grto-0-testA", q + "report") in edges
    assert ("evaluate_base@testA", q + "report") in edges


def test_study_charts_list_every_run():
    from grto_cli.stages.report import build_study, run_dir

    cfg = build_study(ROOT / "params.yaml")
    plots = yaml.safe_load((ROOT / STUDY).read_text())["plots"]
    for entry in plots:
        (_, spec), = entry.items()
        files = {f.removeprefix("../../") for f in spec["y"]}  # paths are relative to the dvc.yaml
        metric = next(iter(files)).split("/plots/metrics/")[1]
        assert files == {f"{run_dir(cfg, m, s)}/train/plots/metrics/{metric}" for m in cfg.methods for s in cfg.seeds}
