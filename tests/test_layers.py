"""The package's folders import one way only (docs/ARCHITECTURE.md, "Layers").

Read from the source with ast, so a violation is caught however the import
is written (relative, absolute, inside a function).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parent.parent / "agent"

# Each folder and the folders it may import, besides itself (lowest last).
ALLOWED: dict[str, set[str]] = {
    "cli": {"desktop", "system", "engine", "disk", "repository", "config", "policy", "core"},
    "desktop": {"engine", "disk", "repository", "config", "policy", "core"},
    "system": {"config", "core"},
    "engine": {"disk", "repository", "config", "policy", "core"},
    "disk": {"repository", "config", "policy", "core"},
    "repository": {"config", "policy", "core"},
    "config": {"policy", "core"},
    "policy": set(),
    "core": set(),
}


def _layer(module: str) -> str:
    """The folder a module lives in; "cli" for the modules at the top."""
    parts = module.split(".")
    if parts[0] != "agent":
        raise ValueError(module)
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1]


def _root_name(target: str) -> bool:
    """``agent.__version__``: what the package's own ``__init__`` holds, which every layer may read."""
    return target.startswith("agent.__")


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(AGENT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target == "agent":
                found += [(node.lineno, f"agent.{alias.name}") for alias in node.names]
            elif target.startswith("agent."):
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("agent.")]
    return found


def _sources() -> list[Path]:
    return sorted(p for p in AGENT.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_folder_is_a_known_layer() -> None:
    folders = {p.name for p in AGENT.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(ALLOWED) - {"cli"}


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(AGENT.parent)))
def test_imports_go_down_only(path: Path) -> None:
    own = _layer(_module_of(path))
    wrong = [
        f"line {line}: {target} ({_layer(target)})"
        for line, target in _imports(path)
        if not _root_name(target) and _layer(target) != own and _layer(target) not in ALLOWED[own]
    ]
    assert wrong == [], f"{own} may import only {sorted(ALLOWED[own])}"
