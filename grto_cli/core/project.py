"""The project layout `grto init` writes: one template per setting, shipped inside the package.

A project is a folder with ``params.yaml`` + ``dvc.yaml`` (from ``grto_cli/templates/<setting>/``),
a ``.gitignore`` for the pipeline outputs, and ``.grto/install.yaml``: where grto is installed on
this machine. Every stage of a template depends on ``${grto_package}/__init__.py``, the file that
holds grto's version, so installing another version re-runs the stages; the project needs none of
grto's source files. ``install.yaml`` is machine-specific (kept out of git) and rewritten by every
``grto init`` in the folder, which also writes any template file that is missing and never
overwrites one that is there unless told to.
"""

from __future__ import annotations

from pathlib import Path

import grto_cli
from grto_cli.core.io import write_text

SETTINGS = ("synthetic", "refcocog", "reasonseg", "cod", "earthreason")
DEFAULT_SETTING = "synthetic"
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
TEMPLATE_FILES = ("params.yaml", "dvc.yaml")
INSTALL_FILE = Path(".grto") / "install.yaml"  # the `vars` file every template's dvc.yaml reads
PACKAGE_VAR = "grto_package"
VERSION_DEP = f"${{{PACKAGE_VAR}}}/__init__.py"  # a template stage's code dependency
# Pipeline outputs are DVC's, not git's (DVC adds each cached output too; these cover the rest).
GITIGNORE = ("/data/", "/models/", "/results/", "/rollouts/", "/checkpoints/", "/bundles/", "/raw/", "/.grto/")


def template_dir(setting: str) -> Path:
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    return TEMPLATES / setting


def packaged_params(setting: str = DEFAULT_SETTING) -> Path:
    """The params a command uses where there is no params.yaml: the setting's template."""
    return template_dir(setting) / "params.yaml"


def package_dir() -> Path:
    """The installed grto_cli package (its ``__init__.py`` holds the version)."""
    return Path(grto_cli.__file__).resolve().parent


def install_record() -> str:
    return (f"# Written by `grto init` (grto {grto_cli.__version__}): where grto is installed on this machine.\n"
            f"# Every stage of dvc.yaml depends on {VERSION_DEP}, the file that holds grto's version,\n"
            f"# so installing another version re-runs the stages. Kept out of git: after moving this project\n"
            f"# or its Python environment, run `grto init` here again (it rewrites only this file and what is missing).\n"
            f"{PACKAGE_VAR}: {package_dir()}\n")


def write_project(root: Path, setting: str, force: bool = False) -> dict[str, str]:
    """Write the setting's project files into ``root``; file -> what happened to it."""
    source = template_dir(setting)
    root.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    for name in TEMPLATE_FILES:
        target, text = root / name, (source / name).read_text()
        if target.exists() and not force:
            done[name] = "kept (same as the template)" if target.read_text() == text else "kept (yours; --force replaces it)"
            continue
        done[name] = "replaced" if target.exists() else "written"
        write_text(target, text)
    gitignore = root / ".gitignore"
    have = gitignore.read_text().splitlines() if gitignore.exists() else []
    missing = [line for line in GITIGNORE if line not in have]
    if missing:
        head = "\n".join(have).rstrip("\n")
        write_text(gitignore, (head + "\n" if head else "") + "# pipeline outputs and this machine's grto record (grto init)\n"
               + "\n".join(missing) + "\n")
        done[".gitignore"] = f"{len(missing)} entries added"
    else:
        done[".gitignore"] = "kept"
    install = root / INSTALL_FILE
    write_text(install, install_record())
    done[str(INSTALL_FILE)] = "written"
    return done

