"""Resumable stages and the recipe report.

A recipe run is a folder: `recipe.json` (the resolved config; a rerun with another config is refused), one
folder per stage under `stages/`, and `stages/NAME/done.json` once a stage has finished (its seconds, metrics
and outputs). A rerun skips finished stages and re-enters the unfinished one, whose own code resumes from its
checkpoints (training) or completion markers (data pipeline).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class RecipeError(RuntimeError):
    """A recipe run cannot go on (another config in the folder, a stage failed)."""


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


@dataclass
class StageRecord:
    """What a finished stage left: seconds, metrics (flat name -> number), outputs (name -> path), notes."""

    name: str
    seconds: float
    metrics: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


class RecipeRun:
    """A run folder with resumable stages; `stage(name, fn)` runs fn(stage_dir) -> dict once."""

    def __init__(self, run_dir: str | Path, config: dict, log=print):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config, self.log = config, log
        saved = self.dir / "recipe.json"
        if saved.exists():
            previous = json.loads(saved.read_text())
            if previous != json.loads(json.dumps(config, default=str)):
                raise RecipeError(f"{self.dir} holds a run of another config ({saved}); use another --out or "
                                  f"delete the folder")
        else:
            _write_json(saved, config)
        self.records: dict[str, StageRecord] = {}
        self.command = " ".join(shlex.quote(a) for a in ["qwen25", *sys.argv[1:]]) if sys.argv else ""

    def stage_dir(self, name: str) -> Path:
        path = self.dir / "stages" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done(self, name: str) -> bool:
        return (self.dir / "stages" / name / "done.json").is_file()

    def record(self, name: str) -> StageRecord:
        """The record of a finished stage (an error naming the stage when it has not finished)."""
        marker = self.dir / "stages" / name / "done.json"
        if not marker.is_file():
            raise RecipeError(f"stage {name!r} of {self.dir} has not finished; run the recipe first")
        return StageRecord(**json.loads(marker.read_text()))

    def stage(self, name: str, fn: Callable[[Path], dict]) -> StageRecord:
        """Run a stage unless it has finished before; fn returns {"metrics": {...}, "outputs": {...}, "notes": []}."""
        marker = self.dir / "stages" / name / "done.json"
        if marker.is_file():
            record = StageRecord(**json.loads(marker.read_text()))
            self.log(f"[{name}] done before ({record.seconds:.0f} s), skipped")
        else:
            self.log(f"[{name}] running")
            start = time.perf_counter()
            try:
                result = fn(self.stage_dir(name)) or {}
            except Exception as e:
                raise RecipeError(f"stage {name!r} failed: {type(e).__name__}: {e}. Fix the cause and rerun the "
                                  f"same command: finished stages are skipped.") from e
            record = StageRecord(name, round(time.perf_counter() - start, 1), result.get("metrics", {}),
                                 {k: str(v) for k, v in result.get("outputs", {}).items()}, result.get("notes", []))
            _write_json(marker, record.__dict__)
            self.log(f"[{name}] finished in {record.seconds:.0f} s: "
                     + ", ".join(f"{k} {_fmt(v)}" for k, v in record.metrics.items()))
        self.records[name] = record
        return record


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metrics_table(records: list[StageRecord], keys: list[str] | None = None) -> str:
    """Markdown table: one row per metric, one column per stage that reported it ("" where it did not)."""
    keys = keys or list(dict.fromkeys(k for r in records for k in r.metrics))
    cols = [r for r in records if any(k in r.metrics for k in keys)]
    lines = ["| metric | " + " | ".join(r.name for r in cols) + " |", "|---|" + "---|" * len(cols)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_fmt(r.metrics[key]) if key in r.metrics else "" for r in cols) + " |")
    return "\n".join(lines)


def stage_table(records: list[StageRecord]) -> str:
    """Markdown table, one row per (stage, metric): what each stage reported about its own work."""
    lines = ["| stage | metric | value |", "|---|---|---|"]
    for r in records:
        lines += [f"| {r.name} | {k} | {_fmt(v)} |" for k, v in r.metrics.items()]
    return "\n".join(lines)


def timing_table(records: list[StageRecord]) -> str:
    """Markdown table of wall-clock seconds per stage and the total."""
    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {r.name} | {r.seconds:.0f} |" for r in records]
    lines.append(f"| total | {sum(r.seconds for r in records):.0f} |")
    return "\n".join(lines)
