"""The pre-training loop: short and linear, the model untouched (torchtitan spirit).

Next-token loss over packed rows with document-masked attention and per-document positions, AdamW
(0.9, 0.95, eps 1e-8), warm-up then cosine to 10% of peak, bf16 autocast, gradient clipping and
accumulation, non-finite losses skipped (and a stop after too many in a row), metrics to JSONL (and
TensorBoard when installed), MFU against the measured matmul peak, and atomic checkpoints that resume
exactly. Data comes from any object with `batch(step)` returning tokens (batch, seq_len + 1), or
(tokens, doc_ids) as token shards give them: the batch for a step is a pure function of the step, so
resuming needs no iterator state. Under torchrun the same loop runs FSDP2 (see distributed.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig, flops_per_token, param_count
from ..model import CausalLM, save_model
from ..model.checkpoint import load_weights
from ..model.moe import router_loss
from ..utils import config_from_dict
from . import distributed as dist_utils
from .checkpoint import load_training_state, save_training_state
from .data import ProgressiveMix, ShardBatches, target_mask
from .packing import document_ids_from_eos, document_mask, document_positions
from .scaling import resolve_auto
from .steps import resume, run_steps


@dataclass
class TrainConfig:
    """Everything a run needs besides the data; saved as train_config.json beside its checkpoints."""

    out_dir: str
    model: str = "tiny"  # a preset name, or a directory with config.json
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change, e.g. rope_theta (ABF)
    init_from: str | None = None  # an HF-layout checkpoint whose weights start the run (else random init)
    data: str | None = None  # a token-shard directory (used when train() is given no data object)
    steps: int = 100
    tokens: int | None = None  # a token budget: steps = tokens / (batch_size * seq_len * grad_accum)
    batch_size: int | str = 8  # global rows per micro-batch, over all processes; "auto": the scaling-law fit
    seq_len: int = 256
    grad_accum: int = 1
    lr: float | str = 3e-3  # "auto": mu_opt(N, D) from the scaling-law fit
    scaling_fit: str | None = None  # fit.json written by `qwen25 fit-scaling` (for "auto")
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0
    dtype: str = "bf16"  # autocast dtype for the forward pass; weights and optimizer stay fp32
    device: str = "auto"  # cpu, cuda, or auto (cuda when available)
    eos_id: int | None = None  # token-tensor data only: documents end with it (shards carry doc ids instead)
    long_fraction: float | None = None  # progressive mix: this share of rows at seq_len, the rest shorter
    short_lengths: list[int] | None = None  # lengths of the shorter rows (default seq_len // 2)
    seed: int = 0
    save_every: int = 50
    keep_last: int = 3
    log_every: int = 1
    max_bad_steps: int = 5  # consecutive non-finite losses before stopping
    stop_at: int | None = None  # end this invocation after this step (time-limited jobs); resume continues
    tensorboard: bool = True  # also log to out_dir/tb when tensorboard is installed
    peak_flops: float | None = None  # matmul FLOP/s per process for MFU; None: measured at start
    compile: bool = False  # torch.compile the forward + loss (fuses norms, SwiGLU, RoPE, cross entropy)
    allow_config_change: bool = False  # resume although options that change the run's trajectory differ

    def __post_init__(self):
        # YAML reads 3e-3 (no dot) and 1e9 as strings: accept them, and name what cannot be a number.
        for name, kind in (("lr", float), ("batch_size", int), ("tokens", int), ("peak_flops", float)):
            value = getattr(self, name)
            if isinstance(value, str) and value != "auto":
                try:
                    setattr(self, name, kind(float(value)))
                except ValueError:
                    raise ValueError(f"{name} must be a number{' or auto' if name in ('lr', 'batch_size') else ''}"
                                     f", got {value!r}") from None

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        """Build from a dict (YAML/JSON), naming unknown keys."""
        return config_from_dict(cls, raw, "training")


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


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture a run trains: the preset or config.json, with model_overrides applied."""
    base = ModelConfig.from_json(cfg.model) if Path(cfg.model).is_dir() else ModelConfig.from_preset(cfg.model)
    return base.replace(**cfg.model_overrides) if cfg.model_overrides else base


def build_model(cfg: TrainConfig) -> CausalLM:
    """A fresh model (seeded init), or init_from's weights under this run's config (e.g. a new rope_theta)."""
    model = CausalLM(model_config(cfg))
    if cfg.init_from:
        load_weights(model, cfg.init_from, torch.float32)
    else:
        model.init_weights(seed=cfg.seed)
    return model


def adamw(params, lr: float, betas, eps: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms), as pre- and post-training use it.
    torch's fused kernel (one pass over each tensor's param, grad and moments) on CPU and CUDA: on CPU the default
    per-tensor loop took 59-73 ms a step for the 12.6M-parameter mini model, the fused kernel 24 ms."""
    params = list(params)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def build_optimizer(model: CausalLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """The training run's AdamW over every parameter of the model."""
    return adamw(model.parameters(), cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)


def _tokens_and_docs(batch, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(tokens, doc_ids or None, loss_mask or None) from a token tensor (doc ids from eos_id when set) or a
    (tokens, doc_ids[, loss_mask]) tuple."""
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1], (batch[2] if len(batch) > 2 else None)
    return batch, (document_ids_from_eos(batch, eos_id) if eos_id is not None else None), None


def count_targets(batch, eos_id: int | None = None) -> int:
    """Number of next-token targets in a batch (padding and loss-masked tokens never count)."""
    tokens, docs, loss_mask = _tokens_and_docs(batch, eos_id)
    return int(target_mask(docs, loss_mask).sum()) if docs is not None else tokens[:, 1:].numel()


def moe_router_loss(model: torch.nn.Module, batch, eos_id: int | None) -> torch.Tensor:
    """What a model with experts adds to the LM loss after a forward (model/moe.py's router_loss:
    router_aux_loss_coef x load balancing + router_z_loss_coef x z-loss), padding left out."""
    _, docs, _ = _tokens_and_docs(batch, eos_id)
    return router_loss(model, None if docs is None else docs[:, :-1] >= 0)


def lm_loss(model: CausalLM, batch, eos_id: int | None) -> torch.Tensor:
    """Mean next-token cross entropy over the targets of a batch (rows of seq + 1 tokens).

    `batch` is a token tensor (document-masked by eos_id when set) or (tokens, doc_ids[, loss_mask]) from token
    shards: attention stays inside documents, positions restart per document, and padding (doc id -1) and
    tokens the loss mask marks as context are never targets.
    """
    tokens, docs, loss_mask = _tokens_and_docs(batch, eos_id)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = mask = None
    if docs is not None:
        positions, mask = document_positions(docs[:, :-1]), document_mask(docs[:, :-1])
        targets = targets.masked_fill(~target_mask(docs, loss_mask), -100)
    logits = model(inputs, position_ids=positions, mask=mask)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Resolve `lr: auto`, `batch_size: auto` (scaling-law fit) and a token budget into concrete numbers."""
    if "auto" in (cfg.lr, cfg.batch_size):
        cfg = resolve_auto(cfg, param_count(model_config(cfg), embeddings=False))
    if cfg.tokens is not None:
        per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        cfg = dataclasses.replace(cfg, steps=max(1, round(cfg.tokens / per_step)))
    return cfg


def make_data(cfg: TrainConfig, rank: int = 0, world: int = 1):
    """The data object for cfg.data (token shards), with the progressive long/short mix when configured."""
    if cfg.data is None:
        raise ValueError("no data: give `data: SHARD_DIR` in the training config")
    data = ShardBatches(cfg.data, cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
    if data.seq_len != cfg.seq_len:
        raise ValueError(f"{cfg.data}: shards hold rows of seq_len {data.seq_len}, the config asks for "
                         f"seq_len {cfg.seq_len}")
    if cfg.long_fraction is not None:
        data = ProgressiveMix(data, cfg.long_fraction, cfg.short_lengths or [cfg.seq_len // 2])
    return data


def pick_device(name: str) -> torch.device:
    """cpu / cuda / auto; under torchrun each process takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", dist_utils.local_rank())
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeat: int = 10) -> float:
    """Measured matmul FLOP/s of one device for n x n matrices in `dtype` (best of `repeat`): MFU's denominator.

    Timed with F.linear, the op the model's projections run: on CPUs without native bf16, `a @ b` in bf16 takes
    a path 10x slower than linear's, which would make the peak meaningless. Measured once per process (phases
    share it): on a loaded machine a short measurement comes out low and MFU high (above 100% with 1024 x 1024
    and 5 repeats here).
    """
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    F.linear(a, b)
    sync()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        F.linear(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def _tensorboard(cfg: TrainConfig, out: Path, rank: int):
    if not cfg.tensorboard or rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: JSONL only
        return None
    return SummaryWriter(str(out / "tb"))


def train(cfg: TrainConfig, data=None, progress: bool = True) -> dict:
    """Run (or resume) training; returns the last step's metrics.

    Writes out_dir/: train_config.json, config.json, metrics.jsonl, step-XXXXXXXX/, latest and final/.

    Under torchrun (torch.distributed initialised by distributed.init()), the model is sharded with FSDP2,
    each process trains on its slice of the global batch and checkpoints are torch.distributed checkpoints.
    """
    cfg = resolve_config(cfg)
    rank, world = dist_utils.rank_and_world()
    sharded = dist_utils.is_distributed()
    out = Path(cfg.out_dir)
    device = pick_device(cfg.device)
    if data is None:
        data = make_data(cfg, rank, world)
    if getattr(data, "world", 1) != world:  # every process would otherwise train on the whole batch
        raise ValueError(f"{world} processes, but the data object is not sliced for them (give `data:` shards, "
                         f"or an object with rank/world attributes)")
    mcfg = model_config(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device).train()
    if sharded:
        dist_utils.shard_model(model)
    optimizer = build_optimizer(model, cfg)
    load = dist_utils.load_checkpoint if sharded else load_training_state
    start = resume(out, "train_config.json", dataclasses.asdict(cfg), cfg.allow_config_change,
                   lambda path: load(path, model, optimizer), "train", rank)["step"]
    if rank == 0:
        mcfg.save(out)  # the architecture this run trains (rope_theta of its phase included)
    # The compiled callable shares the model's parameters; checkpoints keep using the plain module.
    loss_fn = torch.compile(lm_loss, dynamic=False) if cfg.compile else lm_loss
    amp_dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    has_experts = getattr(mcfg, "num_experts", 0) > 0  # MoE: the router loss joins the objective
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum  # global, all processes
    flops_per_step = flops_per_token(mcfg, cfg.seq_len, training=True) * tokens_per_step
    peak = cfg.peak_flops or measure_peak_flops(device, amp_dtype)

    def step_fn(step: int) -> dict:
        micro = [data.batch(step * cfg.grad_accum + m) for m in range(cfg.grad_accum)]
        counts = [count_targets(b, cfg.eos_id) for b in micro]
        # Every target of the global step weighs the same, however they are spread over micro-batches and
        # processes: scale each micro-batch's mean by its share of all targets (FSDP averages over processes).
        total_targets = dist_utils.all_sum(float(sum(counts)), device)
        loss_sum = aux_sum = 0.0
        for batch, count in zip(micro, counts):
            if count == 0:
                continue
            batch = tuple(t.to(device) for t in batch) if isinstance(batch, (tuple, list)) else batch.to(device)
            with autocast:
                loss = loss_fn(model, batch, cfg.eos_id)
                aux = moe_router_loss(model, batch, cfg.eos_id) if has_experts else None
            objective = loss + aux if aux is not None else loss
            (objective * (count * world / total_targets)).backward()
            loss_sum += loss.item() * count
            aux_sum += aux.item() * count if aux is not None else 0.0
        metrics = {"loss": dist_utils.all_sum(loss_sum, device) / max(total_targets, 1.0), "tokens": tokens_per_step}
        if has_experts:
            metrics["router_loss"] = dist_utils.all_sum(aux_sum, device) / max(total_targets, 1.0)
        return metrics

    def save(step: int) -> None:
        if sharded:
            dist_utils.save_checkpoint(out, step, model, optimizer, data_state={"next_step": step},
                                       keep_last=cfg.keep_last)
        else:
            save_training_state(out, step, model, optimizer, data_state={"next_step": step}, keep_last=cfg.keep_last)

    board = _tensorboard(cfg, out, rank)
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    try:
        last_metrics = run_steps(cfg, model, optimizer, step_fn, start=start, end=end, total=cfg.steps, out=out,
                                 save=save, clip=lambda max_norm: dist_utils.clip_grad_norm(model, max_norm),
                                 derive=lambda m: {"mfu": flops_per_step / m["seconds"] / (peak * world)},
                                 board=board, desc="train", progress=progress, rank=rank)
    finally:
        if board is not None:
            board.close()
    if end == cfg.steps:
        if sharded:
            dist_utils.export_full(model, out / "final")
        else:
            save_model(model, out / "final")
    return last_metrics
