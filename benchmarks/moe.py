"""Mixture-of-experts forward speed: qwen25 vs transformers' Qwen2MoeForCausalLM, same weights, same process.

    python benchmarks/moe.py [--preset mini-moe] [--batch 8] [--seq 256] [--threads 2] [--dtype fp32]
                             [--repeat 3] [--hf-experts default,eager] [--layers N] [--vocab V]

--layers and --vocab shrink a real preset to a few of its layers (e.g. --preset qwen1.5-moe-a2.7b --layers 1
--vocab 2048: one block at the released shape).

Random weights (saved by us, loaded by transformers, logits checked equal first), one full forward over
batch x seq tokens without a cache, best of --repeat after a warm-up. Ours runs twice: the plain model, and
(bf16) the model as `qwen25 serve` prepares it (prepare_for_decode: fused projections, the compiled kernels:
on a CPU with AMX the MoE kernel for the experts, C RMSNorm and RoPE). transformers runs with its default
experts implementation (grouped_mm in v5) and, with --hf-experts, the others named there. Prints tokens/s
for both (best of interleaved rounds), achieved GFLOP/s as a share of the measured matmul peak, the ratio,
the same for one MoE block alone, the share of our forward spent in the MoE blocks, and a JSON line last.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line, timed  # noqa: E402

from qwen25.config import ModelConfig, flops_per_token, param_count  # noqa: E402
from qwen25.model import CausalLM, save_model  # noqa: E402
from qwen25.model.moe import sparse_blocks  # noqa: E402
from qwen25.serve.cpu_kernels import KernelMoeBlock  # noqa: E402
from qwen25.serve.quant import prepare_for_decode  # noqa: E402
from qwen25.train.loop import measure_peak_flops  # noqa: E402

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def moe_share(model, ids) -> float:
    """Share of one forward's time spent inside the sparse blocks (forward hooks around each block)."""
    spent = []

    def before(module, args):
        module._t = time.perf_counter()

    def after(module, args, out):
        spent.append(time.perf_counter() - module._t)

    hooks = [h for b in sparse_blocks(model) for h in (b.register_forward_pre_hook(before),
                                                       b.register_forward_hook(after))]
    with torch.inference_mode():
        total = timed(lambda: model(ids))
    for h in hooks:
        h.remove()
    return sum(spent) / total


def compare_blocks(mine: dict, peers: dict, args, dtype) -> dict:
    """tokens/s of the first sparse block alone (ours vs each peer's same layer) on the same hidden states."""
    ours = mine["qwen25"]
    layer = next(i for i in range(ours.config.num_hidden_layers) if ours.config.is_sparse_layer(i))
    h = torch.randn(args.batch, args.seq, ours.config.hidden_size, dtype=dtype)
    blocks = {n: m.model.layers[layer].mlp for n, m in (mine | peers).items()}
    best = {name: float("inf") for name in blocks}
    ref = blocks["qwen25"](h)
    for name, block in blocks.items():
        diff = (block(h) - ref).abs().float()
        # bf16: torch's ops round 4 times inside an expert, the kernel once, and a token whose router logits nearly
        # tie may pick another expert; so the mean difference, relative to the mean output
        ok = diff.max() < 1e-3 if dtype == torch.float32 else diff.mean() < 0.02 * ref.abs().float().mean()
        assert ok, f"{name}: output differs (max {diff.max():.3g}, mean {diff.mean():.3g})"
    for _ in range(args.repeat):
        for name, block in blocks.items():
            best[name] = min(best[name], timed(lambda b=block: b(h)))
    rates = {name: round(args.batch * args.seq / s, 1) for name, s in best.items()}
    for name, rate in rates.items():
        print(f"MoE block {layer} alone, {name:<28} {rate:10.1f} tokens/s")
    return rates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mini-moe")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=list(_DTYPES), default="fp32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, help="override the preset's num_hidden_layers")
    ap.add_argument("--vocab", type=int, help="override the preset's vocab_size")
    ap.add_argument("--hf-experts", default="default",
                    help="comma list of transformers experts implementations: default, eager, grouped_mm, batched_mm")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import Qwen2MoeForCausalLM

    overrides = {k: v for k, v in (("num_hidden_layers", args.layers), ("vocab_size", args.vocab)) if v}
    cfg = ModelConfig.from_preset(args.preset, **overrides)
    dtype = _DTYPES[args.dtype]
    ours = CausalLM(cfg)
    ours.init_weights(seed=0)
    ours = ours.to(dtype).eval()
    mine = {"qwen25": ours}
    if dtype == torch.bfloat16:
        served = copy.deepcopy(ours)
        mine["qwen25 served"] = served
        print(f"qwen25 served: {prepare_for_decode(served)}; "
              f"{sum(isinstance(b, KernelMoeBlock) for b in sparse_blocks(served))} MoE blocks on the kernel")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq
    active = param_count(cfg, activated=True)
    print(f"preset {args.preset}: {param_count(cfg) / 1e6:.1f}M parameters ({active / 1e6:.1f}M activated), "
          f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok}, {args.dtype}, {args.batch} x {args.seq} tokens, "
          f"{args.threads} threads")

    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        peers = {}
        for impl in args.hf_experts.split(","):
            kwargs = {} if impl == "default" else {"experts_implementation": impl}
            hf = Qwen2MoeForCausalLM.from_pretrained(tmp, dtype=dtype, **kwargs).eval()
            peers[f"transformers ({hf.config._experts_implementation})"] = hf

    with torch.inference_mode():
        ref = ours(ids[:1, :64]).float()
        for name, model in ({n: m for n, m in mine.items() if m is not ours} | peers).items():
            out = model(ids[:1, :64])
            diff = (getattr(out, "logits", out).float() - ref).abs().max().item()
            print(f"max |logits difference| vs {name}: {diff:.2e}")
        runs = ({n: (lambda m=m: m(ids)) for n, m in mine.items()}
                | {n: (lambda m=m: m(ids).logits) for n, m in peers.items()})
        best = {name: float("inf") for name in runs}
        for fn in runs.values():
            fn()  # warm-up
        # Interleaved rounds, best of each: a busy machine slows both sides alike instead of one of them.
        for _ in tqdm(range(args.repeat), desc="rounds"):
            for name, fn in runs.items():
                best[name] = min(best[name], timed(fn))
        results = {name: tokens / seconds for name, seconds in best.items()}
        peak = measure_peak_flops(torch.device("cpu"), dtype)
        flops = flops_per_token(cfg, args.seq) * tokens  # activated weights only: what a forward computes
        print(f"measured {args.dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s; a forward is {flops / 1e9:.3g} GFLOP")
        for name, seconds in best.items():
            print(f"{name:<32} {tokens / seconds:10.1f} tokens/s  ({seconds * 1e3:.0f} ms per forward, "
                  f"{flops / seconds / 1e9:.1f} GFLOP/s = {flops / seconds / peak:.0%} of peak)")
        block_rates = compare_blocks(mine, peers, args, dtype)
    shares = {name: moe_share(model, ids) for name, model in mine.items()}
    for name, share in shares.items():
        print(f"{name} spends {share:.0%} of the forward in the MoE blocks")
    peer_rates = {n: r for n, r in results.items() if n not in mine}
    for name, rate in peer_rates.items():
        for me in mine:
            print(f"ratio {me} / {name}: {results[me] / rate:.2f}x forward, "
                  f"{block_rates[me] / block_rates[name]:.2f}x MoE block alone")
    first = next(iter(peer_rates))
    best = max(mine, key=results.get)
    print(result_line("moe_forward", preset=args.preset, overrides=overrides, dtype=args.dtype, batch=args.batch,
                      seq=args.seq, threads=args.threads, qwen25_tokens_per_s=round(results["qwen25"], 1),
                      transformers_tokens_per_s={n: round(r, 1) for n, r in peer_rates.items()},
                      ratio=round(results["qwen25"] / peer_rates[first], 3), moe_share=round(shares["qwen25"], 3),
                      served_tokens_per_s=round(results.get("qwen25 served", 0.0), 1),
                      best_ratio=round(results[best] / peer_rates[first], 3),
                      matmul_peak_gflops=round(peak / 1e9, 1), forward_gflop=round(flops / 1e9, 2),
                      block_tokens_per_s=block_rates,
                      block_ratio=round(block_rates[best] / block_rates[first], 3)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
