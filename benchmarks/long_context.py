"""Long-context prefill: time and peak memory at growing lengths, full attention vs Dual Chunk Attention.

    python benchmarks/long_context.py [--preset mini] [--lengths 1024,2048,4096,8192,16384]
        [--chunk-size 2048] [--local-size 256] [--threads 2] [--dtype fp32] [--eager-max 8192]

Random weights, batch 1, one prefill of the whole prompt (logits of the last position only, no KV cache).
Variants, same weights: ours with full attention (SDPA, a flash-style kernel: no length^2 matrix), ours with
DCA (tiles of at most min(chunk, 1024)^2 scores), and the peer, transformers' Qwen2ForCausalLM with SDPA
and with eager attention (which materialises the length^2 scores; run up to --eager-max). Each
measurement runs in a fresh process: peak memory is its maximum resident set size during the prefill minus
the one before it (weights and a short warm-up already resident). Prints a table and a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line  # noqa: E402

from qwen25.config import ModelConfig, flops_per_token  # noqa: E402
from qwen25.model import CausalLM  # noqa: E402

VARIANTS = ("ours full", "ours DCA", "transformers sdpa", "transformers eager")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build(args, variant: str):
    """The model of a variant and a function running one prefill of (1, n) token ids."""
    dca = {"chunk_size": args.chunk_size, "local_size": args.local_size}
    cfg = ModelConfig.from_preset(args.preset, max_position_embeddings=max(map(int, args.lengths.split(","))),
                                  dual_chunk_attention_config=dca if variant == "ours DCA" else None)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ours = CausalLM(cfg)
    ours.init_weights(seed=0)
    ours = ours.to(dtype).eval()
    if variant.startswith("ours"):
        model = ours
        return lambda ids: model(ids, last_only=True)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    implementation = variant.split()[-1]
    hf = Qwen2ForCausalLM(Qwen2Config(**cfg.to_hf_dict(), attn_implementation=implementation))
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf = hf.to(dtype).eval()
    del ours
    return lambda ids: hf(ids, logits_to_keep=1, use_cache=False).logits


def child(args) -> None:
    """One measurement in this process: prints {"seconds", "peak_bytes"} as JSON."""
    torch.set_num_threads(args.threads)
    run = build(args, args.child)
    with torch.inference_mode():
        run(torch.randint(0, 100, (1, 64)))  # warm-up: allocator, kernels
        ids = torch.randint(0, 100, (1, args.length))
        before = max_rss_bytes()
        start = time.perf_counter()
        run(ids)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_bytes": max(0, max_rss_bytes() - before)}))


def measure(args, variant: str, length: int) -> dict:
    # `-m` from the repository root: no file of benchmarks/ can shadow a standard module in the child.
    cmd = [sys.executable, "-m", "benchmarks.long_context", "--child", variant, "--length", str(length),
           "--preset", args.preset, "--lengths", args.lengths, "--chunk-size", str(args.chunk_size),
           "--local-size", str(args.local_size), "--threads", str(args.threads), "--dtype", args.dtype]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(f"{variant} at {length}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--local-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--eager-max", type=int, default=8192, help="longest length for transformers' eager attention")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    cfg = ModelConfig.from_preset(args.preset)
    lengths = [int(n) for n in args.lengths.split(",")]
    print(f"prefill at the {args.preset} shape (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads x {cfg.head_size}), {args.dtype}, "
          f"{args.threads} threads; DCA chunk {args.chunk_size}, local {args.local_size} "
          f"(c = {args.chunk_size - args.local_size})")
    rows = {}
    print(f"{'length':>7} " + " ".join(f"{v:>26}" for v in VARIANTS))
    for n in lengths:
        cells = []
        for variant in VARIANTS:
            if variant == "transformers eager" and n > args.eager_max:
                cells.append(f"{'(skipped)':>26}")
                continue
            m = measure(args, variant, n)
            rows.setdefault(variant, {})[n] = m
            gflops = flops_per_token(cfg, n) * n / m["seconds"] / 1e9
            cells.append(f"{m['seconds']:7.2f} s {m['peak_bytes'] / 2**20:7.0f} MiB {gflops:4.0f} GF/s")
        print(f"{n:>7} " + " ".join(cells), flush=True)
    ratio = {n: rows["ours DCA"][n]["seconds"] / rows["ours full"][n]["seconds"] for n in lengths}
    print("DCA / full attention time: " + ", ".join(f"{n}: {r:.2f}x" for n, r in ratio.items()))
    print(result_line(
        "long_context", preset=args.preset, dtype=args.dtype, threads=args.threads, chunk_size=args.chunk_size,
        local_size=args.local_size,
        seconds={v: {str(n): round(m["seconds"], 3) for n, m in r.items()} for v, r in rows.items()},
        peak_mib={v: {str(n): round(m["peak_bytes"] / 2**20, 1) for n, m in r.items()} for v, r in rows.items()},
        dca_over_full_time={str(n): round(r, 3) for n, r in ratio.items()}))


if __name__ == "__main__":
    main()
