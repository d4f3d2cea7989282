"""Print the imports between hld's packages and check they run one way:
cli → export → study → train → distributed → eval → distill → models → data/config → the base modules
(errors, atomic, locks, paths, progress, fingerprint, precision).

    python scripts/import_layers.py          # every edge, then the ones against the order (exit 1 if any)

Imports inside functions count too: a lazy import is still a dependency.
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
    "study": 7,
    "train": 6,  # the loop validates with eval and distributed's perplexity
    "distributed": 5,
    "eval": 4,
    "distill": 3,
    "flops": 3,
    "models": 2,
    "data": 1,
    "config": 1,
    "config_checks": 0.5,  # the ranges and checks config.load_config runs: below config, above the base
    "errors": 0,
    "atomic": 0,
    "locks": 0,
    "paths": 0,
    "progress": 0,
    "fingerprint": 0,
    "precision": 0,
    "__init__": 0,
}

# edges against the order that are known and kept, with the reason
ALLOWED = {
    ("config_checks", "models"): "config_checks.validate checks the student's shape with models.student.resolve_shape "
    "(a lazy import: the presets live with the student they build)",
}


def unit(module: str) -> str:
    """`hld.train.loop` -> `train`; `hld.errors` -> `errors`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def edges() -> set[tuple[str, str]]:
    found = set()
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        src = unit(".".join(rel.parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
                if node.module == "hld":  # from hld import atomic, distributed
                    targets = [f"hld.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t.startswith("hld.") and unit(t) != src:
                    found.add((src, unit(t)))
    return found


def against_order(found: set[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(
        (a, b) for a, b in found if RANK[a] <= RANK[b] and not (RANK[a] == RANK[b] == 0) and (a, b) not in ALLOWED
    )


def main() -> int:
    found = edges()
    for a, b in sorted(found, key=lambda e: (-RANK[e[0]], e[0], -RANK[e[1]], e[1])):
        print(f"{a:>12} -> {b}")
    bad = against_order(found)
    for (a, b), why in ALLOWED.items():
        print(f"kept against the order: {a} -> {b}: {why}")
    for a, b in bad:
        print(f"against the order: {a} (rank {RANK[a]}) imports {b} (rank {RANK[b]})")
    print(f"{len(found)} edges, {len(bad)} against the order")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
