"""Small helpers shared by the stages: the command-line flags every command spells the same way, config files with
`--set` overrides, and JSON-lines files."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import re
from functools import cache
from pathlib import Path


SET_SYNTAX = ("KEY=VALUE, repeatable; VALUE is read as JSON (numbers such as 1e-6, true/false, null, lists, objects) "
              "and otherwise kept as text")


def add_common_flags(p, *, model: str | None = None, dtype: bool = False, threads: bool = False,
                     sets: str | None = None, quiet: bool = False, sampling: bool = False, sparse: bool = False) -> None:
    """The flags shared by qwen25's commands, spelt and explained the same way everywhere: --model DIR (with `model`
    as its help), --dtype, --threads, --set (`sets` says what it overrides), --quiet, the sampling flags over a
    checkpoint's generation_config.json (read by SamplingParams.from_checkpoint), and sparse prefill's flags (read by
    SparsePrefill.from_flags)."""
    if model is not None:
        p.add_argument("--model", required=True, type=Path, help=model)
    if dtype:
        p.add_argument("--dtype", default="auto", help="bf16, fp32 or auto (the checkpoint's dtype)")
    if threads:
        p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    if sets is not None:
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"{sets}: {SET_SYNTAX}")
    if quiet:
        p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bars")
    if sampling:
        p.add_argument("--sample", action=argparse.BooleanOptionalAction, default=None,
                       help="sample (--sample) or decode greedily (--no-sample); default from generation_config.json")
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-k", type=int)
        p.add_argument("--top-p", type=float)
        p.add_argument("--repetition-penalty", type=float)
        p.add_argument("--seed", type=int, help="seed for sampling (reproducible outputs)")
    if sparse:
        p.add_argument("--sparse-prefill", type=int, nargs="?", const=8192, metavar="MIN_LENGTH",
                       help="sparse attention (MInference-style vertical-slash pattern, searched per KV head) for "
                            "prefill chunks whose keys reach MIN_LENGTH (default 8192): much faster long prompts "
                            "(docs/long_context.md); shorter prompts stay dense")
        p.add_argument("--sparse-max-keys", type=int, default=2048, metavar="N",
                       help="keys a query attends to at most under --sparse-prefill (default 2048)")


def apply_threads(args) -> None:
    """Honour --threads (if the command has it and it was given)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def set_nested(config: dict, changes: dict, where: str = "config") -> dict:
    """Apply `--set` changes with dotted keys (`sft.epochs=2`) to a nested config; every key on a path must exist
    (a typo is an error naming it, never a silently added option)."""
    for dotted, value in changes.items():
        node, keys = config, dotted.split(".")
        for i, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                have = sorted(node) if isinstance(node, dict) else type(node).__name__
                raise ValueError(f"--set {dotted}: {where} has no {'.'.join(keys[:i + 1])} (options here: {have})")
            if i == len(keys) - 1:
                node[key] = value
            else:
                node = node[key]
    return config


def config_from_dict(cls, raw: dict, what: str | None = None, **values):
    """A dataclass config from a YAML/JSON mapping (every config of qwen25 is built this way): an unknown key is an
    error that names it and the known ones; a list given for a tuple field becomes a tuple, a mapping given for a
    field whose default is a dataclass (e.g. `sampling: {temperature: 0.7}`) that dataclass; `values` are set too."""
    if not isinstance(raw, dict):
        raise ValueError(f"{what or cls.__name__}: expected a mapping of options, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"unknown {what or cls.__name__} option(s): {', '.join(unknown)} (unknown keys are refused; "
                         f"known: {', '.join(sorted(fields))})")
    def convert(name, value):
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(value, dict) and dataclasses.is_dataclass(default):  # a nested config, e.g. sampling: {...}
            return config_from_dict(type(default), {**dataclasses.asdict(default), **value},
                                    f"{what or cls.__name__}.{name}")  # over the field's own defaults
        return tuple(value) if isinstance(value, list) and str(f.type).startswith("tuple") else value

    return cls(**{k: convert(k, v) for k, v in raw.items()}, **values)


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


@cache
def _yaml_loader():
    """yaml.SafeLoader with YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-8` and `3e4` as strings, which breaks
    `lr: 1e-4` in a config, and a JSON file with `"eps": 1e-08` (JSON is YAML)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
                   r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))
    return Loader


def load_yaml(text: str):
    """Parse YAML (or JSON) text, reading exponent numbers such as 1e-8 as floats."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | Path, sets: list[str] | None = None) -> dict:
    """A YAML (or JSON) config file as a mapping, with `--set KEY=VALUE` overrides applied on top."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config {path} does not exist")
    raw = load_yaml(path.read_text()) or {}
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
