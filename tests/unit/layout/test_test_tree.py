"""The test tree's own layering (issue 20), read with ``ast``: test modules hold tests, and what
several of them share lives in ``tests/support``. So no module of the test tree imports one under
``tests/unit`` or ``tests/integration`` (a test module), at module level or late, absolute or
relative; otherwise its tests would run twice, or a fix to one test would break another."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]
TEST_PACKAGES = ("tests.unit", "tests.integration")


def module_name(path: Path) -> str:
    parts = path.relative_to(TESTS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(module: str, tree: ast.AST, is_package: bool) -> list[str]:
    """Every module (or package) ``tree`` imports, or imports names from."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names.append(base)
    return names


def imports_of_tests(path: Path) -> list[str]:
    """The test modules (under tests/unit or tests/integration) that ``path`` imports from."""
    module = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    names = imported(module, tree, path.name == "__init__.py")
    return sorted(
        {name for name in names if name.startswith(tuple(p + "." for p in TEST_PACKAGES))}
    )


def test_the_reader_sees_late_and_relative_imports() -> None:
    source = "def f():\n    from tests.unit.x.test_a import h\nfrom .test_b import g\n"
    tree = ast.parse(source)
    names = imported("tests.unit.x.test_c", tree, is_package=False)
    assert "tests.unit.x.test_a" in names and "tests.unit.x.test_b" in names


def test_no_module_of_the_test_tree_imports_a_test_module() -> None:
    found = {
        module_name(path): imports_of_tests(path)
        for path in sorted(TESTS.rglob("*.py"))
        if imports_of_tests(path)
    }
    assert found == {}
