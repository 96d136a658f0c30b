"""Training speed: qwen25's training loop vs a plain transformers Qwen2ForCausalLM loop, same process.

    python benchmarks/train.py [--preset mini] [--batch 8] [--seq 256] [--steps 4] [--dtype bf16] [--device cpu]

Both start from the same weights and see the same batches: next-token loss, AdamW (0.9, 0.95, weight decay
on matrices), gradient clipping at 1.0 and bf16 autocast (weights fp32). Ours is `qwen25.train.loop.train`
itself (data fetch, loss, backward, clip, step, logging: the whole step); the peer is the equivalent loop
written around transformers. The first step of each is a warm-up and is not counted; ours and theirs
alternate for --rounds rounds and each side's fastest step counts (the machine's load varies). Prints tokens/s,
MFU against the measured matmul peak of the autocast dtype, the ratio, and a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line  # noqa: E402

from qwen25.config import ModelConfig, flops_per_token, param_count  # noqa: E402
from qwen25.model import CausalLM  # noqa: E402
from qwen25.train.loop import TokenWindows, TrainConfig, build_optimizer, measure_peak_flops, train  # noqa: E402
from qwen25.train.schedule import lr_at  # noqa: E402


def run_ours(cfg: TrainConfig, data) -> list[float]:
    """tokens/s of every step after the first, from the run's metrics.jsonl."""
    train(cfg, data, progress=False)
    lines = [json.loads(x) for x in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [m["tokens_per_s"] for m in lines[1:]]


def run_transformers(model, cfg: TrainConfig, data, device) -> list[float]:
    """The same steps with a transformers model: tokens/s of every step after the first."""
    optimizer = build_optimizer(model, cfg)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = []
    for step in range(cfg.steps):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        optimizer.zero_grad(set_to_none=True)
        batch = data.batch(step).to(device)
        with autocast:
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        loss.item()
        sync()
        rates.append(cfg.batch_size * cfg.seq_len / (time.perf_counter() - start))
    return rates[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (+1 warm-up)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="ours with compile: true (torch.compile)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours and theirs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = torch.device(args.device)
    mcfg = ModelConfig.from_preset(args.preset)
    tokens = torch.randint(0, mcfg.vocab_size, (200_000,), generator=torch.Generator().manual_seed(0))
    data = TokenWindows(tokens, args.batch, args.seq, seed=0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    flops = flops_per_token(mcfg, args.seq, training=True)
    reference = CausalLM(mcfg)
    reference.init_weights(seed=0)
    hf_config = Qwen2Config(**{k: v for k, v in mcfg.to_hf_dict().items() if k != "architectures"})
    peer = Qwen2ForCausalLM(hf_config).to(device)
    peer.load_state_dict(reference.state_dict(), strict=False)
    peer.tie_weights()
    peer.train()
    # On a shared machine the load changes from minute to minute: alternate ours and theirs, and take each
    # side's fastest step (and the highest measured peak) as what the code can do.
    peak, ours_rates, their_rates = 0.0, [], []
    for _ in range(args.rounds):
        peak = max(peak, measure_peak_flops(device, dtype, n=2048))
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(out_dir=out, model=args.preset, steps=args.steps + 1, batch_size=args.batch,
                              seq_len=args.seq, lr=1e-3, warmup=1, dtype=args.dtype, device=args.device,
                              save_every=10**9, peak_flops=1.0, tensorboard=False, compile=args.compile)
            ours_rates += run_ours(cfg, data)
        their_rates += run_transformers(peer, cfg, data, device)
    ours, theirs = max(ours_rates), max(their_rates)
    mfu_ours, mfu_theirs = ours * flops / peak, theirs * flops / peak
    amp = "bf16 autocast" if args.dtype == "bf16" else "fp32"
    print(f"{args.preset} ({param_count(mcfg) / 1e6:.1f}M params), batch {args.batch} x {args.seq}, {amp}, "
          f"{'compiled, ' if args.compile else ''}{args.device}, {torch.get_num_threads()} threads; "
          f"measured {args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s")
    label = "qwen25 (compiled)" if args.compile else "qwen25"
    print(f"{label:<18} {ours:10,.0f} tokens/s   MFU {mfu_ours:6.1%}")
    print(f"{'transformers':<18} {theirs:10,.0f} tokens/s   MFU {mfu_theirs:6.1%}")
    print(f"{'ratio':<18} {ours / theirs:10.2f}x")
    print(result_line("train", preset=args.preset, batch=args.batch, seq=args.seq, dtype=args.dtype,
                      device=args.device, compile=args.compile, tokens_per_s=round(ours, 1),
                      transformers_tokens_per_s=round(theirs, 1),
                      ratio=round(ours / theirs, 3), mfu=round(mfu_ours, 4), transformers_mfu=round(mfu_theirs, 4),
                      peak_flops=peak))


if __name__ == "__main__":
    main()
