"""The one optimisation loop of qwen25. Pre-training (loop.train) and every post-training stage
(post/runner.run_stage_steps) give it a step function, the forward and backward passes of one optimizer step
(micro-batch accumulation included), and it does the rest: resume from the newest intact checkpoint (a changed
config refused), the learning rate (warm-up, then cosine to min_lr_ratio * lr), gradient clipping, the guard
against non-finite steps, the optimizer step, metrics (metrics.jsonl, TensorBoard, the progress bar) and
checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from .checkpoint import latest_checkpoint
from .schedule import lr_at


class LoopConfig(Protocol):
    """The options of a run the loop reads (TrainConfig and post-training's StageConfig both have them)."""

    lr: float
    warmup: int
    min_lr_ratio: float
    clip: float
    max_bad_steps: int
    save_every: int
    log_every: int


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget metric lines of steps after the checkpoint we resume from (they are about to be redone), and a
    line a kill tore in half."""
    if not path.is_file():
        return
    kept, torn = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            if row["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            torn += line.strip() != ""
    if torn:
        print(f"{path}: dropped {torn} unreadable line(s) (a write cut short)")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    tmp.replace(path)


# Options that may change between invocations of one run without changing what it computes.
RESUME_FREE = frozenset({"out_dir", "save_every", "keep_last", "log_every", "stop_at", "tensorboard", "peak_flops",
                         "compile", "max_bad_steps", "device", "allow_config_change"})


def record_run_config(path: Path, config: dict, resuming: bool, allow_change: bool, free=RESUME_FREE) -> None:
    """Write a run's config to `path`. When resuming, the config saved there by the run's earlier invocations
    must agree on every option outside `free` (seed, batch size, lr, steps...: a change would silently train
    another run on top of this one's checkpoints): refused with the differences named, unless allow_change,
    which logs them."""
    config = json.loads(json.dumps(config))  # tuples as lists, as read back
    if resuming and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = None
        if isinstance(saved, dict):
            changed = {k: (saved.get(k), config.get(k)) for k in sorted(set(saved) | set(config))
                       if k not in free and saved.get(k) != config.get(k)}
            if changed:
                what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                if not allow_change:
                    raise ValueError(f"{path.parent}: resuming with a changed config ({what}) would continue this "
                                     f"run's checkpoints as another run. Use a new out_dir, restore the options, "
                                     f"or resume anyway with --allow-config-change.")
                print(f"{path.parent}: resuming with a changed config (allowed): {what}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)


def resume(out: Path, config_file: str, config: dict, allow_change: bool, load: Callable[[Path], dict],
           desc: str, rank: int = 0) -> dict:
    """Record the run's config in out/config_file (refused if it changed since the last invocation, see
    record_run_config) and load its newest intact checkpoint with `load(path) -> saved state`; returns that state
    ({"step": 0} for a fresh run). Metric lines past the checkpoint are dropped: those steps run again."""
    last = latest_checkpoint(out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        record_run_config(out / config_file, config, resuming=last is not None, allow_change=allow_change)
    if last is None:
        return {"step": 0}
    saved = load(last)
    if rank == 0:
        print(f"{desc}: resuming from {last} (step {saved['step']})")
        drop_metrics_after(out / "metrics.jsonl", saved["step"])
    return saved


def run_steps(cfg: LoopConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              step_fn: Callable[[int], dict], *, start: int, end: int, total: int, out: Path,
              save: Callable[[int], None], clip: Callable[[float], float] | None = None,
              derive: Callable[[dict], dict] | None = None, board=None, desc: str = "train", progress: bool = True,
              rank: int = 0) -> dict:
    """Run optimizer steps [start, end) of a schedule of `total` steps; returns the last step's metrics.

    step_fn(step) runs the forward and backward passes and returns the step's metrics: "loss" (required), "tokens"
    (for tokens_per_s) and any of its own. The loop adds step, lr, grad_norm and seconds; derive(metrics) may add
    more (pre-training's MFU). clip(max_norm) clips the gradients and returns their norm before clipping (default:
    over the model's parameters). save(step) writes a checkpoint: every save_every steps, at `end` and at `total`.
    A step whose loss or gradient norm is not finite is skipped (the optimizer does not step); max_bad_steps in a
    row stop the run. Rank 0 writes out/metrics.jsonl (every log_every steps) and the TensorBoard `board`.
    """
    clip = clip or (lambda max_norm: float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
    device = next(model.parameters()).device
    log = (out / "metrics.jsonl").open("a") if rank == 0 else None
    bad, metrics = 0, {}
    try:
        bar = tqdm(range(start, end), initial=start, total=total, disable=not progress or rank != 0, desc=desc)
        for step in bar:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.warmup, total, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_metrics = step_fn(step)
            grad_norm = clip(cfg.clip)
            if not (math.isfinite(step_metrics["loss"]) and math.isfinite(grad_norm)):
                bad += 1
                if rank == 0:
                    print(f"{desc} step {step}: non-finite loss {step_metrics['loss']} / grad norm {grad_norm}; "
                          f"step skipped")
                if bad >= cfg.max_bad_steps:
                    raise RuntimeError(f"{desc}: stopped after {bad} consecutive non-finite steps (last at step "
                                       f"{step}); lower the learning rate or check the data")
                continue
            bad = 0
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            metrics = {"step": step + 1, **step_metrics, "lr": lr, "grad_norm": grad_norm, "seconds": seconds}
            if "tokens" in step_metrics:
                metrics["tokens_per_s"] = step_metrics["tokens"] / seconds
            if derive is not None:
                metrics.update(derive(metrics))
            if log is not None and (step + 1) % cfg.log_every == 0:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                if board is not None:
                    for key, value in metrics.items():
                        if key != "step":
                            board.add_scalar(f"{desc}/{key}", value, step + 1)
            shown = {"loss": f"{metrics['loss']:.4f}", "lr": f"{lr:.2e}"}
            if "tokens_per_s" in metrics:
                shown["tok_s"] = f"{metrics['tokens_per_s']:,.0f}"
            if "mfu" in metrics:
                shown["mfu"] = f"{metrics['mfu']:.1%}"
            bar.set_postfix(shown)
            if (step + 1) % cfg.save_every == 0 or step + 1 in (total, end):
                save(step + 1)
    finally:
        if log is not None:
            log.close()
    return metrics
