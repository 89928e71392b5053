"""The code's shape: longest functions, largest modules, shared mutable fields.

    python -m bench.shape [--top N] [--classes dlqproc/supervisor.py ...]

Figures for reviews of the flow's structure (no timing here): function length
in lines (decorators to last line), module length in lines, and, per class of
the named modules, the instance attributes that change after construction:
assigned outside __init__, or containers mutated in place anywhere.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Iterator
from pathlib import Path

# Calls that change a container in place.
_MUTATORS = frozenset(
    {
        "add",
        "append",
        "appendleft",
        "clear",
        "discard",
        "extend",
        "insert",
        "pop",
        "popitem",
        "popleft",
        "remove",
        "setdefault",
        "update",
    }
)

_Function = ast.FunctionDef | ast.AsyncFunctionDef


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, _Function):
            name = f"{prefix}{node.name}"
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            yield name, (node.end_lineno or node.lineno) - start + 1
            yield from _functions(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def _self_attr(node: ast.AST) -> str | None:
    """`x` for `self.x` (also under subscripts: `self.x[k]`)."""
    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.attr if node.value.id == "self" else None
    return None


def shared_fields(cls: ast.ClassDef) -> dict[str, set[str]]:
    """Attribute -> how it changes after __init__ ("assigned", "mutated")."""
    found: dict[str, set[str]] = {}
    for method in cls.body:
        if not isinstance(method, _Function):
            continue
        for node in ast.walk(method):
            targets: list[ast.AST] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            elif isinstance(node, ast.Delete):
                targets = list(node.targets)
            for target in targets:
                for leaf in ast.walk(target) if isinstance(target, ast.Tuple) else [target]:
                    attr = _self_attr(leaf)
                    if attr is None:
                        continue
                    if isinstance(leaf, ast.Subscript):
                        found.setdefault(attr, set()).add("mutated")
                    elif method.name != "__init__":
                        found.setdefault(attr, set()).add("assigned")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _MUTATORS
            ):
                attr = _self_attr(node.func.value)
                if attr is not None:
                    found.setdefault(attr, set()).add("mutated")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shape")
    parser.add_argument("--root", default="dlqproc")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--classes", nargs="*", default=["dlqproc/supervisor.py"])
    args = parser.parse_args(argv)
    modules: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    for path in sorted(Path(args.root).rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        modules.append((len(text.splitlines()), str(path)))
        for name, lines in _functions(ast.parse(text)):
            functions.append((lines, f"{path}:{name}"))
    print(f"longest functions (lines), top {args.top}:")
    for lines, name in sorted(functions, reverse=True)[: args.top]:
        print(f"  {lines:5d}  {name}")
    print(f"largest modules (lines), top {args.top}:")
    for lines, name in sorted(modules, reverse=True)[: args.top]:
        print(f"  {lines:5d}  {name}")
    print("shared mutable fields (assigned outside __init__, or mutated in place):")
    for module in args.classes:
        path = Path(module)
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                fields = shared_fields(node)
                detail = ", ".join(
                    f"{k} ({'+'.join(sorted(v))})" for k, v in sorted(fields.items())
                )
                print(f"  {path}:{node.name}: {len(fields)}  {detail}")


if __name__ == "__main__":
    main()
