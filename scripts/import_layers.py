"""Print the imports between hld's packages and check they run one way:
cli → export → study → cache.build → train → eval → distributed → cache → distill → models → data/config →
config_checks → distill.divergences → the base modules (errors, atomic, files, locks, paths, progress,
fingerprint, precision); then check that no modules import each other in a circle.

    python scripts/import_layers.py          # every edge, the ones against the order, the circles (exit 1 if any)

Two graphs, one walk over every import statement of every module:
- the order: between units (`hld.train.loop` is unit `train`); a unit imports only lower-ranked units.
- the circles: between modules (`hld.eval.harness` and `hld.eval.hld_lm` are two nodes), so a circle inside
  one unit counts too. A circle is a strongly connected component of two or more modules (or a module
  importing itself); each is printed as one closed path.

Every import statement counts, wherever it sits: at module level, inside a function (a lazy import defers
the loading, not the dependency — `config → config_checks → models.student → config` was such a circle,
closed by an import inside `config_checks.validate`), or under `if TYPE_CHECKING:` (the type checker
resolves it; a circle through it is still two modules that cannot be read or changed apart). An import
names the module it loads (`from hld.eval import harness` → `hld.eval.harness`, `from hld.eval.harness
import X` → `hld.eval.harness`); the parent packages Python initialises on the way (`hld`, `hld.eval`)
are not edges: their `__init__.py` files import nothing of hld (a package whose `__init__` imported its
own submodules would show as a circle, which it is).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "hld"

# a unit imports only units of a lower rank (the base modules, rank 0, may import one another)
RANK = {
    "__main__": 10,
    "cli": 9,
    "commands": 8.5,
    "export": 8,
    "plan": 8,
    "memtrace": 8.2,  # traces the training step (train.loop) to check plan's memory estimate
    "study": 7,
    "cache.build": 6.5,  # sizes a build by the run's budget (train.budget), borrows its teacher (train.resources)
    "train": 6,  # the loop validates with eval's perplexity (dealt over the ranks)
    "eval": 5,  # eval.perplexity deals its batches over the ranks (distributed)
    "distributed": 4,
    "cache": 3.5,  # the cache's format, writer and reader: the loop reads it, its shards hold distill's signals
    "distill": 3,
    "flops": 3,
    "models": 2,
    "data": 1,
    "config": 1,
    "config_checks": 0.5,  # the ranges, checks and student shapes config.load_config uses: below config
    "distill.divergences": 0.4,  # the divergences by name: config reads their names and parameters
    "errors": 0,
    "atomic": 0,
    "files": 0,
    "locks": 0,
    "paths": 0,
    "progress": 0,
    "fingerprint": 0,
    "precision": 0,
    "__init__": 0,
}

# edges against the order that are known and kept, with the reason (none at present)
ALLOWED: dict[tuple[str, str], str] = {}


def unit(module: str) -> str:
    """`hld.train.loop` -> `train`; `hld.errors` -> `errors`; a module ranked apart from its package (a
    dotted key of RANK: `hld.cache.build` -> `cache.build`) is its own unit."""
    parts = module.split(".")
    if len(parts) > 2 and ".".join(parts[1:3]) in RANK:
        return ".".join(parts[1:3])
    return parts[1] if len(parts) > 1 else "__init__"


def _module_of(path: Path) -> str:
    """src/hld/eval/harness.py -> `hld.eval.harness`; src/hld/eval/__init__.py -> `hld.eval`."""
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SRC.parent / rel).with_suffix(".py").exists() or (SRC.parent / rel / "__init__.py").exists()


def _imported(node: ast.AST, here: str, is_package: bool) -> list[str]:
    """The hld modules an import statement loads (none for other statements)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "hld" or a.name.startswith("hld.")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: from the package this module is in (or is)
        base = here.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    if name != "hld" and not name.startswith("hld."):
        return []
    subs = [f"{name}.{a.name}" for a in node.names if _is_module(f"{name}.{a.name}")]  # from hld import atomic
    return subs if len(subs) == len(node.names) else [name, *subs]


def module_graph() -> dict[str, set[str]]:
    """hld module -> the hld modules it imports (every import statement, see the docstring)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        here = _module_of(path)
        targets = graph.setdefault(here, set())
        for node in ast.walk(ast.parse(path.read_text())):
            targets.update(_imported(node, here, path.name == "__init__.py"))
    return graph


def edges() -> set[tuple[str, str]]:
    """The imports between units."""
    found = set()
    for src, targets in module_graph().items():
        for t in targets:
            if t.startswith("hld.") and unit(t) != unit(src):
                found.add((unit(src), unit(t)))
    return found


def against_order(found: set[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(
        (a, b) for a, b in found if RANK[a] <= RANK[b] and not (RANK[a] == RANK[b] == 0) and (a, b) not in ALLOWED
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of `graph`, one closed path per strongly connected component (Tarjan's algorithm, no
    recursion): [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1 or node in graph.get(node, ()):
                        components.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(_closed_path(graph, comp) for comp in components)


def _closed_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest circle through the component's first module, by breadth-first search inside it."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child in members and child not in prev:
                    prev[child] = node
                    nxt.append(child)
        frontier = nxt
    return comp  # unreachable for a strongly connected component


def main() -> int:
    found = edges()
    for a, b in sorted(found, key=lambda e: (-RANK[e[0]], e[0], -RANK[e[1]], e[1])):
        print(f"{a:>12} -> {b}")
    bad = against_order(found)
    for (a, b), why in ALLOWED.items():
        print(f"kept against the order: {a} -> {b}: {why}")
    for a, b in bad:
        print(f"against the order: {a} (rank {RANK[a]}) imports {b} (rank {RANK[b]})")
    graph = module_graph()
    circles = cycles(graph)
    for path in circles:
        print("import circle: " + " -> ".join(path))
    n_imports = sum(len(t) for t in graph.values())
    print(f"{len(found)} edges, {len(bad)} against the order; ", end="")
    print(f"{len(graph)} modules, {n_imports} imports, {len(circles)} cycles")
    return 1 if bad or circles else 0


if __name__ == "__main__":
    sys.exit(main())
