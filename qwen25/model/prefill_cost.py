"""What a long prompt will cost on a machine: prefill time and peak memory, from measured prefills (`python
benchmarks/long_prefill.py --ttft`, which saves its runs) rather than from a peak FLOP rate (`qwen25 info --context`).

The measured runs (one model shape, dense and sparse prefill at several lengths) fix three rates of the machine:
- R_mm, the FLOP/s of the weight matmuls: L x W FLOPs for a prompt of L tokens, W = 2 x the decoder's matmul weights;
- R_att, the FLOP/s of dense attention over the causal triangle: L (L + 1) / 2 (query, key) pairs, 4 x head_dim
  FLOPs per pair and query head in every layer;
- R_sparse, the FLOP/s of sparse attention (model/sparse.py) over the pairs it keeps, the probe's included.
Dense rows give R_mm and R_att by least squares (t = L W / R_mm + pairs f / R_att); sparse rows then give R_sparse.
A prediction for any shape and length uses the same decomposition with that shape's W and f, and sparse prefill's
kept pairs as min(i + 1, max_keys) for the queries of chunks that reach min_length.
Peak memory = weights + KV cache + the largest transient of a prefill chunk (MLP activations, attention scores or
mask, the probe) + the process's base (torch, Python, the allocator's slack): the most any measured peak leaves unexplained, so that
the prediction is at least every measured peak.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig, dtype_bytes, kv_cache_bytes_per_token, mlp_params, param_count

SHIPPED = Path(__file__).with_name("prefill_measured.json")  # measured on the project's reference machine
USER = Path.home() / ".cache" / "qwen25" / "prefill_measured.json"  # written by benchmarks/long_prefill.py --ttft


def machine_memory() -> int | None:
    """This machine's RAM in bytes (Linux /proc/meminfo), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def matmul_flops_per_token(cfg: ModelConfig) -> float:
    """2 x the weights one prompt token is multiplied with (projections and MLPs; the lm_head only reads the last)."""
    h, d, n = cfg.hidden_size, cfg.head_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    return 2.0 * (n * (h * q + 2 * h * kv + q * h) + sum(mlp_params(cfg, i, activated=True) for i in range(n)))


def flops_per_pair(cfg: ModelConfig) -> float:
    """Attention FLOPs of one (query, key) pair over every query head and layer: scores and the weighted values."""
    return 4.0 * cfg.head_size * cfg.num_attention_heads * cfg.num_hidden_layers


def dense_pairs(length: int) -> float:
    return length * (length + 1) / 2


def sparse_pairs(length: int, chunk: int, min_length: int, max_keys: int, probe: int = 64) -> float:
    """(query, key) pairs sparse prefill computes: every causal key for the chunks that stay dense, at most max_keys
    per query in chunks whose keys reach min_length, plus the probe (its queries against every key, per chunk)."""
    pairs = 0.0
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        if end < min_length:
            pairs += dense_pairs(end) - dense_pairs(start)
            continue
        below = min(max(max_keys - start, 0), end - start)  # queries that see fewer than max_keys keys anyway
        pairs += dense_pairs(start + below) - dense_pairs(start) + (end - start - below) * max_keys
        pairs += min(probe, end - start) * end
    return pairs


def load_runs(path: str | Path | None = None) -> tuple[dict, Path]:
    """The measurement file: the one given, else the user's (benchmarks/long_prefill.py --ttft saves there), else the
    project's shipped one. Returns (its JSON: {"machine": ..., "runs": [...]}, its path)."""
    candidates = [Path(path)] if path else [USER, SHIPPED]
    for candidate in candidates:
        if candidate.exists():
            data = json.loads(candidate.read_text())
            if not data.get("runs"):
                raise ValueError(f"{candidate}: no measured runs")
            return data, candidate
    raise ValueError(f"no prefill measurements at {candidates[0]} (run benchmarks/long_prefill.py --ttft)")


def fit_rates(data: dict) -> dict:
    """R_mm, R_att (dense rows) and R_sparse (sparse rows) of the measured machine, and the process base memory."""
    cfg = ModelConfig.from_preset(data["preset"])
    w, f = matmul_flops_per_token(cfg), flops_per_pair(cfg)
    dense = [r for r in data["runs"] if r["mode"] == "dense"]
    if len(dense) < 2:
        raise ValueError("the measurements need dense prefills at two lengths at least")
    a = torch.tensor([[r["length"] * w, dense_pairs(r["length"]) * f] for r in dense], dtype=torch.float64)
    t = torch.tensor([[r["ttft_s"]] for r in dense], dtype=torch.float64)
    inv = torch.linalg.lstsq(a, t).solution[:, 0].clamp(min=1e-18)  # seconds per FLOP of each part
    rates = {"matmul": 1 / float(inv[0]), "attention": 1 / float(inv[1])}
    sparse = [r for r in data["runs"] if r["mode"] == "sparse"]
    if sparse:
        s = data["sparse"]
        work = [sparse_pairs(r["length"], data["prefill_chunk"], s["min_length"], s["max_keys"]) * f for r in sparse]
        left = [r["ttft_s"] - r["length"] * w / rates["matmul"] for r in sparse]
        rates["sparse"] = sum(x * x for x in work) / max(sum(x * y for x, y in zip(work, left)), 1e-30)
    base = [r["peak_rss_gib"] * 2**30 - peak_memory(cfg, r["length"], data, r["mode"], base=0)
            for r in data["runs"]]
    rates["base_bytes"] = max(max(base), 0.0)  # the largest: no measured peak exceeds its prediction
    return rates


def peak_memory(cfg: ModelConfig, length: int, data: dict, mode: str, base: float) -> float:
    """Bytes: weights (the measured dtype), KV cache, a chunk's largest transient, and the process base."""
    dtype = data.get("dtype", "fp32")
    size = dtype_bytes(dtype)
    chunk = min(data["prefill_chunk"], length)
    kv = kv_cache_bytes_per_token(cfg, "int8" if data.get("kv_int8") else dtype) * length
    h, inter = cfg.hidden_size, cfg.intermediate_size
    activations = chunk * (3 * inter + 4 * h + (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) *
                           cfg.head_size) * size
    if mode.startswith("sparse"):
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        attention = 2 * group * 64 * length * 4  # the probe's scores and probabilities for one KV head
    else:
        attention = chunk * length  # the boolean causal mask of a chunk against the cache
    return param_count(cfg) * size + kv + activations + attention + base


def predict(cfg: ModelConfig, length: int, data: dict, rates: dict) -> dict:
    """Seconds to prefill `length` tokens and peak bytes, dense and (when measured) sparse, on the measured machine."""
    w, f = matmul_flops_per_token(cfg), flops_per_pair(cfg)
    matmul = length * w / rates["matmul"]
    out = {"dense": {"seconds": matmul + dense_pairs(length) * f / rates["attention"],
                     "peak_bytes": peak_memory(cfg, length, data, "dense", rates["base_bytes"])}}
    if "sparse" in rates:
        s = data["sparse"]
        pairs = sparse_pairs(length, data["prefill_chunk"], s["min_length"], s["max_keys"])
        out["sparse"] = {"seconds": matmul + pairs * f / rates["sparse"],
                         "peak_bytes": peak_memory(cfg, length, data, "sparse", rates["base_bytes"])}
    return out
