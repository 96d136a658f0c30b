"""Small helpers shared by the stages: config files with `--set` overrides, and JSON-lines files."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path


def parse_sets(items: list[str] | None) -> dict:
    """`KEY=VALUE` strings as a dict; a value is read as JSON when it parses (numbers, lists, objects, true),
    else kept as text."""
    changes = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    return changes


def load_config(path: str | Path, sets: list[str] | None = None) -> dict:
    """A YAML (or JSON) config file as a mapping, with `--set KEY=VALUE` overrides applied on top."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {path}: expected a mapping of options, got {type(raw).__name__}")
    raw.update(parse_sets(sets))
    return raw


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file (gzip when the name ends in .gz); blank lines skipped, errors name the line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def write_jsonl(path: str | Path, rows) -> int:
    """Write rows as JSON lines through a temporary file renamed at the end (no half-written file); the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
