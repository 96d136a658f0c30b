"""The import graph of qwen25 follows the data flow of docs/architecture.md: a package imports only packages before
it, and no module imports one that imports it back (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "qwen25"
# Each package (or top-level module) may import those before it in this order, never one after it.
ORDER = ["utils", "config", "model", "tokenizer", "verifiers", "generation", "data", "train", "tasks", "post",
         "evals", "serve", "export", "recipes", "cli", "__main__"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("qwen25",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            edges[name] |= {c for c in candidates if c in modules and c != name}
    return edges


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_packages_import_only_earlier_stages():
    modules = _modules()
    assert {_top(m) for m in modules} - {""} <= set(ORDER), "a new package: place it in ORDER"
    wrong = sorted(f"{a} imports {b}" for a, targets in _edges(modules).items() for b in targets
                   if _top(a) and _top(b) and ORDER.index(_top(b)) > ORDER.index(_top(a)))
    assert not wrong, "imports against the flow:\n" + "\n".join(wrong)


def test_no_import_cycles():
    edges = _edges(_modules())
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_inside_functions_only_in_command_line_modules():
    """Library modules import qwen25 at the top; only the command-line modules (cli.py, chat_cli.py) defer theirs,
    so that `qwen25 --help` and each command load only what they run."""
    late = []
    for name, path in _modules().items():
        if path.name in ("cli.py", "chat_cli.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for top in tree.body:
            for node in ast.walk(top) if not isinstance(top, (ast.Import, ast.ImportFrom)) else ():
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("qwen25")):
                    late.append(f"{name}:{node.lineno}")
    assert not late, "imports of qwen25 inside functions:\n" + "\n".join(late)


def test_help_does_not_import_torch():
    """`qwen25 --help` and a command's --help answer without importing torch (2 s here), as do usage errors."""
    import subprocess
    import sys

    code = ("import sys\nfrom qwen25.cli import main\n"
            "for argv in (['--help'], ['serve', '--help'], ['eval', 'passkey', '--help'], ['info', '--bad']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
