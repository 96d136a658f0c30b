"""The pre-training loop: short and linear, the model untouched (torchtitan spirit).

Next-token loss over packed rows with document-masked attention and per-document positions, AdamW
(0.9, 0.95, eps 1e-8), warm-up then cosine to 10% of peak, bf16 autocast, gradient clipping and
accumulation, non-finite losses skipped (and a stop after too many in a row), metrics to JSONL, and
atomic checkpoints that resume exactly. Data comes from any object with `batch(step) -> tokens` of shape
(batch, seq_len + 1): the batch for a step is a pure function of the step, so resuming needs no iterator state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import ModelConfig
from ..model import CausalLM, save_model
from .checkpoint import latest_checkpoint, load_training_state, save_training_state
from .packing import document_ids_from_eos, document_mask, document_positions
from .schedule import lr_at


@dataclass
class TrainConfig:
    """Everything a run needs besides the data; saved as config.json beside its checkpoints."""

    out_dir: str
    model: str = "tiny"  # a preset name, or a directory with config.json
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0
    dtype: str = "bf16"  # autocast dtype for the forward pass; weights and optimizer stay fp32
    eos_id: int | None = None  # documents end with it: attention is masked at their boundaries
    seed: int = 0
    save_every: int = 50
    keep_last: int = 3
    log_every: int = 1
    max_bad_steps: int = 5  # consecutive non-finite losses before stopping

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**raw)


class TokenWindows:
    """Random windows of seq_len + 1 tokens from one token tensor; batch(step) is deterministic in (seed, step)."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        if tokens.numel() < seq_len + 2:
            raise ValueError(f"need more than {seq_len + 1} tokens, got {tokens.numel()}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens.long(), batch_size, seq_len, seed

    def batch(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch_size,), generator=g)
        return torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])


def build_model(cfg: TrainConfig) -> CausalLM:
    mcfg = ModelConfig.from_json(cfg.model) if Path(cfg.model).is_dir() else ModelConfig.from_preset(cfg.model)
    model = CausalLM(mcfg)
    model.init_weights(seed=cfg.seed)
    return model


def build_optimizer(model: CausalLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lm_loss(model: CausalLM, batch: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Mean next-token cross entropy of a (batch, seq + 1) token tensor, document-masked when eos_id is set."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    positions = mask = None
    if eos_id is not None:
        docs = document_ids_from_eos(inputs, eos_id)
        positions, mask = document_positions(docs), document_mask(docs)
    logits = model(inputs, position_ids=positions, mask=mask)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _drop_metrics_after(path: Path, step: int) -> None:
    """Forget metric lines of steps after the checkpoint we resume from (they are about to be redone)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def train(cfg: TrainConfig, data, progress: bool = True) -> dict:
    """Run (or resume) training; returns the final metrics. Writes out_dir/{config.json,metrics.jsonl,step-*}."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).train()
    optimizer = build_optimizer(model, cfg)
    start = 0
    if (last := latest_checkpoint(out)) is not None:
        start = load_training_state(last, model, optimizer)["step"]
        print(f"resuming from {last} (step {start})")
        _drop_metrics_after(out / "metrics.jsonl", start)
    autocast = torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    metrics_file = (out / "metrics.jsonl").open("a")
    bad, last_metrics = 0, {}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train")
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            with autocast:
                loss = lm_loss(model, data.batch(step * cfg.grad_accum + micro), cfg.eos_id) / cfg.grad_accum
            loss.backward()
            total += loss.item()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            bad += 1
            print(f"step {step}: non-finite loss {total} / grad norm {grad_norm}; step skipped")
            if bad >= cfg.max_bad_steps:
                raise RuntimeError(f"stopped: {bad} consecutive non-finite steps (last at step {step}); "
                                   f"lower the learning rate or check the data")
            continue
        bad = 0
        optimizer.step()
        seconds = time.perf_counter() - t0
        last_metrics = {"step": step + 1, "loss": total, "lr": lr, "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_step / seconds}
        if (step + 1) % cfg.log_every == 0:
            metrics_file.write(json.dumps(last_metrics) + "\n")
            metrics_file.flush()
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:,.0f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_training_state(out, step + 1, model, optimizer, data_state={"next_step": step + 1},
                                keep_last=cfg.keep_last)
    metrics_file.close()
    save_model(model, out / "final")
    return last_metrics
