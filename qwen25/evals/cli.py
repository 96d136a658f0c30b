"""`qwen25 eval ...`: evaluation sub-commands (passkey retrieval)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _numbers(text: str, kind=float) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise SystemExit(f"expected comma-separated numbers, got {text!r} ({e})") from e


def _config_changes(items: list[str] | None) -> dict:
    changes = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    return changes


def cmd_eval_passkey(args) -> int:
    import torch

    from ..model import load_model
    from .passkey import accuracy_table, evaluate_passkey, plot_heatmap, results_json

    try:
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(args.model)
    except (ImportError, OSError, ValueError) as e:  # reported by `qwen25` as an error, exit status 2
        raise ValueError(f"passkey: cannot load a tokenizer from {args.model}: {e}") from e
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype)
    changes = _config_changes(args.set)
    if changes:  # inference-time settings only (rope_scaling, dual_chunk_attention_config, rope_theta)
        model.config = model.config.replace(**changes)
        model.reset_rope()
    lengths, depths = _numbers(args.lengths, int), _numbers(args.depths, float)
    results = evaluate_passkey(model, tokenizer, lengths, depths, trials=args.trials, seed=args.seed)
    table = accuracy_table(results)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "passkey.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results_json(results)))
        (out / "passkey.md").write_text(table + "\n")
        plot_heatmap(results, out / "passkey.png", title=f"Passkey retrieval: {Path(args.model).name}")
        print(f"wrote {out / 'passkey.jsonl'}, {out / 'passkey.md'} and {out / 'passkey.png'}")
    return 0


def add_eval_command(subparsers) -> None:
    """Register `qwen25 eval` and its tasks on the main parser's sub-command set."""
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on a task (passkey)",
                              description="Evaluation tasks on a checkpoint directory.")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    t = tasks.add_parser(
        "passkey", help="passkey retrieval over a grid of lengths and depths",
        description="Hide 'The pass key is K' at each depth of filler text of each length (tokens) and check "
                    "that greedy decoding answers K. Prints an accuracy table; with --out also writes the "
                    "results (passkey.jsonl), the table (passkey.md) and a heat map (passkey.png).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--model", required=True, type=Path, help="checkpoint directory with tokenizer files")
    t.add_argument("--lengths", default="1024,2048,4096", help="comma-separated prompt lengths in tokens")
    t.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated key depths in [0, 1]")
    t.add_argument("--trials", type=int, default=2, help="trials per (length, depth) cell")
    t.add_argument("--seed", type=int, default=0, help="seed of the pass keys")
    t.add_argument("--out", type=Path, help="directory for passkey.jsonl, passkey.md and passkey.png")
    t.add_argument("--dtype", default="auto", help="bf16, fp32 or auto (the checkpoint's dtype)")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change an inference setting of the config, e.g. --set 'rope_scaling={\"rope_type\": "
                        "\"yarn\", \"factor\": 4, \"original_max_position_embeddings\": 32768}' or "
                        "dual_chunk_attention_config={...} (repeatable; JSON values)")
    t.set_defaults(func=cmd_eval_passkey)
