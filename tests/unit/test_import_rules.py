"""The house's import rules (pyproject.toml [tool.importlinter]) hold, and they fail when broken.

``lint-imports`` checks the floors (an import only points down), that workers do not import each other,
that the pure core imports no I/O library, and that only the named adapter imports zeep, exchangelib,
SQLAlchemy or pika. The second test breaks a copy of the tree on purpose, to show the rules can fail.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
PACKAGES = ("plannersync", "services", "shared", "simulators")
PURE_CORE_TESTS = (Path(__file__).parent / "domain").glob("test_*.py")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def copy_of_the_tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_import_rules_hold() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("shared/domain/busy_rules.py", "import shared.adapters.store", "Floors"),
        ("shared/domain/transform_core.py", "import sqlalchemy", "The pure core imports no I/O library"),
        ("services/transformer/worker.py", "import services.publisher.worker", "Workers do not import each other"),
        ("shared/adapters/store.py", "import shared.broker.topology", "Floors"),
        ("services/publisher/worker.py", "import zeep", "Only the Planner adapter speaks SOAP"),
    ],
)
def test_a_broken_rule_fails_the_check(tmp_path: Path, module: str, line: str, broken: str) -> None:
    tree = copy_of_the_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # a violation planted by the test\n")
    result = lint(tree)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout[-3000:]


def test_the_pure_core_tests_import_nothing_from_adapters_broker_or_workers() -> None:
    files = sorted(PURE_CORE_TESTS)
    assert files, "tests/unit/domain holds the pure core's unit tests"
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("shared.adapters", "shared.broker", "services", "plannersync")), f"{path.name} imports {name}"
