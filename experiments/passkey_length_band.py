"""Is passkey retrieval learnt per prompt length? A side experiment on the tiny recipe's own model and vocabulary.

Starting from phase 1's weights of a `qwen25 recipe tiny` run (RoPE base raised to 1M, as phase 2a does), train on
passkey prompts of --min-len..--max-len tokens alone (loss on the answer only), then measure retrieval at lengths
inside and outside that band, at every depth, with plain RoPE and with DCA:

    python experiments/passkey_length_band.py --run runs/recipe-tiny [--steps 1200] [--batch 16] [--lr 2e-3]

docs/recipe.md records a run: 8 of 8 at every depth inside the band, much less just outside it (shorter prompts
included, although every key-question distance there was trained).

`--spread` trains on the whole range instead: every step draws a length log-uniformly in --min-len..--max-len
and fills --tokens tokens with prompts of 80-100% of it (so short steps hold many prompts, long ones few):

    python experiments/passkey_length_band.py --run runs/recipe-tiny --spread --min-len 80 --max-len 1024 \
        --steps 2000 --lengths 120,248,512,1016,4088

Prints one table row per length (DCA beside plain RoPE above --max-len) and a JSON line last."""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "benchmarks")]
from common import result_line  # noqa: E402
from passkey_extrapolation import training_batch  # noqa: E402

from qwen25.evals.passkey import evaluate_passkey  # noqa: E402
from qwen25.model import load_model  # noqa: E402
from qwen25.tokenizer import Tokenizer  # noqa: E402

DEPTHS = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]


def recent_mean(losses: list[float], n: int = 50) -> float:
    """Mean of the last n losses (the answer loss reported while training and at the end)."""
    return sum(losses[-n:]) / len(losses[-n:])


def per_depth(model, tok, length: int, trials: int) -> list[int]:
    model.eval()
    with torch.inference_mode():
        results = evaluate_passkey(model, tok, [length], DEPTHS, trials=trials, seed=2, batch_size=8)
    return [sum(r.correct for r in results if r.depth == d) for d in DEPTHS]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a `qwen25 recipe tiny` run folder (phase 1 must be finished)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-len", type=int, default=150)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--lengths", default="120,160,200,230,256,1024")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--spread", action="store_true", help="lengths log-uniform over the band, --tokens per step")
    p.add_argument("--tokens", type=int, default=4096, help="prompt tokens per step with --spread")
    p.add_argument("--dca-chunk", type=int, help="DCA chunk size (default 3/4 of --max-len)")
    p.add_argument("--dca-local", type=int, help="DCA local window (default 1/8 of --max-len)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run = Path(args.run)
    tok = Tokenizer.from_dir(run / "stages" / "tokenizer")
    phase1 = load_model(run / "stages" / "pretrain" / "phase1" / "final", dtype="fp32")
    model = type(phase1)(phase1.config.replace(rope_theta=1_000_000.0))  # ABF, as phase 2a
    model.load_state_dict(phase1.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng, start, losses = random.Random(0), time.time(), []
    for step in range(args.steps):
        for group in opt.param_groups:  # warm-up 20 steps, cosine to 10%
            group["lr"] = args.lr * min(1, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        if args.spread:
            top = int(math.exp(rng.uniform(math.log(args.min_len), math.log(args.max_len))))
            x, y = training_batch(tok, rng, max(1, args.tokens // top), top, int(0.8 * top))
        else:
            x, y = training_batch(tok, rng, args.batch, args.max_len, args.min_len)  # answer tokens only
        model.train()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}: answer loss {recent_mean(losses):.3f} ({time.time() - start:.0f} s)",
                  flush=True)
    dca = {"dual_chunk_attention_config": {"chunk_size": args.dca_chunk or args.max_len * 3 // 4,
                                           "local_size": args.dca_local or args.max_len // 8,
                                           "original_max_position_embeddings": args.max_len}}
    how = f"log-uniform, {args.tokens} tokens a step" if args.spread else f"{args.batch} a step"
    print(f"trained on prompts of {args.min_len}..{args.max_len} tokens ({how}); keys right of {args.trials} at depths {DEPTHS}")
    table = {}
    for length in map(int, args.lengths.split(",")):
        table[length] = {"rope": per_depth(model, tok, length, args.trials)}
        if length > args.max_len:
            with model.rope_settings(**dca):
                table[length]["dca"] = per_depth(model, tok, length, args.trials)
        print(f"{length:>6} tokens: " + "  ".join(f"{k} {v}" for k, v in table[length].items()), flush=True)
    print(result_line("passkey_length_band", final_answer_loss=round(recent_mean(losses), 4),
                      band=[args.min_len, args.max_len], spread=args.spread,
                      dca=dca["dual_chunk_attention_config"], depths=DEPTHS, per_depth=table))


if __name__ == "__main__":
    main()
