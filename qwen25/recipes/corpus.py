"""The miniature recipe's raw corpus, available on every machine with no download: the Python standard library's
source (code) and its docstrings (documentation), plus the synthetic task data of `synthetic.py`.

Documents are datatrove-style jsonl rows {"id", "text", "metadata": {"source", ...}}, which the data pipeline
(`qwen25.data`) reads with `input: {kind: jsonl, ...}`.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's .py files (tests, demos and site-packages left out), sorted for determinism."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} not found")
    return sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts))


def docstrings(source: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of a module, its classes and functions, in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # old escape sequences in some stdlib files
        tree = ast.parse(source)
    out = []

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    out.append((name, doc))
                visit(child, name + ".")

    doc = ast.get_docstring(tree)
    if doc:
        out.append(("", doc))
    visit(tree, "")
    return out


def stdlib_documents(max_bytes: int | None = None, root: str | Path | None = None) -> Iterator[dict]:
    """Code documents (one per file) and documentation documents (one per module's docstrings), alternating,
    until `max_bytes` of text (all when None)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    total = 0
    for path in stdlib_files(root):
        try:
            source = path.read_text(encoding="utf-8")
            docs = docstrings(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        rows = [{"id": f"code/{module}", "text": source, "metadata": {"source": "stdlib-code", "module": module}}]
        if docs:
            text = "\n\n".join(f"{module}.{name}\n{doc}" if name else f"{module}\n{doc}" for name, doc in docs)
            rows.append({"id": f"doc/{module}", "text": text, "metadata": {"source": "stdlib-docs", "module": module}})
        for row in rows:
            if max_bytes is not None and total >= max_bytes:
                return
            total += len(row["text"].encode("utf-8"))
            yield row
