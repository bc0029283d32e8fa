"""The house's shape: no import circle anywhere (lazy imports included), engines never import a stage or its
options, options never import a stage, stages never import each other, and no module imports another's private
name."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "curate"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The curate modules `path` imports, at its top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "curate"}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(filter(None, [base, node.module or ""])) if node.level else node.module or ""
            if target.split(".")[0] != "curate":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & modules
            found |= subs or {target}
    return (found & modules) - {name}


def graph() -> dict[str, set[str]]:
    files = [p for p in ROOT.rglob("*.py")]
    modules = {module_name(p) for p in files}
    # a package's own __init__ is imported with any of its modules: not an edge worth a circle
    return {module_name(p): {m for m in imports(p, modules) if not module_name(p).startswith(m + ".")} for p in files}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_engines_never_import_stages_nor_their_config():
    """An engine runs any stage from the `Resources` it declares: no stage, no stage's options."""
    edges = graph()
    engines = [m for m in edges if m.startswith("curate.engines")]
    assert {"curate.engines.local", "curate.engines.processes", "curate.engines.ray"} <= set(engines)
    for module in engines:
        assert not {t for t in edges[module] if t.startswith(("curate.stages", "curate.config"))}, module


def test_options_import_no_stage_and_the_shared_module_no_stage_options():
    """A stage's options (`curate.config.NAME`) are read by other stages and libraries without importing a stage;
    what they share (`curate.config.base`: the types and the YAML loader) knows no stage's options."""
    edges = graph()
    options = [m for m in edges if m.startswith("curate.config.")]
    assert {"curate.config.base", "curate.config.score", "curate.config.selection"} <= set(options)
    for module in options:
        assert not {t for t in edges[module] if t.startswith("curate.stages")}, module
    assert not {t for t in edges["curate.config.base"] if t.startswith("curate.config")}


def test_stages_never_import_each_other():
    """A stage that runs others finds them through the registry; what two stages share is a library."""
    edges = graph()
    for module, targets in edges.items():
        if module.startswith("curate.stages."):
            assert not {t for t in targets if t.startswith("curate.stages.")}, module


def test_no_module_imports_a_private_name():
    """`from X import _name` across modules: a private helper used elsewhere belongs in a library, public."""
    found = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                found += [(module_name(path), name) for name in private]
    assert found == []
