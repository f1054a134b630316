"""Rules of the code base that a reader would otherwise have to check by eye."""

from __future__ import annotations

import ast
from pathlib import Path

import agent

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
