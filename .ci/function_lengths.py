"""Fail when a function in the product is longer than LIMIT lines (from `def` to its end).

Run from the repository root: `python .ci/function_lengths.py`. It checks the
package and the scripts users run, not the tests.
"""

import ast
import sys
from pathlib import Path

LIMIT = 60


def function_lengths(root: Path) -> list[tuple[int, str]]:
    """Every function's length in lines and its place, longest first."""
    sources = sorted(root.glob("*.py")) + sorted((root / "securehealth").rglob("*.py"))
    found = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                found.append((length, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def main() -> int:
    """Print the functions over LIMIT lines; exit 1 if there are any."""
    lengths = function_lengths(Path.cwd())
    too_long = [(length, where) for length, where in lengths if length > LIMIT]
    for length, where in too_long:
        print(f"{where} is {length} lines, over {LIMIT}: split it into named steps")
    print(f"{len(lengths)} functions, the longest {lengths[0][0]} lines (limit {LIMIT})")
    return 1 if too_long else 0


if __name__ == "__main__":
    sys.exit(main())
