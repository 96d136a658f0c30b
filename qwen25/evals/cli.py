"""`qwen25 eval TASK --model DIR`: run a task (built-in name or spec file) and write JSON / Markdown / PNG reports.

`qwen25 eval passkey` keeps its own options (grid of lengths and depths, heat map)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..utils import add_common_flags, apply_threads, parse_sets, write_jsonl


def _numbers(text: str, kind=float) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise SystemExit(f"expected comma-separated numbers, got {text!r} ({e})") from e


def cmd_eval_passkey(args) -> int:

    from ..model import load_model
    from ..model.sparse import SparsePrefill
    from .passkey import accuracy_table, evaluate_passkey, plot_heatmap, results_json

    try:
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(args.model)
    except (ImportError, OSError, ValueError) as e:  # reported by `qwen25` as an error, exit status 2
        raise ValueError(f"passkey: cannot load a tokenizer from {args.model}: {e}") from e
    apply_threads(args)
    model = load_model(args.model, dtype=args.dtype)
    model.sparse_prefill = SparsePrefill.from_flags(args)
    lengths, depths = _numbers(args.lengths, int), _numbers(args.depths, float)
    with model.rope_settings(**parse_sets(args.set)):  # rope_scaling, dual_chunk_attention_config, rope_theta
        results = evaluate_passkey(model, tokenizer, lengths, depths, trials=args.trials, seed=args.seed)
    table = accuracy_table(results)
    print(table)
    if model.sparse_prefill is not None:
        print(f"sparse prefill: {model.sparse_prefill.summary()}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "passkey.jsonl", results_json(results))
        (out / "passkey.md").write_text(table + "\n")
        plot_heatmap(results, out / "passkey.png", title=f"Passkey retrieval: {Path(args.model).name}")
        print(f"wrote {out / 'passkey.jsonl'}, {out / 'passkey.md'} and {out / 'passkey.png'}")
    return 0


def cmd_eval_task(args) -> int:
    """Run one task, or several (TASK = a,b,c), on a checkpoint and print the Markdown table; --out writes
    results.json/.md/.png for all of them together."""

    from .harness import ModelLM, reward_model_scorer, run_task
    from .report import markdown_table, write_report
    from ..tasks.task import load_task

    tasks = [load_task(name) for name in args.task.split(",") if name]
    for task in tasks:
        if args.limit:
            task.spec.limit = args.limit
        if args.max_new_tokens:
            task.spec.generation = {**task.spec.generation, "max_new_tokens": args.max_new_tokens}
        if args.timeout:
            task.spec.timeout = args.timeout
    apply_threads(args)
    lm, scorer = None, None
    if any(t.kind == "preference" for t in tasks):  # a reward-model directory
        from ..post.reward import load_reward_model
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(args.model) if (Path(args.model) / "tokenizer.json").is_file() else None
        scorer = reward_model_scorer(load_reward_model(args.model), tokenizer)
    if any(t.kind != "preference" for t in tasks):
        lm = ModelLM.from_dir(args.model, dtype=args.dtype, batch_size=args.batch_size)
    results = []
    for task in tasks:
        result = run_task(task, lm, progress=not args.quiet, samples=args.samples, temperature=args.temperature,
                          seed=args.seed, workers=args.workers, scorer=scorer)
        result.model = str(args.model)
        results.append(result)
    print(markdown_table(results))
    if args.out:
        names = ", ".join(t.name for t in tasks)
        paths = write_report(results, args.out, title=f"{names}: {Path(args.model).name}")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _task_parser() -> argparse.ArgumentParser:
    from ..tasks.task import builtin_tasks

    p = argparse.ArgumentParser(
        prog="qwen25 eval TASK", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"Run a task on a checkpoint. TASK is a built-in name ({', '.join(builtin_tasks())}), a "
                    "comma-separated list of tasks (one report for all), or a task spec file (.json/.yaml: kind, data jsonl, fields, template; see docs/evals.md).")
    add_common_flags(p, model="checkpoint directory (with tokenizer files), or a reward-model directory for "
                     "preference tasks", dtype=True, threads=True, quiet=True)
    p.add_argument("--out", type=Path, help="directory for results.json, results.md and results.png")
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument("--samples", type=int, default=1, help="completions per prompt (code: pass@k for k <= N)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy; with "
                   "--samples > 1 and 0 here, 0.8 is used)")
    p.add_argument("--max-new-tokens", type=int, help="override the task's generation length")
    p.add_argument("--timeout", type=float, help="override the task's per-check time limit (seconds)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=4, help="parallel sandbox checks")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval_task)
    return p


def cmd_eval(args) -> int:
    """Dispatch `qwen25 eval TASK ...` to the passkey sub-command or the generic task runner."""
    if args.task == "passkey":
        parsed = _passkey_parser().parse_args(args.rest)
    else:
        parsed = _task_parser().parse_args(args.rest)
        parsed.task = args.task
    return parsed.func(parsed)


def _passkey_parser() -> argparse.ArgumentParser:
    t = argparse.ArgumentParser(
        prog="qwen25 eval passkey",
        description="Hide 'The pass key is K' at each depth of filler text of each length (tokens) and check "
                    "that greedy decoding answers K. Prints an accuracy table; with --out also writes the "
                    "results (passkey.jsonl), the table (passkey.md) and a heat map (passkey.png).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_flags(t, model="checkpoint directory with tokenizer files", dtype=True, threads=True,
                     sets="change an inference setting of the config, e.g. --set 'rope_scaling={\"rope_type\": "
                          "\"yarn\", \"factor\": 4, \"original_max_position_embeddings\": 32768}' or "
                          "dual_chunk_attention_config={...}")
    t.add_argument("--lengths", default="1024,2048,4096", help="comma-separated prompt lengths in tokens")
    t.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated key depths in [0, 1]")
    t.add_argument("--trials", type=int, default=2, help="trials per (length, depth) cell")
    t.add_argument("--seed", type=int, default=0, help="seed of the pass keys")
    t.add_argument("--out", type=Path, help="directory for passkey.jsonl, passkey.md and passkey.png")
    add_common_flags(t, sparse=True)
    t.set_defaults(func=cmd_eval_passkey)
    return t


def add_eval_command(subparsers) -> None:
    """Register `qwen25 eval TASK ...` on the main parser's sub-command set."""
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint on a task (built-in name or spec file)",
        description="qwen25 eval TASK --model DIR [options]: TASK is a built-in task (humaneval, passkey) or a "
                    "task spec file. `qwen25 eval TASK --help` lists the options. `qwen25 eval passkey` with grid "
                    "options runs the passkey heat map.", add_help=True)
    p.add_argument("task", metavar="TASK", help="built-in task name or spec file")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the task (see qwen25 eval TASK --help)")
    p.set_defaults(func=cmd_eval)
