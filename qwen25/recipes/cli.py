"""`qwen25 recipe tiny`: the whole report's recipe in miniature (see qwen25/recipes/tiny.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..utils import add_common_flags, apply_threads, parse_sets


def cmd_recipe(args) -> int:

    from .tiny import run_recipe

    apply_threads(args)
    sets = parse_sets(args.set)
    out = args.out or Path("runs") / ("recipe-tiny" + "-moe" * args.moe + "-fast" * args.fast)
    if args.ablations_report:  # what the ablations in OUT have finished so far; trains nothing
        from .ablations import write_ablations_report

        print(f"ablations: {write_ablations_report(out, fast=args.fast, moe=args.moe, seeds=args.seeds, sets=sets)}")
        return 0
    if args.ablations:
        from .ablations import run_ablations

        parts = ("post", "pretrain") if args.ablations == "all" else (args.ablations,)
        path = run_ablations(out, fast=args.fast, moe=args.moe, seeds=args.seeds, sets=sets, parts=parts)
        print(f"ablations: {path}")
    report = run_recipe(out, fast=args.fast, moe=args.moe, sets=sets)  # after the ablations: the report cites them
    print(f"report: {report}")
    return 0


def add_recipe_command(subparsers) -> None:
    """Register `qwen25 recipe NAME`."""
    p = subparsers.add_parser(
        "recipe", help="run the report's whole recipe in miniature (data, pre-training, post-training, eval, serve)",
        description="Corpus -> tokenizer -> data pipeline -> scaling-law fit -> pre-training (2 phases, ABF) -> "
                    "SFT -> rejection sampling -> reward model -> DPO (online merging) -> GRPO -> serving, with an "
                    "evaluation after each stage and OUT/report.md at the end. Rerun the same command to resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", choices=["tiny"], help="the recipe")
    p.add_argument("--fast", action="store_true", help="a ~2-minute version (what the tests run)")
    p.add_argument("--moe", action="store_true", help="the MoE variant: routed + shared experts in every layer")
    p.add_argument("--out", type=Path, help="run folder (default runs/recipe-tiny[-moe][-fast])")
    p.add_argument("--ablations", nargs="?", const="all", choices=["all", "pretrain", "post"],
                   help="after the recipe, rerun each claim with one thing removed over --seeds seeds "
                        "(OUT/ablations.md; resumable): `post` the post-training rows (about 25 minutes), "
                        "`pretrain` the pre-training rows (about 2 hours), no value both")
    p.add_argument("--seeds", type=int, default=3, help="seeds per ablation arm")
    p.add_argument("--ablations-report", action="store_true",
                   help="write OUT/ablations.md from the ablation stages finished so far (marked partial while the "
                        "run is incomplete) without training anything")
    add_common_flags(p, threads=True, sets="change the recipe's config (OUT/recipe.json), dotted for nested "
                     "options, e.g. --set sft.epochs=2; a resumed run needs the same changes")
    p.set_defaults(func=cmd_recipe)
