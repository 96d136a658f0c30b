"""`qwen25 data ...`: run a data pipeline config, print a finished run's statistics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_data_run(args) -> int:
    from .pipeline import DataPipeline, load_config, quiet_datatrove_logs
    from .stats import PLOT_FILE, STATS_FILE, format_report

    config = load_config(args.config)
    if args.output:
        config["output"] = str(args.output.resolve())
    if args.tasks or args.workers:
        config["executor"] = dict(config.get("executor") or {"kind": "local"})
        if args.tasks:
            config["executor"]["tasks"] = args.tasks
        if args.workers:
            config["executor"]["workers"] = args.workers
    if not args.verbose:
        quiet_datatrove_logs()
    pipeline = DataPipeline(config)
    print(json.dumps({k: v for k, v in config.items() if k != "base_dir"}, default=str))  # the resolved config
    report = pipeline.run()
    print(format_report(report))
    print(f"wrote {pipeline.out / STATS_FILE} and {pipeline.out / PLOT_FILE}")
    return 0


def cmd_data_stats(args) -> int:
    from .stats import format_report, load_report

    try:
        report = load_report(args.dir)
    except FileNotFoundError as e:
        raise SystemExit(f"qwen25 data stats: error: {e}") from e
    print(format_report(report))
    return 0


def add_data_command(subparsers) -> None:
    """Register `qwen25 data run CONFIG` and `qwen25 data stats DIR`."""
    p = subparsers.add_parser("data", help="pre-training data pipeline (filter, dedup, quality, mix, pack)",
                              description="The pre-training data pipeline on datatrove; see docs/data.md.")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    r = sub.add_parser("run", help="run a pipeline config (.yaml or .toml); reruns skip finished work",
                       description="Run every step of a pipeline config. Writes OUTPUT/stats.json, OUTPUT/stats.png "
                                   "and the token shards in OUTPUT/shards; a rerun resumes where a failed run stopped.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("config", type=Path, help="pipeline config file (YAML or TOML)")
    r.add_argument("--output", type=Path, help="override the config's output folder")
    r.add_argument("--tasks", type=int, help="override executor.tasks (how many shards of work)")
    r.add_argument("--workers", type=int, help="override executor.workers (tasks run at once)")
    r.add_argument("--verbose", action="store_true", help="show datatrove's INFO logs")
    r.set_defaults(func=cmd_data_run)
    s = sub.add_parser("stats", help="print the statistics of a finished run",
                       description="Print OUTPUT/stats.json as a table.")
    s.add_argument("dir", type=Path, help="the pipeline's output folder")
    s.set_defaults(func=cmd_data_stats)
