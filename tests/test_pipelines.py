"""The pipelines: the project templates `grto init` writes (grto_cli/templates/<setting>/), the
repository's own embedded default (dvc.yaml, the synthetic template run with source-file deps) and
the method study (pipelines/study, its own DVC project). Params build every stage's config, every
`grto` command parses and resolves to the intended config, declared deps/outs match what the stages
read and write, code deps are exact, and DVC itself parses each pipeline into the expected graph.
The real settings are checked as DVC sees them in a project `grto init` made.

Fast: nothing trains, nothing loads a model, no data is needed.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
import subprocess
import sys
import tempfile
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
from grto_cli.core.project import TEMPLATES, package_dir, write_project
from grto_cli.core.trainer import LoraParams
from grto_cli.stages.bootstrap import BootstrapStageConfig
from grto_cli.stages.params import stage_config
from grto_cli.stages.sections import PolicyParams, ToolParams
from grto_cli.stages.evaluate import EvaluateConfig
from grto_cli.stages.export import ExportConfig
from grto_cli.stages.prepare import PrepareConfig
from grto_cli.stages.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
STUDY_DIR = ROOT / "pipelines" / "study"  # the method study: a DVC project of its own
VERSION_FILE = str(package_dir() / "__init__.py")  # a template stage's one code dep

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
SECTION_CONFIGS = {"policy": PolicyParams, "tool": ToolParams, "prepare": PrepareConfig, "bootstrap": BootstrapStageConfig,
                   "train": TrainConfig, "export": ExportConfig}
# `grto` command -> (config class, params section); the config is built exactly as the stage's run() does
COMMAND_CONFIGS = {"prepare": (PrepareConfig, "prepare"), "evaluate": (EvaluateConfig, "evaluate"),
                   "bootstrap": (BootstrapStageConfig, "bootstrap"), "train": (TrainConfig, "train"),
                   "export": (ExportConfig, "export")}
POLICY_COMMANDS = {"evaluate", "bootstrap", "train", "export"}
TOOL_COMMANDS = {"evaluate", "bootstrap", "train"}  # export loads the system on the CPU with the tool's defaults

ALL_SETTINGS = sorted(p.parent.name for p in TEMPLATES.glob("*/params.yaml") if p.parent.name != "synthetic")
_PROJECTS = tempfile.TemporaryDirectory(prefix="grto-projects-")


@lru_cache(maxsize=None)
def project(setting: str) -> Path:
    """A project `grto init --setting <setting>` would write (files + `dvc init`; git is not needed)."""
    root = Path(_PROJECTS.name) / setting
    write_project(root, setting)
    # In a subprocess: in-process, DVC's logger may still hold a stream an earlier test's capture closed.
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=root, check=True)
    return root


def params_path(setting: str) -> Path:
    return TEMPLATES / setting / "params.yaml"


def expected_stages(setting: str) -> list[str]:
    s = SETTINGS[setting]
    return ([f"prepare_{d}" for d in s["datasets"]] + s["extra"] + [f"evaluate_base@{k}" for k in s["base"]]
            + ["bootstrap", "train"] + [f"evaluate@{k}" for k in s["trained"]] + ["export"])


def load_params(setting: str) -> dict:
    return yaml.safe_load(params_path(setting).read_text())


# ------------------------------------------------------------------------------- DVC's view


def resolved_stages(setting: str) -> dict:
    return resolved_dvcfile(project(setting))


@lru_cache(maxsize=None)
def resolved_dvcfile(root: Path, dvcfile: str = "dvc.yaml") -> dict:
    """Stage name -> what DVC resolved (templating, foreach, wdir): cmd, wdir, deps, params, outs."""
    from dvc.repo import Repo

    out = {}
    with Repo(str(root)) as repo:
        for st in repo.stage.collect(str(root / dvcfile)):
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
def dvc_dag(root: Path = ROOT) -> str:
    """`dvc dag --md` of a whole project: fails on any output declared twice or nested in another."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "dag", "--md"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc dag failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dag_edges(markdown: str) -> set[tuple[str, str]]:
    nodes = dict(re.findall(r'(node\d+)\["([^"]+)"\]', markdown))
    return {(nodes[a], nodes[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", markdown)}


# ---------------------------------------------------------------------------------- params


def test_every_setting_is_there():
    from grto_cli.core.project import SETTINGS as INIT_SETTINGS

    assert ALL_SETTINGS == sorted(SETTINGS) == sorted(set(INIT_SETTINGS) - {"synthetic"})
    for setting in INIT_SETTINGS:
        assert (TEMPLATES / setting / "dvc.yaml").is_file()


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
    path = params_path(setting)
    params = load_params(setting)
    assert {"policy", "tool", "prepare", "evaluate", "bootstrap", "train", "export", "raw"} <= set(params)
    for section in params:
        if section == "raw":  # dataset -> raw folder, read by dvc.yaml's prepare stages
            assert isinstance(params["raw"], dict) and params["raw"]
            assert set(params["raw"]) == set(SETTINGS[setting]["datasets"])
            assert all(name in READER_MODULES and isinstance(p, str) for name, p in params["raw"].items())
            continue
        if section == "launch":  # the command prefix of dvc.yaml's bootstrap, train and evaluate stages
            assert params["launch"] == "grto"
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
    cfg = stage_config(TrainConfig, params_path(setting), "train")
    assert isinstance(cfg.rl.lora, LoraParams)


@pytest.mark.parametrize("setting", ALL_SETTINGS)
def test_prompt_template_formats_and_matches_the_parser(setting):
    pol = stage_config(PolicyParams, params_path(setting), "policy")
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


def _parse_grto(cmd: str, root: Path):
    """`grto <command> ...` run in ``root`` -> (command, --params, --set overrides, built config)."""
    tokens = shlex.split(cmd)
    assert tokens[0] == "grto", cmd
    commands = _commands()
    assert tokens[1] in commands, f"unknown grto command in {cmd!r}"
    ctx = commands[tokens[1]].make_context(tokens[1], tokens[2:])  # refuses unknown options, missing args
    kw = dict(ctx.params)
    params, overrides = kw.pop("params"), kw.pop("set_") or []
    kw.pop("fresh", None)  # `grto train --fresh`: what to do with old checkpoints, not a config key
    cls, section = COMMAND_CONFIGS[tokens[1]]
    cfg = stage_config(cls, root / (params or "params.yaml"), section, list(overrides), **kw)
    return tokens[1], params, list(overrides), cfg


@pytest.mark.parametrize("setting", ALL_SETTINGS)
def test_every_command_parses_and_reads_its_own_params(setting):
    stages = resolved_stages(setting)
    extra = set(SETTINGS[setting]["extra"])
    root = project(setting)
    for name, st in stages.items():
        assert st["wdir"] == root, f"{name}: stages run in the project folder"
        assert all(p == "params.yaml" for p in st["params"]), f"{name} tracks another params file"
        if name in extra:
            assert not st["cmd"].startswith("grto")
            continue
        command, params, overrides, _ = _parse_grto(st["cmd"], root)
        assert params is None, f"{name}: --params {params} (a project's commands read its params.yaml)"
        assert name.split("@")[0].split("_")[0] == command, f"stage {name} runs `grto {command}`"
        assert all(o.startswith(f"{COMMAND_CONFIGS[command][1]}.") for o in overrides), overrides
        tracked = st["params"].get("params.yaml", [])
        section = COMMAND_CONFIGS[command][1]
        assert section in tracked or any(t.startswith(section + ".") for t in tracked), f"{name}: {tracked}"
        if command in POLICY_COMMANDS:
            assert "policy" in tracked, f"{name} runs the policy but does not track the policy section"
        if command in TOOL_COMMANDS:
            assert "tool" in tracked, f"{name} runs the tool but does not track the tool section"


def _grto_stage(setting: str, name: str):
    st = resolved_stages(setting)[name]
    return st, _parse_grto(st["cmd"], project(setting))[3]


@pytest.mark.parametrize("setting", ALL_SETTINGS)
def test_declared_paths_match_what_the_stages_read_and_write(setting):
    params = load_params(setting)
    train_st, train = _grto_stage(setting, "train")
    boot_st, boot = _grto_stage(setting, "bootstrap")

    for dataset in SETTINGS[setting]["datasets"]:
        st, cfg = _grto_stage(setting, f"prepare_{dataset}")
        assert cfg.dataset == dataset and cfg.raw == params["raw"][dataset]
        assert cfg.raw in st["deps"] and VERSION_FILE in st["deps"]
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


def _code_deps(root: Path, prefix: str = "") -> dict[str, tuple[set[str], set[str]]]:
    """Stage -> (declared grto_cli deps, the modules its command runs) for a dvc.yaml whose code deps
    are source files (``prefix``: the path from its stages' folder to the repository root)."""
    out = {}
    for name, st in resolved_dvcfile(root).items():
        if st["cmd"].startswith("grto "):
            declared = {d.removeprefix(prefix) for d in st["deps"]
                        if d.removeprefix(prefix).startswith("grto_cli/") and d.endswith(".py")}
            out[name] = (declared, stage_code(st["cmd"]))
    return out


@pytest.mark.parametrize("root,prefix", [(ROOT, ""), (STUDY_DIR, "../../")], ids=["dvc.yaml", "study"])
def test_code_deps_are_exactly_the_modules_each_stage_runs(root, prefix):
    """A change to any module a stage imports re-runs it, and nothing else does: deps cannot drift."""
    for name, (declared, expected) in _code_deps(root, prefix).items():
        assert declared == expected, (f"{root}:{name}: missing {sorted(expected - declared)}, "
                                      f"not imported {sorted(declared - expected)}")


@pytest.mark.parametrize("setting", ALL_SETTINGS + ["synthetic"])
def test_a_projects_code_dep_is_the_installed_grto_version(setting):
    """A project `grto init` made has none of grto's sources: each `grto` stage depends on the
    installed package's version file instead, so a new grto version re-runs it."""
    root = project(setting)
    for name, st in resolved_dvcfile(root).items():
        code = [d for d in st["deps"] if "grto_cli" in d]
        assert code == ([VERSION_FILE] if st["cmd"].startswith("grto ") else []), f"{setting}:{name}: {code}"


def _without_code_deps(stages: dict) -> dict:
    return {name: {**st, "deps": [d for d in st["deps"] if "grto_cli" not in d], "wdir": None}
            for name, st in stages.items()}


def test_the_synthetic_template_is_the_repositorys_embedded_default():
    """One source: `grto init` writes the root params.yaml as is, and the root dvc.yaml's stages but for
    their code deps (source files here, the installed version there)."""
    assert (TEMPLATES / "synthetic" / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()
    assert _without_code_deps(resolved_dvcfile(project("synthetic"))) == _without_code_deps(resolved_dvcfile(ROOT))
    plots = [yaml.safe_load(f.read_text())["plots"] for f in (ROOT / "dvc.yaml", TEMPLATES / "synthetic" / "dvc.yaml")]
    assert plots[0] == plots[1]


def test_the_root_projects_status_is_the_embedded_default_alone():
    """`dvc status` in a fresh clone lists the root dvc.yaml's stages only: the templates are
    .dvcignore'd and the study is a project of its own."""
    import json

    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # a template's dvc.yaml here would fail: its vars file is absent
    listed = set(json.loads(proc.stdout or "{}"))
    assert listed <= set(resolved_dvcfile(ROOT)), sorted(listed - set(resolved_dvcfile(ROOT)))


def test_package_inits_hold_no_code():
    for init in ROOT.glob("grto_cli/**/__init__.py"):
        body = ast.parse(init.read_text()).body
        allowed = [n for n in body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                   or isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["__version__"]]
        assert body == allowed, f"{init} holds code: stage deps would not track it"


def test_outputs_name_their_setting_and_never_nest():
    for setting in ALL_SETTINGS:
        paths = sorted(out for st in resolved_stages(setting).values() for out in st["outs"])
        own = {setting} | set(SETTINGS[setting]["datasets"]) | {f"{d}-split" for d in SETTINGS[setting]["datasets"]}
        for out in paths:
            assert own & set(Path(out).parts), f"{setting}: {out} does not name its setting or dataset"
        assert len(paths) == len(set(paths))
        dvc_dag(project(setting))  # DVC refuses an output declared twice or nested in another


def test_dvc_lists_each_pipeline_with_the_expected_stages():
    for setting in ALL_SETTINGS:
        proc = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--fail", "--name-only"],
                              cwd=project(setting), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == expected_stages(setting)


@pytest.mark.parametrize("setting", ALL_SETTINGS)
def test_dvc_dag_runs_the_stages_in_order(setting):
    edges = dag_edges(dvc_dag(project(setting)))
    q = ""
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
        assert f"--setting {setting}" in text
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in text
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in text


# ------------------------------------------------------------------------------- the study


def _option(cmd: str, name: str) -> str:
    tokens = shlex.split(cmd)
    return tokens[tokens.index(name) + 1]


def _sets(cmd: str) -> dict[str, str]:
    tokens = shlex.split(cmd)
    return dict(tokens[i + 1].split("=", 1) for i, t in enumerate(tokens) if t == "--set")


def study_config():
    from grto_cli.stages.report import build_study

    return build_study(STUDY_DIR / "params.yaml")


def test_study_runs_every_method_and_seed_where_the_report_reads():
    """The study's commands write exactly where `grto report` reads (its StudyConfig paths), and every
    run reads the root params.yaml: the same `train` budget for each method."""
    from grto_cli.stages.report import bootstrap_dir, last_system_dir, run_dir, system_dir

    cfg = study_config()
    root = yaml.safe_load((ROOT / "params.yaml").read_text())
    up = "../../"  # the study's folder -> the repository root
    stages = resolved_dvcfile(STUDY_DIR)
    assert {n for n in stages if n.startswith("train@")} == {f"train@{m}-{s}" for m in cfg.methods for s in cfg.seeds}
    for name, st in stages.items():
        if name != "report":
            assert _option(st["cmd"], "--params") == up + "params.yaml", name
            assert set(st["params"]) == {up + "params.yaml"}, name
    for seed in cfg.seeds:
        boot = stages[f"bootstrap@{seed}"]
        sets = _sets(boot["cmd"])
        assert _option(boot["cmd"], "--out") == str(bootstrap_dir(cfg, seed))
        assert sets["bootstrap.seed"] == str(seed)
        assert sets["bootstrap.data"] == up + root["bootstrap"]["data"] and sets["bootstrap.base"] == up + root["bootstrap"]["base"]
    for method in cfg.methods:
        for seed in cfg.seeds:
            train = stages[f"train@{method}-{seed}"]
            sets = _sets(train["cmd"])
            assert _option(train["cmd"], "--method") == method and sets["train.seed"] == str(seed)
            assert _option(train["cmd"], "--out") == str(system_dir(cfg, method, seed))
            assert sets["train.live"] == str(run_dir(cfg, method, seed) / "train")
            assert sets["train.bootstrap"] == str(bootstrap_dir(cfg, seed)) in train["deps"]
            # the root pipeline's data and base system, seen from the study's folder
            assert sets["train.data"] == up + root["train"]["data"] in train["deps"]
            assert sets["train.base"] == up + root["train"]["base"] in train["deps"]
            # the same RL budget for every method: nothing but method, seed and paths is overridden
            assert set(sets) == {"train.seed", "train.data", "train.base", "train.bootstrap", "train.checkpoints",
                                 "train.live", "train.last_out"}
            assert sets["train.last_out"] == str(last_system_dir(cfg, method, seed)) in train["outs"]
            for split in cfg.splits:
                ev = stages[f"evaluate@{method}-{seed}-{split}"]
                assert _option(ev["cmd"], "--out") == str(run_dir(cfg, method, seed) / split / "metrics.json")
                assert _option(ev["cmd"], "--checkpoint") == str(system_dir(cfg, method, seed))
                assert _option(ev["cmd"], "--data") == up + root["prepare"].get("out", "data/prepared/synthetic")
                last = stages[f"evaluate_last@{method}-{seed}-{split}"]  # the report's (last) rows
                assert _option(last["cmd"], "--out") == str(run_dir(cfg, method, seed) / "last" / split / "metrics.json")
                assert _option(last["cmd"], "--checkpoint") == str(last_system_dir(cfg, method, seed)) in last["deps"]
    rep = stages["report"]
    assert {cfg.runs, cfg.models, cfg.base, cfg.data} <= set(rep["deps"]) and {cfg.out, cfg.plots} <= set(rep["outs"])
    assert cfg.base == up + "results/base" and cfg.data == up + root["train"]["data"]


def test_study_starts_from_the_embedded_defaults_base_and_ends_in_the_report():
    """The root pipeline writes what the study starts from; inside the study, runs feed the report."""
    root_outs = {o for st in resolved_dvcfile(ROOT).values() for o in st["outs"]}
    study = resolved_dvcfile(STUDY_DIR)
    outside = {d.removeprefix("../../") for st in study.values() for d in st["deps"]
               if d.startswith("../../") and not d.startswith("../../grto_cli/")}
    assert outside == {"data/prepared/synthetic", "models/base", "results/base"}
    assert {"data/prepared/synthetic", "models/base"} <= root_outs
    assert {f"results/base/{s}/metrics.json" for s in study_config().splits} <= root_outs
    edges = dag_edges(dvc_dag(STUDY_DIR))
    assert ("bootstrap@1", "train@b-grto-1") in edges
    assert ("train@grto-2", "evaluate@grto-2-testB") in edges
    assert ("evaluate@b-grto-0-testA", "report") in edges


def test_study_charts_list_every_run():
    from grto_cli.stages.report import run_dir

    cfg = study_config()
    plots = yaml.safe_load((STUDY_DIR / "dvc.yaml").read_text())["plots"]
    for entry in plots:
        (_, spec), = entry.items()
        files = set(spec["y"])  # paths relative to the study's folder
        metric = next(iter(files)).split("/plots/metrics/")[1]
        assert files == {f"{run_dir(cfg, m, s)}/train/plots/metrics/{metric}" for m in cfg.methods for s in cfg.seeds}
