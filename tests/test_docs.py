"""The docs a user's clone has: the method page's test references are real tests, and the README
points at it rather than at files outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_test_the_method_page_names_exists():
    text = (ROOT / "docs" / "method.md").read_text()
    refs = re.findall(r"(tests/[\w/]+\.py)::(test_\w+)", text)
    assert len(refs) >= 20  # the checklist names its guards
    missing = [f"{f}::{name}" for f, name in refs if not (ROOT / f).is_file() or name not in _test_names(ROOT / f)]
    assert not missing, f"docs/method.md names tests that do not exist: {missing}"


def _definitions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return defined | {f"{c.name}.{f.name}" for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
                      for f in c.body if isinstance(f, ast.FunctionDef)}


def test_every_function_the_method_page_names_exists():
    """`grto_cli/core/x.py: name`, `x.py: name` or `x.py: Class.method` point at real definitions
    (a bare file name may be any module of that name in the package)."""
    text = (ROOT / "docs" / "method.md").read_text()
    refs = re.findall(r"((?:grto_cli/[\w/]+/)?\w+\.py): (\w+(?:\.\w+)?)", text)
    assert len(refs) >= 20
    missing = []
    for file, name in refs:
        files = [ROOT / file] if "/" in file else list((ROOT / "grto_cli").rglob(file))
        assert files and all(f.is_file() for f in files), file
        if not any(name in _definitions(f) for f in files):
            missing.append(f"{file}: {name}")
    assert not missing, missing


def test_readme_links_the_method_page_and_nothing_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert "(docs/method.md)" in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).resolve().is_relative_to(ROOT) and (ROOT / target).exists(), target


def _package_modules() -> list[str]:
    import pkgutil

    import grto_cli

    return sorted(m.name for m in pkgutil.walk_packages(grto_cli.__path__, "grto_cli.")
                  if not m.name.endswith("__main__"))  # (running __main__ runs the CLI)


def test_every_modules_doctests_run_and_pass():
    """Collected from the package itself, so a new module's doctests run without being listed."""
    import doctest
    import importlib

    ran, failed = {}, {}
    for name in _package_modules():
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
        if result.attempted:
            ran[name] = result.attempted
        if result.failed:
            failed[name] = result.failed
    assert not failed, failed
    # The modules known to hold examples today (answer.py's were never run by a hand-made list).
    assert {"grto_cli.core.answer", "grto_cli.core.metrics", "grto_cli.core.sampling"} <= set(ran), ran
