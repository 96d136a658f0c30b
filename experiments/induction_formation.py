"""How many training steps copying from context (induction) takes to form, at the tiny recipe's model shape.

A fresh model (the recipe's architecture, `init_weights`) trains on rows made of a random token pattern
repeated until the row is full, and the script reports copy accuracy as it trains: greedy next-token accuracy
on the positions after the pattern's first occurrence, on held-out rows of the same kind. Two kinds of rows:

- fixed period ("32"): every pattern is P tokens long. A head that attends exactly P tokens back solves it
  (a position-only route, no matching of content), so it says nothing about induction;
- variable period ("8-48"): each row draws its own P. Only a content lookup works here (attend to the token
  after the earlier occurrence of the current one: an induction head).

    python experiments/induction_formation.py                      # recipe shape, periods 32 and 8-48, 600 steps
    python experiments/induction_formation.py --shape control --steps 4000

`--shape control` is a 2-layer, hidden-64 model on a 64-token vocabulary with rows of 96 tokens, batch 32.
Prints a table (step x period) and a JSON line last; --plot PNG draws the curves. docs/recipe.md records a run."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "benchmarks")]
from common import result_line  # noqa: E402

from qwen25.config import ModelConfig  # noqa: E402
from qwen25.model.transformer import CausalLM  # noqa: E402
from qwen25.recipes.tiny import MODEL  # noqa: E402
from qwen25.train.schedule import lr_at  # noqa: E402

SHAPES = {  # model fields, vocabulary, row length, rows per step
    "recipe": (dict(MODEL), 2112, 256, 16),
    "control": (dict(MODEL, hidden_size=64, intermediate_size=128, num_hidden_layers=2), 64, 96, 32),
}


def periods(spec: str) -> tuple[int, int]:
    """'32' -> (32, 32); '8-48' -> (8, 48)."""
    lo, _, hi = spec.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise ValueError(f"a period is N or LO-HI with 1 <= LO <= HI, got {spec!r}")
    return lo, hi


def rows(n: int, length: int, vocab: int, period: tuple[int, int],
         g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows of a random pattern repeated to `length` tokens, and the mask of the positions whose next token is a
    repeat (predictable by copying)."""
    x = torch.empty(n, length, dtype=torch.long)
    target = torch.zeros(n, length - 1, dtype=torch.bool)
    for i in range(n):
        p = int(torch.randint(period[0], period[1] + 1, (1,), generator=g))
        x[i] = torch.randint(0, vocab, (p,), generator=g).repeat(length // p + 1)[:length]
        target[i, p - 1:] = True
    return x, target


def copy_accuracy(model, x: torch.Tensor, target: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        pred = model(x[:, :-1]).argmax(-1)
    model.train()
    return (pred == x[:, 1:])[target].float().mean().item()


def train_one(shape: str, label: str, period: tuple[int, int], steps: int, lr: float, eval_every: int,
              seed: int) -> dict:
    """Train a fresh model on one kind of row; copy accuracy on held-out rows every `eval_every` steps."""
    fields, vocab, length, batch = SHAPES[shape]
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(vocab_size=vocab, max_position_embeddings=length, **fields))
    model.init_weights(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    g_train, g_eval = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2)
    held_out = rows(64, length, vocab, period, g_eval)
    curve, start = {0: copy_accuracy(model, *held_out)}, time.time()
    for step in range(steps):
        for group in opt.param_groups:  # the trainer's schedule: warm-up, cosine to 10%
            group["lr"] = lr_at(step, lr, 20, steps)
        x, target = rows(batch, length, vocab, period, g_train)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits[target], x[:, 1:][target])  # the repeats only: the first copy is noise
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve[step + 1] = copy_accuracy(model, *held_out)
            print(f"  period {label} step {step + 1}: loss {loss.item():.3f}, copy accuracy "
                  f"{curve[step + 1]:.3f} ({time.time() - start:.0f} s)", flush=True)
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="recipe")
    p.add_argument("--periods", default="32,8-48", help="comma-separated: N (fixed) or LO-HI (drawn per row)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot", help="write the copy-accuracy curves to this PNG")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    specs = args.periods.split(",")
    bounds = [periods(s) for s in specs]
    fields, vocab, length, batch = SHAPES[args.shape]
    print(f"{args.shape} shape: {fields['num_hidden_layers']} layers, hidden {fields['hidden_size']}, vocabulary "
          f"{vocab}, {batch} rows of {length} tokens a step, lr {args.lr}; chance is {1 / vocab:.4f}")
    curves = {s: train_one(args.shape, s, b, args.steps, args.lr, args.eval_every, args.seed)
              for s, b in zip(specs, bounds)}
    print("\n| step | " + " | ".join(f"period {s}" for s in specs) + " |")
    print("|---|" + "---|" * len(specs))
    for step in curves[specs[0]]:
        print(f"| {step} | " + " | ".join(f"{curves[s][step]:.3f}" for s in specs) + " |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for s in specs:
            ax.plot(list(curves[s]), list(curves[s].values()), marker="o", label=f"period {s}")
        ax.set(xlabel="training step", ylabel="copy accuracy (held-out rows)", ylim=(0, 1.02),
               title=f"copying forms? {args.shape} shape, vocabulary {vocab}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    print(result_line("induction_formation", shape=args.shape, vocab=vocab, row_tokens=length, rows_per_step=batch,
                      lr=args.lr, steps=args.steps, copy_accuracy={s: curves[s] for s in specs}))


if __name__ == "__main__":
    main()
