"""What every post-training stage shares: its config fields, model/data loading, and one resumable step loop.

A stage is a `step_fn(step) -> metrics` that runs the forward and backward passes of optimizer step `step`; it
runs in pre-training's own step loop (qwen25.train.steps: the learning rate schedule, clipping, the non-finite
guard, metrics and atomic checkpoints from which a killed run resumes). As in pre-training, the data of a step is
a pure function of (seed, step), so resuming needs no iterator state.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model import CausalLM, load_model, save_model
from ..train.checkpoint import load_training_state, save_training_state
from ..train.loop import adamw as train_adamw
from ..train.steps import resume, run_steps
from ..utils import config_from_dict


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
        return config_from_dict(cls, raw)

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


def run_stage_steps(cfg: StageConfig, model: torch.nn.Module, optimizer, step_fn: Callable[[int], dict],
              total_steps: int, desc: str, save_final: Callable[[Path], None] | None = None,
              progress: bool = True, state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None) -> dict:
    """Run (or resume) optimizer steps [start, total_steps) in the one step loop (qwen25.train.steps); returns the
    last metrics.

    step_fn(step) runs forward + backward for the step and returns its metrics ("loss" required, plus any
    stage metrics such as rewards/margins); the loop adds lr, grad_norm, seconds and the step number.
    state: (get, set) of a stage's own JSON-able state (e.g. GRPO's query variances), kept in checkpoints.
    Writes out_dir/{stage_config.json, metrics.jsonl, metrics.png, step-*/, final/}.
    """
    out = Path(cfg.out_dir)
    saved = resume(out, "stage_config.json", {"stage": desc, **dataclasses.asdict(cfg)}, cfg.allow_config_change,
                   lambda path: load_training_state(path, model, optimizer), desc)
    if state is not None and saved["step"]:
        state[1](saved.get("extra", {}))
    model.train()

    def save(step: int) -> None:
        save_training_state(out, step, model, optimizer, data_state={"next_step": step},
                            extra=state[0]() if state is not None else None, keep_last=cfg.keep_last)

    metrics = run_steps(cfg, model, optimizer, step_fn, start=saved["step"], end=total_steps, total=total_steps,
                        out=out, save=save, desc=desc, progress=progress)
    if total_steps > saved["step"]:
        plot_metrics(out / "metrics.jsonl", out / "metrics.png", desc)
    if save_final is not None:
        save_final(out / "final")
    elif isinstance(model, CausalLM):
        save_model(model, out / "final")
    return metrics
