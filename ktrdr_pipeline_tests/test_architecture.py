"""The package's layers, as `lint-imports` checks them (contracts in pyproject.toml)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ktrdr_pipeline"


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def _distribution(requirement: str) -> str:
    """``"dagster-webserver==1.13.*"`` -> ``"dagster-webserver"`` (normalised)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", requirement)[0]).lower()


def _imported_top_level_names() -> dict[str, set[str]]:
    """Top-level names of every absolute import in the package -> the files importing it."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_distribution_is_declared():
    """What ktrdr_pipeline/ imports is a runtime dependency; test tools are not."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_distribution(r) for r in project["dependencies"]}
    dev = {_distribution(r) for r in project["optional-dependencies"]["dev"]}
    providers = packages_distributions()
    missing = {}
    for name, files in sorted(_imported_top_level_names().items()):
        if name in sys.stdlib_module_names or name == "ktrdr_pipeline":
            continue
        dists = {_distribution(d) for d in providers.get(name, [name])}
        if not dists & runtime:
            missing[name] = (sorted(dists), sorted(files))
    assert missing == {}, f"imported but not in [project] dependencies: {missing}"
    assert not runtime & {"pytest", "hypothesis", "ruff", "pytest-timeout", "import-linter"}
    assert {"pytest", "import-linter"} <= dev


def _top_level_modules() -> set[str]:
    """``ktrdr_pipeline.<name>`` for every module and subpackage directly under the root."""
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    names |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    return {f"ktrdr_pipeline.{n}" for n in names}


def test_contracts_name_every_top_level_module():
    """A new top-level module must be placed in the layers, not slip past them."""
    contracts = _contracts()
    ours = _top_level_modules()
    assert "ktrdr_pipeline.domain" in ours and "ktrdr_pipeline.defs" in ours
    pure = set(contracts["pure-domain"]["forbidden_modules"])
    assert ours - {"ktrdr_pipeline.domain"} <= pure
    dagster_free = set(contracts["dagster-in-defs"]["source_modules"])
    assert ours - {"ktrdr_pipeline.defs", "ktrdr_pipeline.definitions"} <= dagster_free
    assert not dagster_free & {"ktrdr_pipeline.defs", "ktrdr_pipeline.definitions"}


def test_import_contracts_are_kept():
    """`lint-imports` from the repository root (its pyproject.toml), on this checkout's
    package: the report is shown when a contract is broken."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
                               " sys.exit(lint_imports_command())", "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
