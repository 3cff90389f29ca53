"""The package's shape, read as text (nothing of it is imported): import cycles between its
modules, files over 600 lines, and how many definitions the rules that must exist once have.

    python -m fewbits.devtools.layout     # prints the figures; exit 1 when a rule is broken
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 600
# what must be decided or computed in exactly one place (see docs/architecture.md)
SINGLE_DEFINITIONS = ("deployed_kind", "integer_weight", "int32_bias", "accumulator_blocker")


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _targets(module: str, is_pkg: bool, node: ast.AST, mods: dict) -> list[str]:
    base = module if is_pkg else module.rsplit(".", 1)[0]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = base.split(".")[: len(base.split(".")) - node.level + 1]
            target = ".".join(parts + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        found = [target] + [f"{target}.{a.name}" for a in node.names]
    else:
        found = [a.name for a in node.names]
    return [m for m in found if m in mods]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the package modules it imports (function-local imports too; ``__init__`` modules
    are not targets: re-exports there make no cycle)."""
    mods = _modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(name, path.name == "__init__.py", node, mods):
                    if t != name and not t.startswith(name + ".") and mods[t].name != "__init__.py":
                        edges[name].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def long_files(root: Path, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    sizes = [(str(p.relative_to(root.parent)), len(p.read_text(encoding="utf-8").splitlines()))
             for p in root.rglob("*.py")]
    return sorted(((f, n) for f, n in sizes if n > limit), key=lambda x: -x[1])


def definitions(root: Path, names=SINGLE_DEFINITIONS) -> dict[str, list[str]]:
    """Where each of ``names`` is defined (``def``) in the package."""
    found: dict[str, list[str]] = {n: [] for n in names}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in found:
                found[node.name].append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def main(argv=None) -> int:
    root = Path(__file__).resolve().parents[1]
    found_cycles, long, defs = cycles(import_graph(root)), long_files(root), definitions(root)
    for c in found_cycles:
        print("cycle:", " <-> ".join(c))
    for f, n in long:
        print(f"over {MAX_LINES} lines: {f} ({n})")
    for name, where in defs.items():
        print(f"{name}: {len(where)} definition(s) {', '.join(where)}")
    print(f"layout: {len(found_cycles)} import cycles, {len(long)} files over {MAX_LINES} lines")
    broken = found_cycles or long or any(len(w) != 1 for w in defs.values())
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
