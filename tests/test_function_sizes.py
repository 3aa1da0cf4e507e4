"""No function in the on-device package, the pipeline or the targets is over MAX_LINES lines: one that long
does several jobs, and is split by job (the project's standard is ~80)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("edgec/ondevice", "pipeline", "targets")
MAX_LINES = 100



def function_sizes(folders=FOLDERS, root=ROOT):
    """``{"path::qualified name": lines}`` of every function and method (nested ones too), lines counted
    from ``def`` to its last line."""
    out = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()

            def walk(node, prefix):
                for child in ast.iter_child_nodes(node):
                    name = prefix
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        name = f"{prefix}{child.name}"
                        if not isinstance(child, ast.ClassDef):
                            out[f"{rel}::{name}"] = child.end_lineno - child.lineno + 1
                        name += "."
                    walk(child, name)

            walk(ast.parse(path.read_text(), str(path)), "")
    return out


def test_sizes_are_measured():
    sizes = function_sizes()
    assert sizes["edgec/ondevice/manifest.py::Bundle.open_model"] > 5
    assert any(k.startswith("targets/") for k in sizes) and any(k.startswith("pipeline/stages/") for k in sizes)


def test_no_function_over_100_lines():
    long = {k: n for k, n in function_sizes().items() if n > MAX_LINES}
    assert not long, (f"functions over {MAX_LINES} lines (split them by job): "
                      + ", ".join(f"{k} ({n})" for k, n in sorted(long.items())))
