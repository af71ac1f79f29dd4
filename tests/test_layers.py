"""The package's layers import one way: cli -> runtime -> compiler, with no cycle between modules.

Every module under compiler/, runtime/ and cli/ is parsed with `ast`; every import statement counts,
at module level and inside functions (a function-local import is still a dependency, it is only
hidden). `from X import name` depends on X.name when that is a module, else on X. A back edge is an
import from a lower layer into a higher one (compiler -> runtime or cli, runtime -> cli); a cycle
is a strongly connected set of two or more modules (or a module importing itself). In cli/ and
runtime/, an import inside a function must say why on its line (`# local: <reason>`, e.g. an
optional dependency), so none hides a cycle. Imports under `if TYPE_CHECKING:` are annotations only
(an op family's schedule rule names the builder type it is handed; nothing is imported at run time)
and are not counted; everything else is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import bnnc

ROOT = Path(bnnc.__file__).resolve().parent
LAYERS = ("compiler", "runtime", "cli")          # lowest first


def module_name(path: Path) -> str:
    parts = ["bnnc", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    parts = package.split(".")
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _is_type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `if typing.TYPE_CHECKING:`)."""
    if not isinstance(node, ast.If):
        return False
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The bnnc modules `module` imports anywhere in its body."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m.startswith("bnnc.")}


def import_graph() -> nx.DiGraph:
    mods = package_modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for mod, path in mods.items():
        g.add_edges_from((mod, dep) for dep in imports_of(mod, path, set(mods)))
    return g


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def back_edges(g: nx.DiGraph) -> list[str]:
    return sorted(f"{a} -> {b}" for a, b in g.edges
                  if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a))


def cycles(g: nx.DiGraph) -> list[list[str]]:
    """Every strongly connected group of modules (sorted), and every module importing itself."""
    groups = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    groups += [[a] for a, b in g.edges if a == b]
    return sorted(groups)


def local_imports(path: Path) -> list[int]:
    """Line numbers of the imports inside functions of the module at `path`."""
    tree = ast.parse(path.read_text(), str(path))
    return sorted({n.lineno for f in ast.walk(tree)
                   if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))})


def test_the_walk_sees_every_layer():
    g = import_graph()
    assert {"bnnc.cli.run_cmds", "bnnc.runtime.host", "bnnc.compiler.codegen"} <= set(g)
    assert ("bnnc.runtime.host", "bnnc.compiler.errors") in g.edges


def test_no_back_edge():
    bad = back_edges(import_graph())
    assert not bad, "imports against the layering cli -> runtime -> compiler:\n" + "\n".join(bad)


def test_no_import_cycle():
    bad = cycles(import_graph())
    assert not bad, "import cycles between modules:\n" + "\n".join(" <-> ".join(c) for c in bad)


def test_function_local_imports_say_why():
    bad = []
    for mod, path in package_modules().items():
        if mod.split(".")[1] not in ("cli", "runtime"):
            continue
        lines = path.read_text().splitlines()
        bad += [f"{path.relative_to(ROOT)}:{n}: {lines[n - 1].strip()}" for n in local_imports(path)
                if "# local:" not in lines[n - 1]]
    assert not bad, "function-local imports without a `# local:` reason:\n" + "\n".join(bad)
