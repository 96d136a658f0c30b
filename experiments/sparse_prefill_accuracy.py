"""What sparse prefill (`--sparse-prefill`: the vertical-slash pattern of model/sparse.py) costs in accuracy, on a
model that retrieves from its context: passkey accuracy with dense and sparse prefill on the same prompts, how often
their greedy answers agree, the share of each query's causal keys the pattern keeps, and the share of the dense
attention mass it keeps (measured exactly: the dense softmax normaliser beside the sparse one, every query, head and
layer of every prompt).

    python experiments/sparse_prefill_accuracy.py --model runs/recipe-tiny/stages/pretrain/phase2/final \\
        [--base-len 256] [--multiples 1,4,16] [--trials 4] [--max-keys 128,256,512] [--block 32]

At 1x and 4x the model runs with plain RoPE, at 16x (past what it was trained on) with Dual Chunk Attention, as the
recipe's evaluation does: sparse prefill then combines with DCA. The recipe's model reads 32x shorter contexts than
Qwen2.5's, so the blocks and key budgets here are smaller than the defaults (64 and 2,048) too. Prints a table and a
JSON line last; docs/long_context.md records a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import result_line  # noqa: E402

import passkey_grid  # noqa: E402  (experiments/, beside this script)

from qwen25.evals.passkey import evaluate_passkey  # noqa: E402
from qwen25.model.sparse import SparsePrefill  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    passkey_grid.add_args(ap)
    ap.add_argument("--max-keys", default="128,256,512", help="key budgets per query to try (SparsePrefill.max_keys)")
    ap.add_argument("--block", type=int, default=32, help="query/key block (SparsePrefill.block)")
    ap.add_argument("--probe", type=int, default=64, help="probe queries (SparsePrefill.probe)")
    ap.add_argument("--mass", type=float, default=0.95, help="probe mass target (SparsePrefill.mass)")
    args = ap.parse_args()
    model, tokenizer = passkey_grid.load(args)
    rows, result = [], []
    for m, length, changes, method in passkey_grid.lengths(model, args):

        def run(sparse):
            model.sparse_prefill = sparse
            with torch.inference_mode(), model.rope_settings(**changes):
                return evaluate_passkey(model, tokenizer, [length], passkey_grid.DEPTHS, trials=args.trials, seed=1,
                                        batch_size=10)

        dense = run(None)
        acc_dense = sum(r.correct for r in dense) / len(dense)
        for budget in map(int, args.max_keys.split(",")):
            sparse = SparsePrefill(min_length=1, block=args.block, probe=args.probe, mass=args.mass,
                                   max_keys=budget, measure=True)
            out = run(sparse)
            stats = sparse.summary()
            acc = sum(r.correct for r in out) / len(out)
            same = sum(a.output == b.output for a, b in zip(dense, out)) / len(out)
            rows.append(f"| {m}x ({length} tokens, {method}) | {budget} | {stats['kept_key_share']:.3f} | "
                        f"{stats['attention_mass']:.3f} | {stats['probe_mass']:.3f} | {acc_dense:.3f} | {acc:.3f} | "
                        f"{same:.3f} | {len(out)} |")
            result.append({"multiple": m, "tokens": length, "method": method, "max_keys": budget,
                           "kept_key_share": round(stats["kept_key_share"], 4),
                           "attention_mass": round(stats["attention_mass"], 4),
                           "probe_mass": round(stats["probe_mass"], 4), "dense": acc_dense, "sparse": acc,
                           "same_answer": same, "prompts": len(out)})
            print(rows[-1], flush=True)
    model.sparse_prefill = None
    print("\n| length | max keys | keys kept | attention mass kept | probe's estimate | passkey, dense | "
          "passkey, sparse | same answer | prompts |\n|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(result_line("sparse_prefill_accuracy", model=args.model, base_len=args.base_len, trials=args.trials,
                      block=args.block, probe=args.probe, mass=args.mass, results=result))


if __name__ == "__main__":
    main()
