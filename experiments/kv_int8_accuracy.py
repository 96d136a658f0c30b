"""What the 8-bit KV cache (`--kv-int8`: int8 keys and values, one fp32 scale per token and head) costs in accuracy,
on a model that retrieves from its context: passkey accuracy with the full-precision and the 8-bit cache on the same
prompts, how often their greedy answers agree, and the cache's bytes per token.

    python experiments/kv_int8_accuracy.py --model runs/recipe-tiny/stages/pretrain/phase2/final \\
        [--base-len 256] [--multiples 1,4,16] [--trials 4]

At 1x and 4x the model runs with plain RoPE, at 16x (past what it was trained on) with Dual Chunk Attention, as the
recipe's evaluation does. Prints a table and a JSON line last; docs/long_context.md records a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import result_line  # noqa: E402

import passkey_grid  # noqa: E402  (experiments/, beside this script)

from qwen25.config import human_bytes, kv_cache_bytes_per_token  # noqa: E402
from qwen25.evals.passkey import evaluate_passkey  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    passkey_grid.add_args(ap)
    args = ap.parse_args()
    model, tokenizer = passkey_grid.load(args)
    rows, result = [], {}
    for m, length, changes, method in passkey_grid.lengths(model, args):
        runs = {}
        for int8 in (False, True):
            with torch.inference_mode(), model.rope_settings(**changes):
                runs[int8] = evaluate_passkey(model, tokenizer, [length], passkey_grid.DEPTHS,
                                              trials=args.trials, seed=1, batch_size=10, kv_int8=int8)
        acc = {k: sum(r.correct for r in v) / len(v) for k, v in runs.items()}
        same = sum(a.output == b.output for a, b in zip(runs[False], runs[True])) / len(runs[False])
        rows.append(f"| {m}x ({length} tokens, {method}) | {acc[False]:.3f} | {acc[True]:.3f} | {same:.3f} | "
                    f"{len(runs[False])} |")
        result[f"{m}x"] = {"tokens": length, "method": method, "full": acc[False], "int8": acc[True],
                           "same_answer": same, "prompts": len(runs[False])}
        print(rows[-1], flush=True)
    cfg = model.config
    full, small = kv_cache_bytes_per_token(cfg, "float32"), kv_cache_bytes_per_token(cfg, "int8")
    print("\n| length | passkey, fp32 cache | passkey, int8 cache | same answer | prompts |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nKV cache per token: fp32 {full} B, bf16 {kv_cache_bytes_per_token(cfg, 'bfloat16')} B, int8 {small} B "
          f"({human_bytes(small * 131072)} at 128K tokens for this model)")
    print(result_line("kv_int8_accuracy", model=args.model, base_len=args.base_len, trials=args.trials,
                      results=result, kv_bytes_per_token={"float32": full, "int8": small}))


if __name__ == "__main__":
    main()
