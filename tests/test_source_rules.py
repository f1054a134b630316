"""Rules of the code base that a reader would otherwise have to check by eye."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import agent

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PACKAGE = Path(agent.__file__).parent


def test_the_package_has_no_assert_statement() -> None:
    """``python -O`` drops assert statements: a runtime check must be code that always runs."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Assert)
    ]
    assert list(PACKAGE.rglob("*.py")), "the package's sources were not found"
    assert found == []


def test_the_pythons_the_project_claims_agree() -> None:
    """CI runs the fast tests on the oldest and the newest classifier: the oldest is the floor everywhere."""
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    claimed = sorted(
        (int(match[1]), int(match[2]))
        for classifier in project["project"]["classifiers"]
        if (match := re.fullmatch(r"Programming Language :: Python :: (\d+)\.(\d+)", classifier))
    )
    assert claimed, "pyproject.toml names no Python version in its classifiers"
    (major, oldest), newest = claimed[0], claimed[-1]
    assert claimed == [(major, minor) for minor in range(oldest, newest[1] + 1)]  # none left out between
    assert project["project"]["requires-python"] == f">={major}.{oldest}"
    assert project["tool"]["mypy"]["python_version"] == f"{major}.{oldest}"
    assert project["tool"]["ruff"]["target-version"] == f"py{major}{oldest}"


def test_no_test_module_defines_a_name_twice() -> None:
    """A test defined again under the same name replaces the first, which then never runs.

    ruff's F811 is off for tests/ (shared fixtures are imported, then named as parameters).
    """
    tests = PACKAGE.parent / "tests"
    twice = []
    for path in sorted(tests.rglob("*.py")):
        seen: set[str] = set()
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name in seen:
                    twice.append(f"{path.relative_to(tests.parent)}:{node.lineno} {node.name}")
                seen.add(node.name)
    assert list(tests.rglob("test_*.py")), "the tests were not found"
    assert twice == []
