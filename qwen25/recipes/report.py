"""report.md of a recipe run: every metric after every stage, the curves and heat maps as PNGs, time per stage."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig, param_count
from .runner import RecipeRun, metrics_table, stage_table, timing_table

EVAL_KEYS = ["heldout_bits_per_byte", "arith_acc_plain", "arith_acc", "tool_call_valid", "tool_call_correct"]
CURVES = [("pretrain", "phase1/metrics.jsonl", "loss", "pre-training phase 1"),
          ("pretrain", "phase2a/metrics.jsonl", "loss", "phase 2a (ABF, 1x: passkeys + replay)"),
          ("pretrain", "phase2/metrics.jsonl", "loss", "phase 2 (4x, ABF: passkeys of all lengths + replay)"),
          ("sft", "metrics.jsonl", "loss", "SFT loss"),
          ("rs_sft", "metrics.jsonl", "loss", "rejection-sampled SFT loss"),
          ("rm", "metrics.jsonl", "loss", "reward model loss"),
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

    cfg = ModelConfig.from_json(model_dir)
    kind = (f"MoE ({cfg.num_experts} routed experts of width {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}, "
            f"a gated shared expert of width {cfg.shared_expert_intermediate_size})" if cfg.num_experts
            else f"dense (SwiGLU width {cfg.intermediate_size})")
    return (f"Model: {kind}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} query / "
            f"{cfg.num_key_value_heads} KV heads, vocabulary {cfg.vocab_size}; {param_count(cfg):,} parameters "
            f"({param_count(cfg, activated=True):,} activated per token, "
            f"{param_count(cfg, embeddings=False, activated=True):,} without embeddings).")


def machine() -> str:
    """The machine a run's numbers come from: CPU, the kernels torch picks, threads, torch and Python versions."""
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    return (f"{cpu}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()} kernels, "
            f"{torch.get_num_threads()} threads), Python {platform.python_version()}")


def _ablation_results(root: Path) -> dict:
    path = root / "ablations" / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _get(records: dict, stage: str, key: str):
    r = records.get(stage)
    return r.metrics.get(key) if r else None


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def summary_rows(records: dict, ablations: dict, cfg_multiples: list[int]) -> list[str]:
    """The report card: one row per stage, its headline number in this run and what it is measured against."""
    seeds = ablations.get("summary", [])  # one row per claim (an arm can be the "with" of several)

    def against(arm_metric: tuple[str, str], label: str, this_run: str = "") -> str:
        """The ablation row over seeds (without-arm mean vs with-arm mean), else this run's number, else a hint."""
        row = next((r for r in seeds if r["without"] == arm_metric[0] and r["metric"] == arm_metric[1]), None)
        if row is None:
            return f"{label}: {this_run}" if this_run else f"{label}: run `--ablations`"
        verdict = "shown" if row["shown"] else "not shown"
        return (f"{label}: {row['without_mean']:.3f} ± {row['without_sd']:.3f} vs {row['with_mean']:.3f} ± "
                f"{row['with_sd']:.3f} over {len(row['with_values'])} seeds ({verdict})")

    m4 = cfg_multiples[1] if len(cfg_multiples) > 1 else cfg_multiples[0]
    m16 = cfg_multiples[-1]
    rows = ["| stage | headline | this run | against |", "|---|---|---|---|"]
    data = records.get("data")
    if data:
        d = data.metrics
        rows.append(f"| data | spam / near-duplicates / test leaks dropped; quality of what is kept (D_eff / D) | "
                    f"{d.get('dropped_quality')} / {d.get('dropped_minhash')} / {d.get('dropped_decontaminate')}; "
                    f"q = {_num(d.get('kept_quality'))} | planted: see the corpus stage |")
    law = records.get("loss_law")
    if law:
        m = law.metrics
        rows.append(f"| loss law | leave-one-out error of L(N, D_eff) vs L(N, D) (nats) | "
                    f"{_num(m.get('law_D_eff_loo_rmse'), 4)} | L(N, D): {_num(m.get('law_D_loo_rmse'), 4)} |")
    if ablations.get("loss_law"):
        m = ablations["loss_law"]
        rows.append(f"| loss law, larger grid (`--ablations`) | leave-one-out error of L(N, D_eff) vs L(N, D) | "
                    f"{_num(m.get('law_D_eff_loo_rmse'), 4)} | L(N, D): {_num(m.get('law_D_loo_rmse'), 4)} |")
    pre = records.get("pretrain")
    rows.append(f"| pre-training phase 1 | held-out bits per byte | {_num(_get(records, 'eval_phase1', 'heldout_bits_per_byte'))} "
                f"| {against(('no_quality_dedup', 'heldout_bits_per_byte'), 'no quality filter + dedup')} |")
    if pre:
        rows.append(f"| phase 1 learning rate | the scaling fit's `lr: auto` | {_num(pre.metrics.get('lr_from_fit'), 5)} | "
                    f"{against(('lr_x3', 'final_train_loss'), '3x higher')}; {against(('lr_div3', 'final_train_loss'), '3x lower')} |")
    rows.append(f"| pre-training (ABF) | passkey 1x / {m4}x, plain RoPE | "
                f"{_num(_get(records, 'eval_pretrain', 'passkey_1x_rope'))} / {_num(_get(records, 'eval_pretrain', f'passkey_{m4}x_rope'))} "
                f"| {against(('no_abf', f'passkey_{m4}x_rope'), 'no ABF')} |")
    rows.append(f"| long context | passkey {m16}x: DCA / YaRN / plain RoPE | "
                f"{_num(_get(records, 'eval_pretrain', f'passkey_{m16}x_dca'))} / "
                f"{_num(_get(records, 'eval_pretrain', f'passkey_{m16}x_yarn'))} / "
                f"{_num(_get(records, 'eval_pretrain', f'passkey_{m16}x_rope'))} | keys far outside DCA's window: ablations.md |")
    acc = lambda stage: _num(_get(records, f"eval_{stage}", "arith_acc"))  # noqa: E731
    tools = lambda stage: _num(_get(records, f"eval_{stage}", "tool_call_correct"))  # noqa: E731
    rows.append(f"| SFT | arithmetic accuracy; tool calls exactly right | {acc('sft')}; {tools('sft')} | "
                f"{against(('pretrained', 'arith_acc'), 'pre-trained', acc('pretrain'))}; "
                f"{against(('pretrained', 'tool_call_correct'), 'pre-trained', tools('pretrain'))} |")
    rows.append(f"| rejection-sampled SFT | arithmetic accuracy after a second round on verified samples | "
                f"{acc('rs_sft')} | {against(('sft', 'arith_acc'), 'SFT', acc('sft'))} |")
    rm = [_num(_get(records, "rm", key)) for key in ("rm_heldout_acc", "rm_step_acc")]
    rows.append(f"| reward model | held-out sampled pairs ranked right; test step pairs (both answers right) | "
                f"{rm[0]}; {rm[1]} | {against(('rm', 'rm_heldout_acc vs chance'), 'chance', '0.500')} |")
    rows.append(f"| DPO (online merging) | arithmetic accuracy; tool calls exactly right | {acc('dpo')}; {tools('dpo')} | "
                f"{against(('rs_sft', 'arith_acc'), 'before DPO', acc('rs_sft'))}; "
                f"{against(('dpo_plain', 'arith_acc'), 'plain DPO')} |")
    rows.append(f"| GRPO | arithmetic accuracy; mean reward, first / second half of the steps | {acc('grpo')}; "
                f"{_num(_get(records, 'grpo', 'grpo_reward_first_half'))} / "
                f"{_num(_get(records, 'grpo', 'grpo_reward_second_half'))} | "
                f"{against(('dpo_merge', 'arith_acc'), 'before GRPO', acc('dpo'))}; "
                f"{against(('grpo_uniform', 'arith_acc'), 'uniform query order')} |")
    rows.append(f"| serve | one chat completion over HTTP | {'ok' if _get(records, 'serve', 'serve_ok') else '-'} | |")
    return rows


def _samples(root: Path) -> list[str]:
    path = root / "stages" / "samples" / "samples.json"
    if not path.is_file():
        return []
    lines = ["## Samples after pre-training (greedy)", ""]
    for s in json.loads(path.read_text()):
        lines += [f"**{s['what']}**", "", "```", s["prompt"] + "⟨" + s["output"] + "⟩", "```", ""]
    return lines


def write_report(run: RecipeRun, fast: bool) -> Path:
    """Write run.dir/report.md (and curves.png) from the finished stages; returns the report's path."""
    root = run.dir
    records = list(run.records.values())
    by_name = {r.name: r for r in records}
    evals = [r for r in records if r.name.startswith("eval_")]
    stages = [r for r in records if not r.name.startswith("eval_")]
    keys = EVAL_KEYS + sorted({k for r in evals for k in r.metrics if k.startswith("passkey_")})
    curves = plot_curves(root, root / "curves.png")
    pre = by_name.get("pretrain")
    lines = [f"# The Qwen2.5 recipe in miniature ({'fast' if fast else 'full'} run)", ""]
    if fast:
        first, last = (pre.metrics.get("phase1_loss_first"), pre.metrics.get("phase1_loss_last")) if pre else (None, None)
        lines += [f"> **A smoke run (`--fast`)**: toy sizes and a few steps, to show that every stage runs. Its numbers "
                  f"mean nothing; `qwen25 recipe tiny` (`make demo`) gives the real ones. Pre-training loss still falls: "
                  f"{_num(first)} -> {_num(last)} over phase 1.", ""]
    lines += [f"Command: `{run.command}` (rerun it to resume; finished stages are skipped).", "",
              describe_model(root / "model"), ""]
    if pre and "pretrain_mfu_median" in pre.metrics:
        lines += [f"Pre-training: median MFU {pre.metrics['pretrain_mfu_median']:.1%} of the measured "
                  f"{pre.metrics.get('pretrain_dtype', 'fp32')} matmul peak; "
                  f"{sum(r.seconds for r in records):.0f} s for the whole run. Machine: {machine()}.", ""]
    multiples = sorted({int(k.split("_")[1][:-1]) for k in keys if k.startswith("passkey_")}) or [1]
    lines += ["## Summary", ""] + summary_rows(by_name, _ablation_results(root), multiples) + [""]
    lines += ["With 3 seeds per arm, `against` gives mean ± standard deviation and whether every seed of one arm "
              "beats every seed of the other (ablations.md). On one machine a rerun of the same commit gives the same "
              "numbers (training is deterministic for a given CPU and thread count); another CPU rounds differently "
              "and moves them by about the seed spread.", ""]
    lines += _samples(root)
    lines += ["## Evaluation after each stage", "", metrics_table(evals, keys), "",
              "Bits per byte on held-out standard-library files (lower is better); arithmetic accuracy on held-out "
              "word problems (`_plain`: the pre-training text format, otherwise a chat prompt); tool calls: "
              "well-formed `<tool_call>` with the right function and arguments; passkey at k x the phase-1 context "
              "with plain RoPE, YaRN or Dual Chunk Attention.", "",
              "## Stage metrics", "", stage_table(stages), ""]
    if curves:
        lines += ["## Curves", "", "![training curves](curves.png)", ""]
    pictures = [("data pipeline: documents per step and the domain mixture", "stages/data/pipeline/stats.png"),
                ("scaling-law fit", "stages/scaling/fit.png"),
                ("loss law: held-out loss against D and D_eff", "stages/loss_law/loss_law.png")]
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
