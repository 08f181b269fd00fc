"""`grto init`, the packaged defaults, `grto --version` and `python -m grto_cli`: grto as an installed tool."""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import grto_cli
from grto_cli.cli import app
from grto_cli.core.project import (GITIGNORE, INSTALL_FILE, PACKAGE_VAR, SETTINGS, TEMPLATE_TOOLS, TEMPLATES,
                                   package_dir)
from grto_cli.stages import params as common
from grto_cli.stages.console import console
from grto_cli.stages.prepare import PrepareConfig

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)


def _init(*args: str):
    result = runner.invoke(app, ["init", *args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("setting", SETTINGS)
def test_init_writes_a_project_dvc_reads(tmp_path, setting):
    root = tmp_path / "demo"
    _init(str(root), "--setting", setting)
    for name in ("params.yaml", "dvc.yaml"):
        assert (root / name).read_text() == (TEMPLATES / setting / name).read_text()
    assert yaml.safe_load((root / INSTALL_FILE).read_text()) == {PACKAGE_VAR: str(package_dir())}
    assert set(GITIGNORE) <= set((root / ".gitignore").read_text().splitlines())
    assert (root / ".dvc").is_dir() and (shutil.which("git") is None or (root / ".git").is_dir())
    proc = _dvc(root, "stage", "list", "--fail", "--name-only")
    assert proc.returncode == 0 and "train" in proc.stdout.split(), proc.stderr


def test_init_again_keeps_your_files_and_refreshes_the_install_record(tmp_path):
    _init(str(tmp_path))
    params = tmp_path / "params.yaml"
    params.write_text(params.read_text().replace("sft: {steps: 5000", "sft: {steps: 7"))
    (tmp_path / INSTALL_FILE).write_text(f"{PACKAGE_VAR}: /moved/away\n")
    result = _init(str(tmp_path))
    assert "steps: 7" in params.read_text() and "yours" in result.output
    assert yaml.safe_load((tmp_path / INSTALL_FILE).read_text())[PACKAGE_VAR] == str(package_dir())
    assert (tmp_path / ".gitignore").read_text().count("/models/") == 1
    _init(str(tmp_path), "--force")
    assert params.read_text() == (TEMPLATES / "synthetic" / "params.yaml").read_text()


def test_init_inside_another_dvc_project_is_a_project_of_its_own(tmp_path):
    """Its stages stay out of the outer project's `dvc status` (`dvc init --subdir`)."""
    outer = tmp_path / "outer"
    _init(str(outer))
    _init(str(outer / "runs" / "cod"), "--setting", "cod")
    assert (outer / "runs" / "cod" / ".dvc").is_dir()
    proc = _dvc(outer, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "prepare" in json.loads(proc.stdout) and not any("cod" in k for k in json.loads(proc.stdout))


def test_init_refuses_an_unknown_setting(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path), "--setting", "coco"])
    assert result.exit_code == 2 and "coco" in result.output and "refcocog" in result.output
    assert not (tmp_path / "params.yaml").exists()


def _swap(node, old, new):
    """The template's params with every value ``old`` maps replaced by ``new``'s."""
    if isinstance(node, dict):
        return {k: _swap(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_swap(v, old, new) for v in node]
    return {old.file: new.file, old.arch: new.arch}.get(node, node) if isinstance(node, str) else node


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s != "synthetic"])
def test_init_with_sam2_points_every_stage_at_it_and_changes_nothing_else(tmp_path, setting):
    """`--tool sam2.1_hiera_l`: Meta's SAM2.1-L file and arch in every stage that reads the tool and in
    dvc.yaml's deps, the tool section sized for SAM2's three cached levels; nothing else differs."""
    old, new = TEMPLATE_TOOLS["vit_h"], TEMPLATE_TOOLS["sam2.1_hiera_l"]
    root = tmp_path / "demo"
    _init(str(root), "--setting", setting, "--tool", "sam2.1_hiera_l")
    text = {name: (root / name).read_text() for name in ("params.yaml", "dvc.yaml")}
    template = {name: (TEMPLATES / setting / name).read_text() for name in text}
    assert not any(s in t for t in text.values() for s in (old.file, "vit_h", "ViT-H"))
    for name in text:
        assert text[name].count(new.file) == template[name].count(old.file) > 0, name
    params, expected = yaml.safe_load(text["params.yaml"]), _swap(yaml.safe_load(template["params.yaml"]), old, new)
    assert params["tool"]["cache_bytes"] == 4 * 2**30 and params["tool"]["encode_batch"] == 8
    expected["tool"] = params["tool"]
    assert params == expected  # the same sections and values but the tool's
    for section in ("evaluate", "bootstrap", "train"):
        assert (params[section]["tool"], params[section]["tool_arch"]) == (new.file, "sam2.1_hiera_l"), section
    proc = _dvc(root, "stage", "list", "--fail", "--name-only")
    assert proc.returncode == 0 and "train" in proc.stdout.split(), proc.stderr


def test_init_refuses_a_tool_for_the_embedded_default_and_an_unknown_one(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path), "--tool", "sam2.1_hiera_l"])
    assert result.exit_code == 2 and "pretrain.tool_kind" in result.output
    result = runner.invoke(app, ["init", str(tmp_path), "--setting", "cod", "--tool", "vit_x"])
    assert result.exit_code == 2 and "vit_x" in result.output and "sam2.1_hiera_l" in result.output
    assert not (tmp_path / "params.yaml").exists()


def test_a_stage_reruns_when_the_installed_grto_version_changes(tmp_path):
    """The project's code dep is the installed package's version file, followed through .grto/install.yaml."""
    if shutil.which("grto") is None:
        pytest.skip("the grto console script is not on PATH")
    site, tmp_path = tmp_path / "site", tmp_path / "demo"
    _init(str(tmp_path))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["prepare"]["sizes"] = {"train": 4, "val": 2, "testA": 2, "testB": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    fake = site / "grto_cli"  # stands in for the installed package: only its version file is read
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.1.0"\n')
    (tmp_path / INSTALL_FILE).write_text(f"{PACKAGE_VAR}: {fake}\n")
    proc = _dvc(tmp_path, "repro", "prepare")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prepare" not in json.loads(_dvc(tmp_path, "status", "--json", "prepare").stdout)
    (fake / "__init__.py").write_text('__version__ = "0.2.0"\n')
    changed = json.loads(_dvc(tmp_path, "status", "--json", "prepare").stdout)
    assert str(fake / "__init__.py") in json.dumps(changed["prepare"])


def test_commands_without_a_params_file_use_the_packaged_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common, "_told", set())
    with console.capture() as said:
        cfg = common.stage_config(PrepareConfig, None, "prepare")
        common.stage_config(PrepareConfig, None, "prepare")
    packaged = yaml.safe_load((TEMPLATES / "synthetic" / "params.yaml").read_text())["prepare"]
    assert cfg.sizes == packaged["sizes"] and cfg.image_size == packaged["image_size"]
    text = said.get()
    assert text.count("packaged defaults") == 1 and "synthetic" in text and "grto init" in text
    # a params.yaml in the folder wins, and says nothing
    (tmp_path / "params.yaml").write_text("prepare: {image_size: 32}\n")
    with console.capture() as said:
        assert common.stage_config(PrepareConfig, None, "prepare").image_size == 32
    assert said.get() == ""
    # an explicit --params that does not exist is an error, not the defaults
    with pytest.raises(common.ConfigError, match="nope.yaml"):
        common.stage_config(PrepareConfig, "nope.yaml", "prepare")


def test_version_and_python_m():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"grto {grto_cli.__version__}"
    proc = subprocess.run([sys.executable, "-m", "grto_cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == f"grto {grto_cli.__version__}", proc.stderr
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "grto_cli.__version__"}


def test_every_template_file_ships_in_the_package():
    """pyproject's package-data globs cover every file under grto_cli/templates (a wheel built
    without them would make `grto init` fail after `pip install`)."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["grto_cli"]
    files = [str(p.relative_to(ROOT / "grto_cli")) for p in TEMPLATES.rglob("*") if p.is_file()
             and "__pycache__" not in p.parts]
    assert sorted({p.parent.name for p in TEMPLATES.glob("*/dvc.yaml")}) == sorted(SETTINGS)
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), files
