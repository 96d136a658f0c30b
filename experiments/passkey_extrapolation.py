"""Passkey retrieval past the training length: a small model trained at length L, evaluated at up to 4L with
full attention, with YaRN, and with Dual Chunk Attention (same weights, same prompts).

    python experiments/passkey_extrapolation.py [--train-len 128] [--steps 1200] [--trials 4] [--threads 2]

The model is trained from scratch on passkey prompts of 16..L tokens (a word-level tokenizer over the task's
text in which every filler sentence is one token; next-token loss on the answer tokens only: the filler is
predictable and would dominate), with a minimal AdamW loop. DCA uses chunk_size = 3L/4, local_size = L/8 and
original_max_position_embeddings = L (logit scaling past L). Prints one accuracy table per variant and a JSON
line last."""

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

from qwen25.config import ModelConfig  # noqa: E402
from qwen25.evals.passkey import accuracy_table, evaluate_passkey, plot_heatmap  # noqa: E402
from qwen25.tasks.passkey import (  # noqa: E402
    MAX_PASSKEY, TASK_PHRASES, WordTokenizer, passkey_sample, passkey_text,
)
from qwen25.model import CausalLM  # noqa: E402


def training_batch(tokenizer, rng: random.Random, batch: int, max_len: int, min_len: int | None = None,
                   answer_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of passkey prompts + answers, right-padded; targets -100 at padding (and everywhere
    but the answer when answer_only)."""
    rows, answer_spans = [], []
    for _ in range(batch):
        key = rng.randint(1, MAX_PASSKEY)
        answer = tokenizer.encode(f" {key}.")
        shortest = len(tokenizer.encode(passkey_text(key, 0, 0)))  # the prompt with no filler
        length = rng.randint(max(min_len or max_len // 2, shortest), max_len - len(answer))
        sample = passkey_sample(tokenizer, length, rng.random(), key)
        rows.append(sample.ids + answer)
        answer_spans.append((len(sample.ids), len(sample.ids) + len(answer)))
    width = max(map(len, rows))
    ids = torch.zeros(batch, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    targets = ids[:, 1:].clone()
    if answer_only:  # the filler is predictable and would dominate the loss; retrieval is the skill to learn
        keep = torch.zeros_like(targets, dtype=torch.bool)
        for i, (a, b) in enumerate(answer_spans):
            keep[i, a - 1:b - 1] = True
        targets[~keep] = -100
    targets[targets == 0] = -100
    return ids[:, :-1], targets


def train_passkey_model(train_len: int, steps: int, batch: int = 32, hidden: int = 64, layers: int = 2,
                        heads: int = 4, lr: float = 3e-3, seed: int = 0, log_every: int = 50,
                        min_len: int | None = None, phrase_tokens: bool = False):
    """A small Qwen2.5-shaped model trained on passkey prompts of at most `train_len` tokens."""
    torch.manual_seed(seed)
    tokenizer = WordTokenizer(TASK_PHRASES if phrase_tokens else ())
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                      max_position_embeddings=train_len, rope_theta=10_000.0, tie_word_embeddings=True,
                      torch_dtype="float32", bos_token_id=None, eos_token_id=None)
    model = CausalLM(cfg)
    model.init_weights(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:  # warm-up, then cosine to 10%
            warm = min(1.0, (step + 1) / 50)
            group["lr"] = lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        inputs, targets = training_batch(tokenizer, rng, batch, train_len, min_len)
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d} loss {loss.item():.3f}", flush=True)
    return model.eval(), tokenizer


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-len", type=int, default=16, help="shortest training prompt (lengths vary up to L)")
    ap.add_argument("--word-tokens", action="store_true",
                    help="one token per word (default: each filler sentence is one token)")
    ap.add_argument("--dca-chunk", type=int, help="DCA chunk_size (default 3L/4)")
    ap.add_argument("--dca-local", type=int, help="DCA local_size (default L/8)")
    ap.add_argument("--factors", default="1,2,4", help="evaluation lengths as multiples of --train-len")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-yarn", action="store_true", help="skip the YaRN variant")
    ap.add_argument("--out", type=Path, help="directory for one heat map (PNG) per variant")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    L = args.train_len

    start = time.perf_counter()
    model, tokenizer = train_passkey_model(L, args.steps, args.batch, args.hidden, args.layers, lr=args.lr,
                                           seed=args.seed, min_len=args.min_len,
                                           phrase_tokens=not args.word_tokens)
    train_s = time.perf_counter() - start
    factors = [float(f) for f in args.factors.split(",")]
    lengths = [int(L * f) for f in factors]
    depths = [float(d) for d in args.depths.split(",")]
    max_factor = max(factors)
    dca_chunk, dca_local = args.dca_chunk or 3 * L // 4, args.dca_local or L // 8
    variants = {"full attention": {},
                "DCA": {"dual_chunk_attention_config": {
                    "chunk_size": dca_chunk, "local_size": dca_local, "original_max_position_embeddings": L}}}
    if not args.no_yarn:
        variants["YaRN"] = {"rope_scaling": {
            "rope_type": "yarn", "factor": max_factor, "original_max_position_embeddings": L}}
    accuracy = {}
    for name, changes in variants.items():
        t0 = time.perf_counter()
        with torch.inference_mode(), model.rope_settings(**changes):
            results = evaluate_passkey(model, tokenizer, lengths, depths, trials=args.trials, seed=args.seed + 1,
                                       batch_size=len(depths) * args.trials)
        print(f"\n{name} (trained at {L} tokens; {time.perf_counter() - t0:.1f} s)")
        print(accuracy_table(results))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            slug = name.lower().replace(" ", "_")
            plot_heatmap(results, args.out / f"passkey_{slug}.png", title=f"{name}, trained at {L} tokens")
        accuracy[name] = {n: sum(r.correct for r in results if r.length == n) / (len(depths) * args.trials)
                          for n in lengths}
    fields = dict(train_len=L, steps=args.steps, dca_chunk_size=dca_chunk, dca_local_size=dca_local, train_seconds=round(train_s, 1), lengths=lengths,
                  accuracy={k: {str(n): round(a, 3) for n, a in v.items()} for k, v in accuracy.items()})
    print(result_line("passkey_extrapolation", **fields))
    return fields


if __name__ == "__main__":
    main()
