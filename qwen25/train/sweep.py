"""A sweep: train every combination of small models x token budgets x learning rates x batch sizes (x corpora)
and record each run's final loss (and held-out loss) in sweep_dir/results.jsonl; the fits are in scaling.py
(mu_opt, B_opt) and loss_law.py (L(N, D) and L(N, D_eff)). A restarted sweep skips finished runs.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import param_count
from ..data.shards import TokenShards
from ..model import load_model
from .distributed import rank_and_world
from .loop import TrainConfig, count_targets, lm_loss, model_config, resolve_config, train
from .scaling import read_results


def sweep_grid(raw: dict) -> list[dict]:
    """The runs of a sweep config: one dict of TrainConfig options per (model, tokens, lr, batch_size[, data]).

    An optional `data` axis lists corpora, each {name, path[, quality]}: token-shard folders of known mean quality
    (or read from the shards' index meta "quality"), for the loss law in D_eff = quality x tokens (loss_law.py)."""
    grid = raw.get("grid", {})
    missing = [k for k in ("models", "tokens", "lr", "batch_size") if not grid.get(k)]
    if missing:
        raise ValueError(f"sweep config: grid needs non-empty lists for {', '.join(missing)}")
    base = dict(raw.get("base", {}))
    corpora = [dict(c) for c in grid["data"]] if grid.get("data") else [None]
    for c in corpora:
        if c is not None and not {"name", "path"} <= set(c):
            raise ValueError(f"sweep config: each grid.data entry needs name and path, got {c}")
    runs = []
    for model, tokens, lr, batch, corpus in itertools.product(grid["models"], grid["tokens"], grid["lr"],
                                                              grid["batch_size"], corpora):
        model = {"preset": model} if isinstance(model, str) else dict(model)
        name = model.pop("name", None) or "-".join([model.get("preset", base.get("model", "tiny"))]
                                                   + [f"{k}{v}" for k, v in sorted(model.items()) if k != "preset"])
        preset = model.pop("preset", base.get("model", "tiny"))
        lr = lr if lr == "auto" else float(lr)  # auto: each run at the scaling fit's mu_opt(N, D)
        run_name = f"{name}_D{tokens}_lr{lr if lr == 'auto' else format(lr, 'g')}_B{batch}" + (
            f"_{corpus['name']}" if corpus else "")
        run = {**base, "model": preset, "model_overrides": {**base.get("model_overrides", {}), **model},
               "tokens": int(tokens), "lr": lr, "batch_size": int(batch), "name": run_name}
        if corpus:
            run["data"] = str(corpus["path"])
            run["quality"] = float(corpus["quality"] if "quality" in corpus else corpus_quality(corpus["path"]))
        runs.append(run)
    return runs


def corpus_quality(shards: str | Path) -> float:
    """The mean quality a token-shard folder records in its index meta (written by whoever packed it)."""
    meta = json.loads((Path(shards) / "index.json").read_text()).get("meta", {})
    if "quality" not in meta:
        raise ValueError(f"{shards}: no quality in index.json's meta; give the corpus a quality in the sweep config")
    return float(meta["quality"])


def heldout_loss(model, shards: str | Path, batch_size: int = 16, max_rows: int | None = None) -> float:
    """Mean next-token loss of a model over every target of a token-shard folder (document-masked rows)."""
    data = TokenShards(shards)
    rows = min(len(data), max_rows or len(data))
    total = count = 0.0
    model.eval()
    with torch.inference_mode():
        for start in range(0, rows, batch_size):
            batch = data.rows(range(start, min(rows, start + batch_size)))
            n = count_targets(batch)
            if n:
                total += lm_loss(model, batch, None).item() * n
                count += n
    return total / max(count, 1.0)


def final_loss(run_dir: Path, tail: float = 0.2) -> float:
    """Mean training loss over the last `tail` share of steps (at least one): the run's score."""
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    if not losses:
        return math.inf
    k = max(1, round(len(losses) * tail))
    return float(np.mean(losses[-k:]))


def run_sweep(raw: dict, progress: bool = True) -> list[dict]:
    """Train every grid point of a sweep config (skipping recorded ones); results go to out_dir/results.jsonl."""
    sweep_dir = Path(raw["out_dir"])
    sweep_dir.mkdir(parents=True, exist_ok=True)
    results_path = sweep_dir / "results.jsonl"
    done = {r["name"] for r in read_results(sweep_dir)} if results_path.is_file() else set()
    results = []
    eval_data = raw.get("eval_data")  # clean held-out shards: each run's held-out loss (the loss law's y)
    for run in tqdm(sweep_grid(raw), desc="sweep", disable=not progress or rank_and_world()[0] != 0):
        name, quality = run.pop("name"), run.pop("quality", None)
        if name in done:
            continue
        cfg = resolve_config(TrainConfig.from_dict({**run, "out_dir": str(sweep_dir / "runs" / name)}))
        extra = {} if quality is None else {"quality": quality}
        try:
            train(cfg, progress=False)
            loss = final_loss(Path(cfg.out_dir))
            if eval_data:
                extra["heldout_loss"] = heldout_loss(load_model(Path(cfg.out_dir) / "final", dtype="fp32"), eval_data)
        except RuntimeError as e:  # diverged (repeated non-finite losses): a data point of its own
            print(f"{name}: {e}")
            loss = math.inf
            extra["heldout_loss"] = math.inf
        record = {"name": name, "N": param_count(model_config(cfg), embeddings=False), "D": cfg.tokens,
                  "tokens_trained": cfg.steps * cfg.batch_size * cfg.seq_len * cfg.grad_accum, "lr": cfg.lr,
                  "batch_size": cfg.batch_size, "batch_tokens": cfg.batch_size * cfg.seq_len * cfg.grad_accum,
                  "steps": cfg.steps, "loss": loss, **extra}
        if rank_and_world()[0] == 0:  # under torchrun every process trains; one records
            with results_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        results.append(record)
    return results
