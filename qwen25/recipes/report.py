"""report.md of a recipe run: every metric after every stage, the curves and heat maps as PNGs, time per stage."""

from __future__ import annotations

import json
from pathlib import Path

from .runner import RecipeRun, metrics_table, stage_table, timing_table

EVAL_KEYS = ["heldout_bits_per_byte", "arith_acc_plain", "arith_acc", "tool_call_valid", "tool_call_correct"]
CURVES = [("pretrain", "phase1/metrics.jsonl", "loss", "pre-training phase 1"),
          ("pretrain", "phase2a/metrics.jsonl", "loss", "phase 2a (ABF, 1x: passkeys + replay)"),
          ("pretrain", "phase2/metrics.jsonl", "loss", "phase 2 (4x, ABF: passkeys of all lengths + replay)"),
          ("sft", "metrics.jsonl", "loss", "SFT loss"), ("rm", "metrics.jsonl", "loss", "reward model loss"),
          ("dpo", "metrics.jsonl", "rewards/margins", "DPO reward margin"),
          ("grpo", "metrics.jsonl", "reward", "GRPO mean reward")]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.is_file() else []


def plot_curves(run_dir: Path, path: Path) -> Path | None:
    """One panel per training curve that exists (loss, DPO margin, GRPO reward against the step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, [(r.get("step", i), r[key]) for i, r in enumerate(_rows(run_dir / "stages" / stage / file))
                       if key in r]) for stage, file, key, title in CURVES]
    panels = [(t, pts) for t, pts in panels if pts]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, pts) in zip(axes.flat, panels):
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        if len(pts) >= 100:  # per-batch values of small batches are noisy: draw them faint, a running mean on top
            window = len(pts) // 25
            sums = [0.0]
            for v in values:
                sums.append(sums[-1] + v)
            ax.plot(steps, values, lw=0.5, alpha=0.3, color="tab:blue")
            means = [(sums[i + window] - sums[i]) / window for i in range(len(values) - window + 1)]
            ax.plot(steps[window - 1:], means, lw=1.5, color="tab:blue", label=f"mean of {window}")
            ax.legend(fontsize=7)
        else:
            ax.plot(steps, values, lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def describe_model(model_dir: Path) -> str:
    """One line on the architecture a run trains: dense or MoE, shape, total and activated parameters."""
    from ..config import ModelConfig, param_count

    cfg = ModelConfig.from_json(model_dir)
    kind = (f"MoE ({cfg.num_experts} routed experts of width {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}, "
            f"a gated shared expert of width {cfg.shared_expert_intermediate_size})" if cfg.num_experts
            else f"dense (SwiGLU width {cfg.intermediate_size})")
    return (f"Model: {kind}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} query / "
            f"{cfg.num_key_value_heads} KV heads, vocabulary {cfg.vocab_size}; {param_count(cfg):,} parameters "
            f"({param_count(cfg, activated=True):,} activated per token, "
            f"{param_count(cfg, embeddings=False, activated=True):,} without embeddings).")


def write_report(run: RecipeRun, fast: bool) -> Path:
    """Write run.dir/report.md (and curves.png) from the finished stages; returns the report's path."""
    root = run.dir
    records = list(run.records.values())
    evals = [r for r in records if r.name.startswith("eval_")]
    stages = [r for r in records if not r.name.startswith("eval_")]
    keys = EVAL_KEYS + sorted({k for r in evals for k in r.metrics if k.startswith("passkey_")})
    curves = plot_curves(root, root / "curves.png")
    lines = [f"# The Qwen2.5 recipe in miniature ({'fast' if fast else 'full'} run)", "",
             f"Command: `{run.command}` (rerun it to resume; finished stages are skipped).", "",
             describe_model(root / "model"), "",
             "## Evaluation after each stage", "", metrics_table(evals, keys), "",
             "Bits per byte on held-out standard-library files (lower is better); arithmetic accuracy on held-out "
             "word problems (`_plain`: the pre-training text format, otherwise a chat prompt); tool calls: "
             "well-formed `<tool_call>` with the right function and arguments; passkey at k x the phase-1 context "
             "with plain RoPE, YaRN or Dual Chunk Attention.", "",
             "## Stage metrics", "", stage_table(stages), ""]
    if curves:
        lines += ["## Curves", "", "![training curves](curves.png)", ""]
    pictures = [("data pipeline: documents per step and the domain mixture", "stages/data/pipeline/stats.png"),
                ("scaling-law fit", "stages/scaling/fit.png")]
    pictures += [(f"passkey after pre-training, {v}", f"stages/eval_pretrain/passkey_{v}.png")
                 for v in ("rope", "yarn", "dca")]
    lines += ["## Plots", ""] + [f"![{t}]({p})" for t, p in pictures if (root / p).is_file()] + [""]
    notes = [f"- {r.name}: {n}" for r in records for n in r.notes]
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    lines += ["## Time per stage", "", timing_table(records), ""]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path
