"""`grto init`: a ready project (params.yaml, dvc.yaml, .gitignore) for one setting, from the templates
shipped inside the package; `git init` and `dvc init` where the folder has neither."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from grto_cli.core.config import check_choice
from grto_cli.core.project import DEFAULT_TEMPLATE_TOOL, SETTINGS, TEMPLATE_TOOLS, write_project
from grto_cli.stages.console import console, summary_table
from grto_cli.stages.params import ConfigError


def _git_root(root: Path) -> Path | None:
    """The top of the git work tree ``root`` is in; None outside one (or without git)."""
    if shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
    return Path(proc.stdout.strip()).resolve() if proc.returncode == 0 else None


def _inside_dvc(root: Path) -> bool:
    return any((parent / ".dvc").is_dir() for parent in [root, *root.parents])


def _call(cmd: list[str], root: Path) -> None:
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"`{' '.join(cmd)}` failed in {root}:\n{proc.stdout}{proc.stderr}")


def run(directory: str, setting: str, force: bool = False, tool: str = DEFAULT_TEMPLATE_TOOL) -> dict[str, str]:
    root = Path(directory).resolve()
    try:
        check_choice("--setting", setting, SETTINGS)
        check_choice("--tool", tool, tuple(TEMPLATE_TOOLS))
        if root.exists() and not root.is_dir():
            raise ValueError(f"init: {root} exists and is not a folder")
        done = write_project(root, setting, force=force, tool=tool)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    git_root = _git_root(root)
    if git_root is None:
        if shutil.which("git") is None:
            done["git"] = "not installed: no repository made"
        else:
            _call(["git", "init", "-q"], root)
            done["git"] = "git init"
            git_root = root
    if (root / ".dvc").is_dir():
        done["dvc"] = "already a DVC project"
    else:
        # Inside another DVC project (or below a git root), a nested project keeps its own status:
        # `dvc status` of the outer one never lists this one's stages.
        nested = _inside_dvc(root) or (git_root is not None and git_root != root)
        cmd = [sys.executable, "-m", "dvc", "init", "-q"] + (["--subdir"] if nested else [])
        if git_root is None:
            cmd.append("--no-scm")
        _call(cmd, root)
        done["dvc"] = " ".join(["dvc init"] + cmd[5:])
    if tool != DEFAULT_TEMPLATE_TOOL:
        done["tool"] = f"{TEMPLATE_TOOLS[tool].name}: {TEMPLATE_TOOLS[tool].file} (tool_arch {tool})"
        if tool.startswith("sam2") and importlib.util.find_spec("sam2") is None:
            console.print(f"[yellow]note:[/yellow] {TEMPLATE_TOOLS[tool].name} runs through Meta's sam2 package, "
                          f"not installed here: pip install 'grto[sam2]'")
    summary_table(f"grto init ({setting})", done)
    console.print(f"next: cd {directory} && dvc repro" + ("" if setting == "synthetic" else
                  "   (first fill in params.yaml's raw: paths and the checkpoints; see its comments)"))
    return done
