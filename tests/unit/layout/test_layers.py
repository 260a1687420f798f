"""The product's import layers, read from the source with ``ast`` (nothing is imported).

Every ``import`` counts, at module level or inside a function (a late import is still a
dependency), except those under ``if TYPE_CHECKING:``, which never run. The rules (issue 20):
no import cycle between modules; routing does not import delivery; no product module imports the
test fakes of ``mailrelay.testing``; the wire (``mailrelay.smtp``, server and client) imports no
policy, config, queue or routing.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[3] / "mailrelay"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement, in functions too, but not under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str) -> str | None:
    """The mailrelay module ``name`` means: itself, or the nearest package that holds it."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """The mailrelay modules that ``module`` imports (``from pkg import mod`` counts as mod)."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            if not target.startswith("mailrelay"):
                continue
            resolved = _resolve(target)
            if resolved is not None and resolved != module:
                found.add(resolved)
                if not isinstance(node, ast.Import) and target != (node.module or ""):
                    break  # ``from pkg import mod``: mod, not also pkg
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def offenders(importers: str, forbidden: tuple[str, ...]) -> list[str]:
    """``importer -> imported`` for each module under ``importers`` importing a forbidden one."""

    def under(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    return sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if under(module, importers)
        for target in targets
        if any(under(target, f) for f in forbidden)
    )


# -- the reader itself ---------------------------------------------------------------------------


def test_the_reader_sees_late_and_relative_imports_but_not_type_checking_ones(tmp_path):
    assert "mailrelay.routing.mtasts" in GRAPH["mailrelay.routing.mx"]
    assert "mailrelay.tls_trust" in GRAPH["mailrelay.preflight"]  # an import inside a function
    assert "mailrelay.observer" not in GRAPH["mailrelay"]  # named for importlib, not imported
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mailrelay.cli\n"
    )
    assert list(_import_nodes(tree))[1:] == []


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# -- the rules -----------------------------------------------------------------------------------


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def room(module: str) -> str:
    """The top-level module or package a module belongs to (``mailrelay.queue``)."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_rooms():
    rooms: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        rooms.setdefault(room(module), set()).update(
            room(t) for t in targets if room(t) != room(module)
        )
    assert cycles(rooms) == []


def test_routing_imports_no_delivery():
    """Routing answers where, delivery how: trust roots both need live in mailrelay.tls_trust."""
    assert offenders("mailrelay.routing", ("mailrelay.delivery",)) == []


def test_the_product_imports_no_test_fake():
    fakes = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if not module.startswith("mailrelay.testing")
        for target in targets
        if target.startswith("mailrelay.testing")
    ]
    assert fakes == []


WIRE_MUST_NOT = ("mailrelay.policy", "mailrelay.config", "mailrelay.queue", "mailrelay.routing")


def test_the_smtp_client_imports_no_policy_config_queue_or_routing():
    client = [m for m in GRAPH if m.startswith(("mailrelay.smtp.client", "mailrelay.smtp._client"))]
    assert client
    for module in client:
        assert offenders(module, WIRE_MUST_NOT) == []


def test_the_wire_imports_no_policy_config_queue_or_routing():
    assert offenders("mailrelay.smtp", WIRE_MUST_NOT) == []


def test_only_the_named_module_imports_private_twisted_names():
    """Twisted's underscored modules and names are used in ``mailrelay._twisted`` alone."""
    found = []
    for module, path in MODULES.items():
        if module == "mailrelay._twisted":
            continue
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                names = [f"{base}.{alias.name}" for alias in node.names]
            found += [
                f"{module}: {name}"
                for name in names
                if name.split(".")[0] == "twisted"
                and any(part.startswith("_") for part in name.split(".")[1:])
            ]
    assert found == []
