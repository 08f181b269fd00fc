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

import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TemplateTool:
    """A real tool the real settings' templates can run: Meta's official file under checkpoints/,
    its tool arch, its name in the comments, and the ``tool:`` section sized for it (None: the
    templates' own, written for ViT-H)."""

    file: str
    arch: str
    name: str
    section: str | None = None


# The templates are written for ViT-H; `grto init --tool` swaps in another (docs/pipelines.md, "The
# tool", gives each one's encode cost and memory).
TEMPLATE_TOOLS = {
    "vit_h": TemplateTool("checkpoints/sam_vit_h_4b8939.pth", "vit_h", "SAM ViT-H"),
    "sam2.1_hiera_l": TemplateTool(
        "checkpoints/sam2.1_hiera_large.pt", "sam2.1_hiera_l", "SAM2.1 Hiera-L",
        "tool:                         # SAM2.1 Hiera-L's image encoder (Meta's sam2 package: pip install 'grto[sam2]')\n"
        "  encode_batch: 8             # images per encoder pass: Hiera-L encodes a 1024² image in ~1.6 TFLOP, a\n"
        "                              # quarter of SAM's largest (benchmarks/tool_cost.py); lower it on a small GPU\n"
        "  cache_bytes: 4294967296     # CPU memory for cached features: 4 GiB = 256 images at 16 MiB each (fp32\n"
        "                              # 32x256x256 + 64x128x128 + 256x64x64: SAM2's decoder reads all three levels);\n"
        "                              # they never stay on the GPU. Raise it when RAM allows: train revisits its images\n"
        "  cache_dir: null             # also keep the features on disk here (null: memory only)\n"),
}
DEFAULT_TEMPLATE_TOOL = "vit_h"


def _aligned(match: re.Match, new: str) -> str:
    """``new`` in place of the match's value, keeping the column of the comment after it."""
    return new + " " * max(1, len(match.group(0)) - len(new)) if match.group(0).endswith(" ") else new


def with_tool(text: str, tool: str) -> str:
    """A real setting's template text with ``tool`` in place of ViT-H: the checkpoint file every stage
    reads and depends on, the tool arch, the comments' name and the ``tool:`` section."""
    if tool not in TEMPLATE_TOOLS:
        raise ValueError(f"unknown template tool {tool!r}; expected one of {', '.join(TEMPLATE_TOOLS)}")
    old, new = TEMPLATE_TOOLS[DEFAULT_TEMPLATE_TOOL], TEMPLATE_TOOLS[tool]
    if new == old:
        return text
    text = re.sub(re.escape(old.file) + " *", lambda m: _aligned(m, new.file), text)
    text = re.sub(rf"tool_arch: {re.escape(old.arch)}\b *", lambda m: _aligned(m, f"tool_arch: {new.arch}"), text)
    text = text.replace(old.name, new.name).replace(old.name.removeprefix("SAM "), new.name.removeprefix("SAM "))
    if new.section is not None:
        text, n = re.subn(r"(?m)^tool:.*\n(?:(?: .*)?\n)*?(?=\n|\Z)", lambda m: new.section, text, count=1)
        if n != 1 and "stages:" not in text:  # params.yaml has one; dvc.yaml none
            raise ValueError(f"a template's params.yaml has no top-level tool: section to size for {new.name}")
    return text


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


def write_project(root: Path, setting: str, force: bool = False,
                  tool: str = DEFAULT_TEMPLATE_TOOL) -> dict[str, str]:
    """Write the setting's project files into ``root`` (a real setting's with ``tool``,
    ``TEMPLATE_TOOLS``); file -> what happened to it."""
    source = template_dir(setting)
    if tool != DEFAULT_TEMPLATE_TOOL and setting == DEFAULT_SETTING:
        raise ValueError(f"--tool {tool}: the {DEFAULT_SETTING} setting trains its own tiny tool; choose its kind with "
                         f"--set pretrain.tool_kind=sam2 (or sam2-hf) instead")
    root.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    for name in TEMPLATE_FILES:
        target, text = root / name, with_tool((source / name).read_text(), tool)
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

