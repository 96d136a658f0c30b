"""`qwen25 train CONFIG`, `qwen25 sweep CONFIG`, `qwen25 fit-scaling SWEEP_DIR`, `qwen25 fit-loss-law SWEEP_DIR`.

Every command also runs under torchrun (`torchrun --nproc_per_node 2 -m qwen25.cli train CONFIG.yaml`):
the process group starts from torchrun's environment and the loop shards the model with FSDP2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..utils import add_common_flags, load_config


def cmd_train(args) -> int:
    from . import distributed
    from .loop import TrainConfig, resolve_config, train
    from .phases import run_phases

    raw = load_config(args.config, args.set)
    if args.allow_config_change:
        raw["allow_config_change"] = True
    rank, world = distributed.init()
    try:
        if "phases" in raw:
            run_phases(raw, progress=not args.quiet)
        else:
            cfg = resolve_config(TrainConfig.from_dict(raw))
            if rank == 0:
                print(f"training with {world} process(es):\n" + json.dumps(dataclasses.asdict(cfg), indent=2))
            final = train(cfg, progress=not args.quiet)
            if rank == 0:
                print(json.dumps(final))
    finally:
        distributed.shutdown()
    return 0


def cmd_sweep(args) -> int:
    from . import distributed
    from .sweep import run_sweep

    raw = load_config(args.config, args.set)
    rank, _ = distributed.init()
    try:
        results = run_sweep(raw, progress=not args.quiet)
    finally:
        distributed.shutdown()
    if rank == 0:
        print(f"{len(results)} new run(s); results in {Path(raw['out_dir']) / 'results.jsonl'}")
    return 0


def cmd_fit_scaling(args) -> int:
    from .scaling import FIT_FILE, write_fit

    fit = write_fit(args.sweep_dir, args.out)
    out = Path(args.out) if args.out else Path(args.sweep_dir) / FIT_FILE
    for key in ("lr", "batch_tokens"):
        f = fit[key]
        print(f"{key:>12}_opt(N, D) = {f['coef']:.4g} * N^{f['alpha']:.4f} * D^{f['beta']:.4f} "
              f"(rms log error {f['rmse_log']:.3f})")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def cmd_fit_loss_law(args) -> int:
    from .loss_law import LAW_FILE, describe, write_loss_law

    result = write_loss_law(args.sweep_dir, args.out)
    out = Path(args.out) if args.out else Path(args.sweep_dir) / LAW_FILE
    print(describe(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def add_train_commands(subparsers) -> None:
    """Register train, sweep, fit-scaling and fit-loss-law on the `qwen25` parser."""
    p = subparsers.add_parser(
        "train", help="pre-train from a YAML config (token shards; phases; torchrun for FSDP2)",
        description="Train (or resume) a run described by a YAML file of TrainConfig options (see "
                    "docs/training.md). With `phases:` the phases run in order, each from the previous one's "
                    "weights. Under torchrun the model is sharded with FSDP2 (gloo on CPU, NCCL on GPU).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file")
    add_common_flags(p, sets="override an option of the config", quiet=True)
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although options that change the run (seed, batch size, lr, steps...) differ "
                        "from its train_config.json (the differences are logged)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "sweep", help="hyper-parameter sweep: models x token budgets x learning rates x batch sizes",
        description="Train every grid point of a sweep config (out_dir, base: options, grid: models/tokens/"
                    "lr/batch_size lists) and append each final loss to out_dir/results.jsonl.")
    p.add_argument("config", help="YAML sweep config")
    add_common_flags(p, sets="override a top-level option of the sweep config", quiet=True)
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser(
        "fit-scaling", help="fit mu_opt(N, D) and B_opt(N, D) power laws to a sweep",
        description="Read SWEEP_DIR/results.jsonl, find the optimal learning rate and batch size per (N, D), fit "
                    "power laws in log space, write fit.json (for `lr: auto`) and fit.png.")
    p.add_argument("sweep_dir", help="the sweep's out_dir")
    p.add_argument("--out", help="where to write the fit JSON (default SWEEP_DIR/fit.json)")
    p.set_defaults(func=cmd_fit_scaling)

    p = subparsers.add_parser(
        "fit-loss-law", help="fit L(N, D) and L(N, D_eff = quality x D) to a quality sweep",
        description="Read SWEEP_DIR/results.jsonl of a sweep with a `data` axis (corpora of known quality) and "
                    "`eval_data` (clean held-out shards); fit L = E + A/N^alpha + B/D^beta with D the tokens "
                    "trained and with D_eff = quality x tokens, each with leave-one-out and budget-extrapolation "
                    "errors; write loss_law.json and loss_law.png.")
    p.add_argument("sweep_dir", help="the sweep's out_dir")
    p.add_argument("--out", help="where to write the JSON (default SWEEP_DIR/loss_law.json)")
    p.set_defaults(func=cmd_fit_loss_law)
