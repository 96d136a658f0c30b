"""Evaluation reports: results.json (metrics + records), a Markdown table and a bar-chart PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .harness import EvalResult

# The headline number of each kind (the bar chart plots it; the table shows every scalar metric).
HEADLINE = {"multiple_choice": "acc", "math": "acc", "code": "pass@1", "perplexity": "bits_per_byte",
            "preference": "acc", "passkey": "acc"}


def headline(result: EvalResult) -> tuple[str, float]:
    name = HEADLINE.get(result.kind, "acc")
    return name, float(result.metrics.get(name, float("nan")))


def scalar_metrics(result: EvalResult) -> dict[str, float]:
    return {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def markdown_table(results: Sequence[EvalResult]) -> str:
    """One row per task: model, kind, headline metric, the other scalar metrics, examples and seconds."""
    lines = ["| task | kind | model | metric | value | other metrics | seconds |", "|---|---|---|---|---|---|---|"]
    for r in results:
        name, value = headline(r)
        others = ", ".join(f"{k} {_fmt(v)}" for k, v in scalar_metrics(r).items() if k != name)
        lines.append(f"| {r.task} | {r.kind} | {Path(r.model).name or '-'} | {name} | {_fmt(value)} | {others} | "
                     f"{r.seconds:.1f} |")
    for r in results:  # per-subject / per-cell breakdowns under the main table
        for key in ("acc_by_subject", "acc_by_cell"):
            if key in r.metrics:
                lines += ["", f"{r.task} {key.replace('_', ' ')}:", "", "| group | acc |", "|---|---|"]
                lines += [f"| {g} | {_fmt(v)} |" for g, v in r.metrics[key].items()]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def bar_chart(results: Sequence[EvalResult], path: str | Path, title: str = "Evaluation") -> Path:
    """A bar per task with its headline metric (accuracies on a 0..1 axis, bits per byte on its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.task}\n{headline(r)[0]}" + ("\n(lower is better)" if r.kind == "perplexity" else "")
              for r in results]
    values = [headline(r)[1] for r in results]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(results), 3.6))
    bars = ax.bar(range(len(values)), values, color=["tab:orange" if r.kind == "perplexity" else "tab:blue"
                                                     for r in results])
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    if all(r.kind != "perplexity" for r in results):
        ax.set_ylim(0, 1)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), _fmt(v), ha="center", va="bottom", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: Sequence[EvalResult], out_dir: str | Path, title: str = "Evaluation") -> dict[str, Path]:
    """results.json (every metric and record), results.md (the table) and results.png (the bar chart)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "png": out / "results.png"}
    paths["json"].write_text(json.dumps([r.to_dict() for r in results], indent=1, default=str) + "\n")
    paths["markdown"].write_text(f"# {title}\n\n" + markdown_table(results) + "\n")
    bar_chart(results, paths["png"], title)
    return paths
