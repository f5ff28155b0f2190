"""The package's import graph: no cycles, and the verification stack imports in one direction.

Every module of ``speccascade_fast`` is parsed with ``ast`` (imports inside functions count:
a function-local import hides a cycle from Python's import machinery, not from the design).
Relative imports are resolved; ``from . import x`` is an edge to module ``x`` when ``x`` is a
submodule, else to the package. An ``import a.b.c`` is an edge to ``a.b.c`` only: the parent
packages Python initialises on the way are not counted (else every submodule would form a
cycle with a package ``__init__`` that imports it).

Run as a script (``python tests/test_imports.py``) it prints every cycle it finds.
"""
from __future__ import annotations

import ast
import pathlib
from collections import deque

PACKAGE = "speccascade_fast"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
#: compiled modules (setup.py builds them from csrc/; a checkout may lack them): leaves
EXTENSIONS = {f"{PACKAGE}._C"}

# The verification stack, top to bottom: a module may import modules of its own layer's
# helpers or of a lower layer, never of a higher one (kernels: the Triton kernels and the torch
# ops' calling convention).
PUBLIC = {"verify", "ragged", "sampling"}
DISPATCH = {"backends"}
BACKENDS = {"backends.reference", "backends.cpu", "backends.cuda", "backends.triton"}
KERNELS = {"backends._ops", "kernels"}  # and every kernels.* module
LAYERS = [("public API", PUBLIC), ("dispatch", DISPATCH), ("backends", BACKENDS),
          ("kernels", KERNELS)]


def modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _known() -> set[str]:
    return set(modules()) | EXTENSIONS


def _imports(name: str, path: pathlib.Path, known) -> set[str]:
    """The package modules that module ``name`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()

    def target(dotted: str) -> str | None:
        """``dotted`` if it is a module of the package, else its longest prefix that is."""
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.add(target(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
                if not (module == PACKAGE or module.startswith(PACKAGE + ".")):
                    continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in known else target(module))
    found.discard(None)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    mods, known = modules(), _known()
    g = {name: _imports(name, path, known) for name, path in mods.items()}
    g.update({name: set() for name in EXTENSIONS})
    return g


def _components(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of ``g`` (Tarjan, iterative)."""
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
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
                    comps.append(sorted(comp))
    return comps


def cycles(g: dict[str, set[str]] | None = None) -> list[list[str]]:
    """Every shortest cycle through each module that lies on one (one per module, duplicates
    removed): ``[a, b, ..., a]``. Empty when the graph is acyclic."""
    g = graph() if g is None else g
    out, seen = [], set()
    for comp in _components(g):
        members = set(comp)
        if len(comp) == 1:
            continue
        for start in comp:  # breadth-first back to start, inside the component
            parent, queue = {start: None}, deque([start])
            while queue:
                v = queue.popleft()
                if start in g[v]:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    cycle = path[::-1] + [start]
                    key = frozenset(zip(cycle, cycle[1:]))
                    if key not in seen:
                        seen.add(key)
                        out.append(cycle)
                    break
                for w in sorted(g[v] & members):
                    if w not in parent:
                        parent[w] = v
                        queue.append(w)
    return out


def _layer(module: str) -> int | None:
    rel = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    for i, (_, names) in enumerate(LAYERS):
        if rel in names or (rel.startswith("kernels.") and "kernels" in names):
            return i
    return None


def _show(found) -> str:
    return "\n".join(" -> ".join(c) for c in found)


def test_the_graph_sees_function_local_and_relative_imports():
    g = graph()
    # backends/triton.py imports its kernels inside functions only
    assert f"{PACKAGE}.kernels.targets" in g[f"{PACKAGE}.backends.triton"]
    # `from . import x` is module x when x is a submodule
    assert f"{PACKAGE}.backends.cpu" in g[f"{PACKAGE}.backends"]
    assert f"{PACKAGE}.rules" in g[f"{PACKAGE}.verify"]
    # the cycle finder finds a planted one
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(planted) == [["a", "b", "c", "a"]]


def test_the_verification_stack_imports_downwards_only():
    """public API -> dispatch -> backends -> kernels, counting function-local imports; no
    backend imports another, and the helpers below them (rules, truncation, layout, ...) import
    none of them."""
    g = graph()
    # the helpers the stack uses (rules, probs, truncation, layout, ...): below all of it
    helpers, todo = set(), [m for m in g if _layer(m) is not None]
    while todo:
        for dep in g[todo.pop()]:
            if _layer(dep) is None and dep not in helpers:
                helpers.add(dep)
                todo.append(dep)
    wrong = []
    for mod, deps in g.items():
        here = _layer(mod)
        if here is None and mod not in helpers:
            continue  # above the stack: the engine, the CLI, the package's __init__, ...
        for dep in deps:
            there = _layer(dep)
            if there is None:
                continue
            if here is None:
                wrong.append(f"{mod} (a helper of the stack) imports {dep} ({LAYERS[there][0]})")
            elif there < here:
                wrong.append(f"{mod} ({LAYERS[here][0]}) imports {dep} ({LAYERS[there][0]})")
            elif there == here == 2:
                wrong.append(f"{mod} imports {dep}: one backend imports another")
    assert not wrong, "\n".join(wrong)
    assert f"{PACKAGE}.truncation" in helpers and f"{PACKAGE}.rules" in helpers


def test_the_package_has_no_import_cycle():
    found = cycles()
    assert not found, "import cycles (a -> b: a imports b):\n" + _show(found)


if __name__ == "__main__":
    found = cycles()
    print(_show(found) if found else "no import cycle")
    raise SystemExit(1 if found else 0)
