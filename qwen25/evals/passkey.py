"""Passkey retrieval over a grid of lengths x depths: greedy-decode each prompt (qwen25/tasks/passkey.py) and
check that the continuation starts with exactly K; an accuracy table and a heat map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import generation
from ..tasks.passkey import TextTokenizer, passkey_answer, passkey_samples


@dataclass
class PasskeyResult:
    length: int
    depth: float
    passkey: int
    prompt_tokens: int
    output: str
    correct: bool


def evaluate_passkey(model, tokenizer: TextTokenizer, lengths: Sequence[int], depths: Sequence[float],
                     trials: int = 1, seed: int = 0, batch_size: int = 1, kv_int8: bool = False) -> list[PasskeyResult]:
    """Greedy-decode every sample of the grid; a trial is correct when the continuation starts with K. kv_int8: with
    the 8-bit KV cache."""
    samples = passkey_samples(tokenizer, lengths, depths, trials, seed)
    results = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        # The answer's own tokens plus two: a model that goes on with more digits is wrong.
        new = max(len(tokenizer.encode(f" {s.passkey}")) for s in batch) + 2
        outputs = generation.generate(model, [s.ids for s in batch], generation.SamplingParams(max_new_tokens=new),
                                      kv_int8=kv_int8)
        for sample, out in zip(batch, outputs):
            text = tokenizer.decode(out)
            results.append(PasskeyResult(sample.length, sample.depth, sample.passkey, len(sample.ids), text,
                                         passkey_answer(text) == sample.passkey))
    return results


def accuracy_grid(results: Sequence[PasskeyResult]) -> tuple[list[int], list[float], list[list[float]]]:
    """(lengths, depths, accuracy[depth][length]) over the results."""
    lengths = sorted({r.length for r in results})
    depths = sorted({r.depth for r in results})
    grid = []
    for depth in depths:
        row = []
        for length in lengths:
            cell = [r.correct for r in results if r.length == length and r.depth == depth]
            row.append(sum(cell) / len(cell) if cell else float("nan"))
        grid.append(row)
    return lengths, depths, grid


def accuracy_table(results: Sequence[PasskeyResult]) -> str:
    """A markdown table: one row per depth, one column per length, accuracy in percent, and the mean."""
    lengths, depths, grid = accuracy_grid(results)
    lines = ["| depth \\ length | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for depth, row in zip(depths, grid):
        lines.append(f"| {depth:.0%} | " + " | ".join(f"{100 * a:.0f}" for a in row) + " |")
    mean = sum(r.correct for r in results) / max(len(results), 1)
    lines.append(f"\nmean accuracy {100 * mean:.1f}% over {len(results)} trials")
    return "\n".join(lines)


def plot_heatmap(results: Sequence[PasskeyResult], path: str | Path, title: str = "Passkey retrieval") -> Path:
    """A heat map like the report's figure: context length on x, key depth on y, accuracy as colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths, grid = accuracy_grid(results)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey depth")
    ax.set_title(title)
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            ax.text(x, y, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def results_json(results: Sequence[PasskeyResult]) -> list[dict]:
    return [asdict(r) for r in results]
