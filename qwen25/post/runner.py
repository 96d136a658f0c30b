"""What every post-training stage shares: its config fields, model/data loading, and one resumable step loop.

A stage is a `step_fn(step) -> metrics` that runs the forward and backward passes of optimizer step `step`; the
loop around it sets the learning rate (warm-up, then cosine to min_lr_ratio * lr, as in pre-training), clips,
skips non-finite steps, steps the optimizer, appends metrics to metrics.jsonl and writes atomic checkpoints
(qwen25.train.checkpoint) from which a killed run resumes. As in the pre-training loop, the data of a step is a
pure function of (seed, step), so resuming needs no iterator state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..model import CausalLM, load_model, save_model
from ..train.checkpoint import latest_checkpoint, load_training_state, save_training_state
from ..train.loop import RESUME_FREE, drop_metrics_after, record_run_config
from ..train.loop import adamw as train_adamw
from ..train.schedule import lr_at


@dataclass
class StageConfig:
    """Options common to all stages. Defaults are the report's SFT recipe (lr 7e-6 -> 7e-7, wd 0.1, clip 1.0)."""

    out_dir: str = "runs/post"
    model: str = "tiny"  # a checkpoint directory (HF layout), or a preset name for a random start (tests, demos)
    data: str = ""  # a jsonl file (CLI); library callers pass the examples themselves
    tokenizer: str = ""  # a directory with tokenizer.json; default: the model directory
    steps: int = 0  # 0: epochs * examples / batch_size
    epochs: float = 2.0
    batch_size: int = 8
    lr: float = 7e-6
    min_lr_ratio: float = 0.1
    warmup: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0
    dtype: str = "fp32"  # "bf16": autocast the forward passes (weights and optimizer stay fp32)
    device: str = "cpu"  # "cuda" on a GPU machine
    seed: int = 0
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    max_bad_steps: int = 5
    allow_config_change: bool = False  # resume although options that change the stage's result differ

    @classmethod
    def from_dict(cls, raw: dict):
        """Build from a YAML/JSON mapping; unknown keys are an error that names them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(names))}")
        values = dict(raw)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps of the run: `steps`, or enough batches for `epochs` passes over the data."""
        if self.steps > 0:
            return self.steps
        if num_examples == 0:
            raise ValueError("no training examples")
        return max(1, math.ceil(self.epochs * num_examples / self.batch_size))


def load_causal_lm(name: str, seed: int = 0, device: str = "cpu") -> CausalLM:
    """A checkpoint directory in fp32 for training, or a randomly initialised preset, on `device`."""
    if Path(name).is_dir():
        return load_model(name, dtype="fp32", device=device)
    model = CausalLM(ModelConfig.from_preset(name))
    model.init_weights(seed=seed)
    return model.to(device)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A reference model: the same weights, no gradients, eval mode."""
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def example_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """Indices of the examples of optimizer step `step`: a fresh shuffle each epoch, a pure function of its inputs."""
    out = []
    for s in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(s, num_examples)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(order[offset]))
    return out


def adamw(model: torch.nn.Module, cfg: StageConfig) -> torch.optim.AdamW:
    """Pre-training's AdamW (train/loop.py) over the parameters that require grad."""
    return train_adamw((p for p in model.parameters() if p.requires_grad), cfg.lr, cfg.betas, cfg.eps,
                       cfg.weight_decay)


def autocast(cfg: StageConfig):
    """bf16 autocast for the forward passes when cfg.dtype is bf16 (a no-op context otherwise)."""
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16,
                          enabled=cfg.dtype == "bf16")


_NOT_PLOTTED = {"step", "seconds", "tokens", "pairs"}


def plot_metrics(metrics_file: Path, png: Path, title: str, max_panels: int = 8) -> Path | None:
    """One small panel per numeric metric of a run (loss first) against the step: out_dir/metrics.png."""
    if not metrics_file.is_file():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    names = [k for k in rows[0] if k not in _NOT_PLOTTED and isinstance(rows[0][k], (int, float))][:max_panels]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(names))
    fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(3.2 * cols, 2.4 * -(-len(names) // cols)),
                             squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, name in zip(axes.flat, names):
        ax.plot(steps, [r.get(name, float("nan")) for r in rows], lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def run_steps(cfg: StageConfig, model: torch.nn.Module, optimizer, step_fn: Callable[[int], dict],
              total_steps: int, desc: str, save_final: Callable[[Path], None] | None = None,
              progress: bool = True, state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None) -> dict:
    """Run (or resume) optimizer steps [start, total_steps); returns the last metrics.

    step_fn(step) runs forward + backward for the step and returns its metrics ("loss" required, plus any
    stage metrics such as rewards/margins); the loop adds lr, grad_norm, seconds and the step number.
    state: (get, set) of a stage's own JSON-able state (e.g. GRPO's query variances), kept in checkpoints.
    Writes out_dir/{stage_config.json, metrics.jsonl, step-*/, final/}.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last = latest_checkpoint(out)
    record_run_config(out / "stage_config.json", {"stage": desc, **dataclasses.asdict(cfg)}, resuming=last is not None,
                      allow_change=cfg.allow_config_change, free=RESUME_FREE)
    start = 0
    if last is not None:
        saved = load_training_state(last, model, optimizer)
        start = saved["step"]
        if state is not None:
            state[1](saved.get("extra", {}))
        print(f"{desc}: resuming from {last} (step {start})")
        drop_metrics_after(out / "metrics.jsonl", start)
    model.train()
    bad, metrics = 0, {}
    with (out / "metrics.jsonl").open("a") as log:
        bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=not progress, desc=desc)
        for step in bar:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.warmup, total_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_metrics = step_fn(step)
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip)) if params else 0.0
            if not (math.isfinite(step_metrics["loss"]) and math.isfinite(grad_norm)):
                bad += 1
                print(f"{desc} step {step}: non-finite loss {step_metrics['loss']} / grad norm {grad_norm}; skipped")
                if bad >= cfg.max_bad_steps:
                    raise RuntimeError(f"{desc}: stopped after {bad} consecutive non-finite steps (last {step})")
                continue
            bad = 0
            optimizer.step()
            seconds = time.perf_counter() - t0
            metrics = {"step": step + 1, **step_metrics, "lr": lr, "grad_norm": grad_norm, "seconds": seconds}
            if "tokens" in step_metrics:
                metrics["tokens_per_s"] = step_metrics["tokens"] / seconds
            if (step + 1) % cfg.log_every == 0:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{step_metrics['loss']:.4f}", lr=f"{lr:.2e}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == total_steps:
                save_training_state(out, step + 1, model, optimizer, data_state={"next_step": step + 1},
                                    extra=state[0]() if state is not None else None, keep_last=cfg.keep_last)
    if total_steps > start:
        plot_metrics(out / "metrics.jsonl", out / "metrics.png", desc)
    if save_final is not None:
        save_final(out / "final")
    elif isinstance(model, CausalLM):
        save_model(model, out / "final")
    return metrics
