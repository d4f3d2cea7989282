"""Print files over 400 lines and functions over 60 in src/hld (the size limits in docs/STYLE), largest first.

python scripts/sizes.py          # exit 1 if any file or function is over its limit
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "hld"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node.end_lineno - node.lineno + 1
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def main() -> int:
    files, funcs = [], []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(SRC.parent)
        files.append((len(text.splitlines()), str(rel)))
        funcs += [(n, f"{rel}:{name}") for name, n in _functions(ast.parse(text))]
    big_files = sorted((f for f in files if f[0] > MAX_FILE_LINES), reverse=True)
    big_funcs = sorted((f for f in funcs if f[0] > MAX_FUNCTION_LINES), reverse=True)
    print(f"{len(files)} files, largest {max(files)[0]} lines; {len(funcs)} functions, largest {max(funcs)[0]} lines")
    for n, name in big_files:
        print(f"file over {MAX_FILE_LINES}: {name} {n}")
    for n, name in big_funcs:
        print(f"function over {MAX_FUNCTION_LINES}: {name} {n}")
    return 1 if big_files or big_funcs else 0


if __name__ == "__main__":
    sys.exit(main())
