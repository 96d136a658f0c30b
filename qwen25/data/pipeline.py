"""The pre-training data pipeline: a YAML/TOML config names the input, the executor and an ordered list of steps.

    output: runs/data                      # everything goes here (stages/, logs/, dropped/, shards/, stats.json)
    tokenizer: path/to/tokenizer           # a qwen25 / HF tokenizer directory
    input: {kind: text, path: src, glob: "**/*.py"}        # or {kind: jsonl, path: DIR, text_key: text}
    executor: {kind: local, tasks: 4, workers: 2}           # local (default), ray or slurm (+ their options)
    steps:
      - filters: {fineweb: {}, gopher_repetition: {}}       # datatrove's heuristic filters
      - minhash: {n_grams: 5, num_buckets: 14, hashes_per_bucket: 8}
      - quality: {rate: {kind: lm, model: DIR}, sample_rate: 0.05, threshold: 0.4}   # or classifier: FILE.npz
      - domains: {}
      - decontaminate: {test_sets: [{path: humaneval, fields: [prompt, canonical_solution]}]}
      - mixture: {weights: {code: 0.3, technology: 0.3, science: 0.2, general: 0.2}, unit: tokens}
      - pack: {seq_len: 2048, method: best_fit}

Each step is one or more datatrove executor runs reading the previous step's jsonl.gz output; between runs
come the global steps (train the quality classifier, plan the mixture, pack). Resuming: datatrove's completion
markers (logs/STEP/completions/) skip finished tasks, and the global steps skip when their output file exists,
so a rerun after a failure does not redo finished work. Dropped documents go to dropped/STEP/ with the reason.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path

import tomllib
from tqdm import tqdm

from ..utils import load_yaml
from .decontam import humaneval_path
from .domains import DomainTagger
from .mixture import DomainHistogram, MixtureSampler, merge_histograms, plan_mixture
from .pack import PackStep, is_packed, merge_parts, pack_folder
from .quality import QualityFilter, RatingSampler, train_from_ratings
from .stats import summarize_stage, write_report
from .steps import DecontaminationFilter, EffectiveTokens, SafeJsonlReader, TokenCounter, make_filters, make_reader

STEP_NAMES = ("filters", "minhash", "quality", "domains", "decontaminate", "mixture", "pack")


class PipelineError(ValueError):
    """The pipeline config is invalid, or the output directory belongs to another config."""


def load_config(path: str | Path) -> dict:
    """Read a .yaml/.yml/.toml pipeline config; relative paths in it are resolved against the file's folder."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    config = tomllib.loads(text) if path.suffix == ".toml" else load_yaml(text)
    if not isinstance(config, dict):
        raise PipelineError(f"{path}: a pipeline config must be a mapping, got {type(config).__name__}")
    config.setdefault("base_dir", str(path.parent.resolve()))
    return config


def _steps(config: dict) -> list[tuple[str, dict]]:
    steps = []
    for i, entry in enumerate(config.get("steps") or []):
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise PipelineError(f"steps[{i}] must be one name or a one-key mapping {{name: options}}, got {entry!r}")
        (name, opts), = entry.items()
        if name not in STEP_NAMES:
            raise PipelineError(f"steps[{i}]: unknown step {name!r}; known: {', '.join(STEP_NAMES)}")
        steps.append((name, dict(opts or {})))
    if not steps:
        raise PipelineError("the config lists no steps")
    if any(name == "pack" for name, _ in steps[:-1]):
        raise PipelineError("pack must be the last step")
    return steps


_FORKED = {"die_with_parent": False, "parent": 0}


def _remember_parent() -> None:
    _FORKED["parent"] = os.getpid()


def _die_with_parent() -> None:
    """In a process forked while a local pipeline runs (datatrove's pool workers and its Manager server): have
    Linux SIGKILL it when its parent dies, so a killed pipeline leaves no worker still writing files."""
    if not _FORKED["die_with_parent"] or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != _FORKED["parent"]:  # the parent died between the fork and the prctl
        os._exit(1)


os.register_at_fork(before=_remember_parent, after_in_child=_die_with_parent)


def make_executor(pipeline: list, logging_dir: Path, spec: dict, tasks: int | None = None):
    """A datatrove executor for one run: local processes (default), Ray (`ray.init` must reach a cluster or start
    a local one) or Slurm (submitted with sbatch; `run_executor` then waits for the completion markers)."""
    spec = dict(spec)
    kind = spec.pop("kind", "local")
    tasks = tasks if tasks is not None else spec.pop("tasks", 1)
    spec.pop("tasks", None)
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor


        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=spec.pop("workers", 1),
                                     logging_dir=str(logging_dir), start_method=spec.pop("start_method", "fork"),
                                     **spec)
    if kind == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(pipeline, tasks=tasks, logging_dir=str(logging_dir), **spec)
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        return SlurmPipelineExecutor(pipeline, tasks=tasks, logging_dir=str(logging_dir), **spec)
    raise PipelineError(f"executor kind must be local, ray or slurm, got {kind!r}")


def run_executor(executor, poll_seconds: float = 30.0) -> None:
    """Run and, for executors that only submit (Slurm), wait until every task has its completion marker.
    Processes forked during the run die with the process that forked them (see _die_with_parent)."""
    _FORKED["die_with_parent"] = True
    try:
        executor.run()
    finally:
        _FORKED["die_with_parent"] = False
    while executor.get_incomplete_ranks(skip_completed=True):
        time.sleep(poll_seconds)


def quiet_datatrove_logs() -> None:
    """Datatrove logs every task at INFO to stderr (the full log stays in logs/STEP/logs/): keep warnings only."""
    import sys

    import datatrove.executor.base as executor_base
    import datatrove.utils.logging as dt_logging
    from loguru import logger

    def default_logger():
        logger.remove()
        logger.add(sys.stderr, level="WARNING")

    def task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
        logger.remove()
        logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
        logger.add(sys.stderr, level="WARNING")
        logger.add(logfile, level="DEBUG")
        return logfile

    dt_logging.setup_default_logger = default_logger
    executor_base.add_task_logger = task_logger
    default_logger()


def read_task_stats(logging_dir: Path) -> list[dict]:
    """Datatrove's per-task stats files of one run, summed per step: [{name, stats: {metric: total}}]."""
    merged: list[dict] = []
    for path in sorted((Path(logging_dir) / "stats").glob("*.json")):
        for i, step in enumerate(json.loads(path.read_text())):
            if i == len(merged):
                merged.append({"name": step["name"], "stats": {}})
            for key, value in step["stats"].items():
                total = value.get("total", 0) if isinstance(value, dict) else value
                merged[i]["stats"][key] = merged[i]["stats"].get(key, 0) + total
    return merged


class DataPipeline:
    """Builds and runs the steps of a config (see the module docstring); run() returns the statistics."""

    def __init__(self, config: dict):
        self.config = dict(config)
        self.base = Path(self.config.get("base_dir", "."))
        if "output" not in self.config:
            raise PipelineError("the config needs `output` (the folder for stages, shards and stats)")
        self.out = self._path(self.config["output"])
        self.steps = _steps(self.config)
        self.executor_spec = dict(self.config.get("executor") or {"kind": "local"})
        self.tasks = int(self.executor_spec.get("tasks", 1))
        tok = self.config.get("tokenizer")
        self.tokenizer_dir = str(self._path(tok)) if tok else None
        needs_tok = {"decontaminate", "pack"} & {n for n, _ in self.steps}
        if any(n == "mixture" and o.get("unit", "tokens") == "tokens" for n, o in self.steps):
            needs_tok.add("mixture in tokens")
        if needs_tok and not self.tokenizer_dir:
            raise PipelineError(f"steps {sorted(needs_tok)} need `tokenizer` (a tokenizer directory)")
        if "input" not in self.config or "path" not in self.config["input"]:
            raise PipelineError("the config needs `input: {kind: jsonl|text, path: ...}`")
        for what, path in (("input.path", self.config["input"]["path"]), ("tokenizer", tok)):
            if path and "://" not in str(path) and not self._path(path).exists():
                raise PipelineError(f"{what}: {self._path(path)} does not exist")
        self.stage_stats: list[dict] = []
        self.extra: dict = {}

    def _path(self, p) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else self.base / p

    def _check_output_dir(self) -> None:
        """Refuse to resume in a folder written by another config: finished tasks would be silently reused."""
        self.out.mkdir(parents=True, exist_ok=True)
        record = self.out / "config.json"
        mine = {k: v for k, v in self.config.items() if k not in ("base_dir", "executor")}
        mine["tasks"] = self.tasks  # completion markers are per task: another task count would skip wrong work
        mine = json.loads(json.dumps(mine, default=str))
        if record.is_file() and json.loads(record.read_text()) != mine:
            raise PipelineError(f"{self.out} holds the output of a different config ({record}); "
                                "use a new output folder or delete this one")
        record.write_text(json.dumps(mine, indent=1))
        # Input files are dealt to tasks by their sorted position: a file added, removed or rewritten after some
        # tasks finished would shift that deal, and a rerun would lose some documents and duplicate others.
        manifest, inputs = self._input_manifest(), self.out / "inputs.json"
        if inputs.is_file():
            before = json.loads(inputs.read_text())
            if before != manifest:
                added = sorted(set(manifest) - set(before))
                removed = sorted(set(before) - set(manifest))
                changed = sorted(f for f in set(before) & set(manifest) if before[f] != manifest[f])
                what = "; ".join(f"{k}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                                 for k, v in (("added", added), ("removed", removed), ("changed", changed)) if v)
                raise PipelineError(f"the input files changed since {self.out} was started ({what}): resuming would "
                                    f"lose and duplicate documents. Use a new output folder, or restore the inputs")
        else:
            inputs.write_text(json.dumps(manifest, indent=1))

    def _input_manifest(self) -> dict:
        """{file: size in bytes} of the raw input as its reader deals it to tasks (None: size unknown, remote)."""
        reader = self.reader(None)
        files = reader.data_folder.list_files(recursive=reader.recursive, glob_pattern=reader.glob_pattern)
        size = reader.data_folder.size if hasattr(reader.data_folder, "size") else None
        return {f: (size(f) if size else None) for f in files}

    def reader(self, folder: Path | None):
        """The raw input reader (folder None) or a jsonl reader of a previous step's output."""

        if folder is None:
            spec = dict(self.config["input"])
            spec["path"] = str(self._path(spec["path"]))
            return make_reader(spec)
        return SafeJsonlReader(str(folder), glob_pattern="*.jsonl.gz")

    def writer(self, folder: Path):
        from datatrove.pipeline.writers import JsonlWriter

        return JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz")

    def tail(self, folder: Path) -> list:
        """The end of a step's pipeline: count tokens (once: later steps find metadata token_count, and datatrove's
        readers and writers report it as doc_len_tokens) and effective tokens (q * n per domain, once documents
        have a quality score) when there is a tokenizer, then write the documents."""

        counter = [TokenCounter(self.tokenizer_dir), EffectiveTokens()] if self.tokenizer_dir else []
        return [*counter, self.writer(folder)]

    def exclusion(self, name: str):
        return self.writer(self.out / "dropped" / name)

    def execute(self, label: str, pipeline: list, tasks: int | None = None) -> list[dict]:
        """One executor run, logged in logs/LABEL (its completion markers make reruns skip finished tasks)."""
        logs = self.out / "logs" / label
        run_executor(make_executor(pipeline, logs, self.executor_spec, tasks))
        return read_task_stats(logs)

    def run(self) -> dict:
        """Run every step (skipping finished work), write stats.json and stats.png; returns the statistics."""

        self._check_output_dir()
        previous: Path | None = None
        bar = tqdm(self.steps, desc="data pipeline", unit="step")
        for i, (name, opts) in enumerate(bar):
            bar.set_postfix_str(name)
            label = f"{i:02d}_{name}"
            out = self.out / "stages" / label
            start = time.time()
            step_stats = getattr(self, f"step_{name}")(label, previous, out, opts)
            self.stage_stats.append(summarize_stage(label, step_stats, time.time() - start))
            previous = out
        return write_report(self.out, self.stage_stats, self.extra)

    # ---- steps: each returns the datatrove stats of its executor runs ----------------------------------------

    def step_filters(self, label, previous, out, opts):
        filters = make_filters(opts, lambda f: self.exclusion(f"{label}/{f}"))
        return self.execute(label, [self.reader(previous), *filters, *self.tail(out)])

    def step_minhash(self, label, previous, out, opts):
        from datatrove.pipeline.dedup import (
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )
        from datatrove.pipeline.dedup.minhash import MinhashConfig

        cfg = MinhashConfig(**opts)
        work = str(self.out / "minhash" / label)
        sigs, buckets, remove = f"{work}/sigs", f"{work}/buckets", f"{work}/remove_ids"
        self.execute(f"{label}_signatures", [self.reader(previous), MinhashDedupSignature(sigs, config=cfg)])
        self.execute(f"{label}_buckets", [MinhashDedupBuckets(sigs, buckets, config=cfg)], tasks=cfg.num_buckets)
        self.execute(f"{label}_clusters", [MinhashDedupCluster(buckets, remove, config=cfg)], tasks=1)
        return self.execute(label, [self.reader(previous),
                                    MinhashDedupFilter(remove, exclusion_writer=self.exclusion(label)),
                                    *self.tail(out)])

    def step_quality(self, label, previous, out, opts):
        classifier = opts.get("classifier")
        if classifier:
            classifier = self._path(classifier)
        else:
            if "rate" not in opts:
                raise PipelineError("quality needs `classifier: FILE.npz` or `rate: {kind: lm|field, ...}`")
            work = self.out / "quality" / label
            rater = dict(opts["rate"])
            for key in ("model", "tokenizer"):
                if key in rater:
                    rater[key] = str(self._path(rater[key]))
            self.execute(f"{label}_rate", [self.reader(previous), RatingSampler(
                work / "ratings", rater, opts.get("sample_rate", 0.1), opts.get("max_rated_docs"),
                opts.get("seed", 0))])
            classifier = work / "classifier.npz"
            if not classifier.is_file():
                self.extra[f"{label}_training"] = train_from_ratings(work / "ratings", classifier,
                                                                     **opts.get("fit", {}))
        return self.execute(label, [self.reader(previous),
                                    QualityFilter(classifier, opts.get("threshold", 0.5), self.exclusion(label)),
                                    *self.tail(out)])

    def step_domains(self, label, previous, out, opts):
        if opts.get("classifier"):
            opts["classifier"] = str(self._path(opts["classifier"]))
        return self.execute(label, [self.reader(previous), DomainTagger(**opts), *self.tail(out)])

    def step_decontaminate(self, label, previous, out, opts):
        sets = []
        for spec in opts.get("test_sets") or []:
            spec = dict(spec)
            spec["path"] = str(humaneval_path() if spec["path"] == "humaneval" else self._path(spec["path"]))
            sets.append(spec)
        if not sets:
            raise PipelineError("decontaminate needs test_sets: [{path: FILE.jsonl, fields: [...]}]")
        step = DecontaminationFilter(self.tokenizer_dir, sets, opts.get("window", 512), opts.get("stride", 128),
                                     self.exclusion(label))
        return self.execute(label, [self.reader(previous), step, *self.tail(out)])

    def step_mixture(self, label, previous, out, opts):
        unit, seed = opts.get("unit", "tokens"), opts.get("seed", 0)
        count = [TokenCounter(self.tokenizer_dir)] if unit == "tokens" and self.tokenizer_dir else []
        work = self.out / "mixture" / label
        self.execute(f"{label}_counts", [self.reader(previous), *count, DomainHistogram(work / "counts", unit, seed)])
        plan_file = work / "plan.json"
        if not plan_file.is_file():
            if "weights" not in opts and "factors" not in opts:
                raise PipelineError("mixture needs weights: {domain: weight, ...} and/or factors: {domain: rate}")
            plan = plan_mixture(merge_histograms(work / "counts"), opts.get("weights", {}), opts.get("total"),
                                opts.get("max_repeat"), opts.get("unlisted_rate", 0.0), opts.get("factors"))
            plan_file.write_text(json.dumps({"unit": unit, "seed": seed, "domains": plan}, indent=1))
        self.extra["mixture"] = {"plan": json.loads(plan_file.read_text()),
                                 "output_counts": str(work / "output_counts")}
        return self.execute(label, [self.reader(previous), *count,
                                    MixtureSampler(plan_file, seed, exclusion_writer=self.exclusion(label)),
                                    DomainHistogram(work / "output_counts", unit, seed), *self.tail(out)])

    def step_pack(self, label, previous, out, opts):
        shards, tasks = self.out / "shards", int(opts.pop("tasks", 1))
        if not is_packed(shards):
            if tasks == 1:  # one process: one shuffle over every document, the same for any earlier task count
                pack_folder(self.reader(previous), self.tokenizer_dir, shards, **opts)
            else:  # one part per task, shuffled within the task; then one index over the parts
                self.execute(label, [self.reader(previous), PackStep(self.tokenizer_dir, shards, **opts)],
                             tasks=tasks)
                merge_parts(shards)
        index = json.loads((shards / "index.json").read_text())
        self.extra["pack"] = {k: index["meta"][k] for k in ("method", "documents", "tokens", "rows", "padding",
                                                            "padding_fraction")}
        self.extra["pack"]["seq_len"] = index["seq_len"]
        return [{"name": "pack", "stats": {"total": index["meta"]["documents"],
                                           "forwarded": index["meta"]["documents"],
                                           "tokens": index["meta"]["tokens"]}}]
