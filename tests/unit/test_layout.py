"""The library's shape, checked from its source: no import cycles, no private name imported across
modules, no function over 80 lines, library code never exits the process, test fixtures fenced off."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "instructrag_ray"
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imported(name: str, tree: ast.Module, is_package: bool, top_level_only: bool):
    """(module imported, names taken from it) for every `import` / `from ... import` of the package."""
    package = name if is_package else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("instructrag_ray"):
                yield target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("instructrag_ray"):
                    yield a.name, []


def test_no_import_cycles_at_module_level():
    mods = modules()
    packages = {n for n in mods if (PACKAGE.parent / n.replace(".", "/") / "__init__.py").exists()}
    graph: dict[str, set[str]] = {}
    for name, tree in mods.items():
        deps = set()
        for target, names in imported(name, tree, name in packages, top_level_only=True):
            # `from pkg import mod` imports the submodule pkg.mod
            deps |= {f"{target}.{n}" for n in names if f"{target}.{n}" in mods} or {target}
        graph[name] = {d for d in deps if d in mods and d != name}

    def cycle_from(start, node, path, seen):
        for nxt in graph.get(node, ()):
            if nxt == start:
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                found = cycle_from(start, nxt, path + [nxt], seen)
                if found:
                    return found
        return None

    for name in graph:
        cycle = cycle_from(name, name, [name], {name})
        assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_private_name_is_imported_from_another_module():
    mods = modules()
    packages = {n for n in mods if (PACKAGE.parent / n.replace(".", "/") / "__init__.py").exists()}
    for name, tree in mods.items():
        for target, names in imported(name, tree, name in packages, top_level_only=False):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{name} imports private {private} from {target}"


def test_no_function_in_the_library_is_longer_than_80_lines():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "functions over 80 lines: " + "; ".join(long)


def test_library_code_never_exits_the_process_except_the_cli():
    for name, tree in modules().items():
        if name == "instructrag_ray.cli":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "SystemExit":
                raise AssertionError(f"{name} raises SystemExit; raise an errors.JobError instead")
            if isinstance(node, ast.Attribute) and node.attr in ("_exit", "exit") and getattr(node.value, "id", "") in (
                    "os", "sys"):
                raise AssertionError(f"{name} calls {node.value.id}.{node.attr}")


def test_fixtures_are_used_by_the_library_only_to_build_the_tiny_model():
    users = set()
    for name, tree in modules().items():
        if name.startswith("instructrag_ray.testing"):
            continue
        for target, names in imported(name, tree, False, top_level_only=False):
            if target.startswith("instructrag_ray.testing") or "testing" in names:
                users.add((name, target))
    assert users == {("instructrag_ray.models", "instructrag_ray.testing.tiny_model")}, users
