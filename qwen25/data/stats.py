"""Pipeline statistics: per-step documents in/out, tokens and drop reasons, the mixture table, a PNG report."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .mixture import merge_histograms

STATS_FILE, PLOT_FILE = "stats.json", "stats.png"


def _clean(name: str) -> str:
    """'🔻 - FILTER: 👯 Gopher Repetition' -> 'Gopher Repetition'."""
    return re.sub(r"[^\x20-\x7e]", "", name.split(":", 1)[-1]).strip(" -")


def summarize_stage(label: str, step_stats: list[dict], seconds: float) -> dict:
    """One step's summary from the datatrove stats of its final run: documents in and out, tokens out (when
    counted), and every drop reason as 'STEP: reason'."""
    first = step_stats[0]["stats"] if step_stats else {}
    last = step_stats[-1]["stats"] if step_stats else {}
    docs_in = first.get("documents", first.get("total", 0))
    dropped = {}
    for step in step_stats:
        name = _clean(step["name"])
        reasons = {k[len("dropped_"):]: v for k, v in step["stats"].items() if k.startswith("dropped_")}
        for reason, n in reasons.items():
            dropped[f"{name}: {reason}"] = n
        if step["stats"].get("dropped") and not reasons:
            dropped[name] = step["stats"]["dropped"]
    out = {"step": label, "docs_in": int(docs_in), "docs_out": int(last.get("total", 0)), "dropped": dropped,
           "seconds": round(seconds, 3)}
    if "doc_len_tokens" in first:
        out["tokens_in"] = int(first["doc_len_tokens"])
    if "doc_len_tokens" in last or "tokens" in last:
        out["tokens_out"] = int(last.get("doc_len_tokens", last.get("tokens", 0)))
    skipped = {k.removeprefix("skipped_"): int(v) for s in step_stats for k, v in s["stats"].items()
               if k.startswith("skipped_") or k == "corrupt_files"}
    if skipped:
        out["skipped_records"] = skipped  # unreadable input: counted here, never fatal (the log has each line)
    domains = {k[len("domain_"):]: v for s in step_stats for k, v in s["stats"].items() if k.startswith("domain_")}
    if domains:
        out["domains"] = domains
    counted = [s["stats"] for s in step_stats if _clean(s["name"]) == "effective tokens"]
    if counted:
        out["effective_tokens"] = effective_tokens(counted[-1])
    return out


def effective_tokens(stats: dict) -> dict:
    """{domain: {tokens, effective_tokens, quality}} and "total" from an EffectiveTokens step's stats: D = sum n and
    D_eff = sum q * n over the documents of each domain; quality = D_eff / D, the token-weighted mean score.
    Documents without a quality score count in tokens but not in D_eff (and make the total's quality a lower bound)."""
    domains = sorted({k.split("/", 1)[1] for k in stats if k.startswith("tokens/")})
    table = {}
    for d in domains:
        n, eff = stats.get(f"tokens/{d}", 0), stats.get(f"effective_tokens/{d}", 0.0)
        table[d] = {"tokens": int(n), "effective_tokens": float(eff), "quality": eff / n if n else 0.0}
    n = sum(r["tokens"] for r in table.values())
    eff = sum(r["effective_tokens"] for r in table.values())
    table["total"] = {"tokens": n, "effective_tokens": eff, "quality": eff / n if n else 0.0,
                      "unscored_tokens": int(stats.get("unscored_tokens", 0))}
    return table


def mixture_table(extra: dict) -> dict | None:
    """{domain: input size and weight, target weight, output size and weight} from the mixture's plan and the
    histogram of its output."""
    if "mixture" not in extra:
        return None
    plan = extra["mixture"]["plan"]["domains"]
    out_sizes = {d: int(h.sum()) for d, h in merge_histograms(extra["mixture"]["output_counts"]).items()}
    total_in = sum(p["size_in"] for p in plan.values()) or 1
    total_out = sum(out_sizes.values()) or 1
    return {d: {"size_in": p["size_in"], "weight_in": p["size_in"] / total_in, "target_weight": p["target_weight"],
                "rate": p["rate"], "size_out": out_sizes.get(d, 0), "weight_out": out_sizes.get(d, 0) / total_out}
            for d, p in plan.items()}


def write_report(out_dir: str | Path, stages: list[dict], extra: dict) -> dict:
    """Write stats.json (and stats.png when matplotlib is there); returns the statistics."""
    out_dir = Path(out_dir)
    report = {"stages": stages}
    table = mixture_table(extra)
    if table is not None:
        report["mixture"] = {"unit": extra["mixture"]["plan"]["unit"], "domains": table}
    for key, value in extra.items():
        if key != "mixture":
            report[key] = value
    tmp = out_dir / (STATS_FILE + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out_dir / STATS_FILE)
    plot_report(report, out_dir / PLOT_FILE)
    return report


def plot_report(report: dict, path: Path) -> Path:
    """Documents in/out per step and, when there is a mixture, input / target / output weight per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixture = report.get("mixture")
    fig, axes = plt.subplots(1, 2 if mixture else 1, figsize=(13 if mixture else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    stages = report["stages"]
    xs = range(len(stages))
    ax.bar([x - 0.2 for x in xs], [s["docs_in"] for s in stages], width=0.4, label="in")
    ax.bar([x + 0.2 for x in xs], [s["docs_out"] for s in stages], width=0.4, label="out")
    ax.set_xticks(list(xs), [s["step"] for s in stages], rotation=30, ha="right")
    ax.set_ylabel("documents")
    ax.set_title("documents per step")
    ax.legend()
    if mixture:
        ax = axes[0, 1]
        domains = list(mixture["domains"])
        rows = [("input", "weight_in"), ("target", "target_weight"), ("output", "weight_out")]
        for k, (label, key) in enumerate(rows):
            ax.bar([i + (k - 1) * 0.27 for i in range(len(domains))],
                   [mixture["domains"][d][key] for d in domains], width=0.27, label=label)
        ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
        ax.set_ylabel(f"share of {mixture['unit']}")
        ax.set_title("domain mixture")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_report(report: dict) -> str:
    """The statistics as a plain-text table (for `qwen25 data stats DIR`)."""
    lines = [f"{'step':<20} {'docs in':>8} {'docs out':>8} {'tokens in':>10} {'tokens out':>10} {'seconds':>8}  "
             "dropped"]
    for s in report["stages"]:
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
        t_in, t_out = str(s.get("tokens_in", "-")), str(s.get("tokens_out", "-"))
        lines.append(f"{s['step']:<20} {s['docs_in']:>8} {s['docs_out']:>8} {t_in:>10} {t_out:>10} "
                     f"{s['seconds']:>8.2f}  {dropped}")
    if "mixture" in report:
        lines.append(f"\nmixture ({report['mixture']['unit']}): {'domain':<14} {'in':>7} {'target':>7} {'out':>7}")
        for d, row in report["mixture"]["domains"].items():
            lines.append(f"{'':<21}{d:<14} {row['weight_in']:>7.3f} {row['target_weight']:>7.3f} "
                         f"{row['weight_out']:>7.3f}")
    final = next((s["effective_tokens"] for s in reversed(report["stages"]) if "effective_tokens" in s), None)
    if final and final["total"]["effective_tokens"]:
        lines.append(f"\neffective tokens after the last step: {'domain':<14} {'D':>10} {'D_eff':>10} {'q':>6}")
        for d, row in final.items():
            lines.append(f"{'':<38}{d:<14} {row['tokens']:>10} {row['effective_tokens']:>10.0f} "
                         f"{row['quality']:>6.3f}")
    if "pack" in report:
        p = report["pack"]
        lines.append(f"\npacked {p['documents']} documents, {p['tokens']} tokens into {p['rows']} rows of "
                     f"{p['seq_len']} + 1 ({p['method']}), padding {100 * p['padding_fraction']:.2f}%")
    return "\n".join(lines)


def load_report(out_dir: str | Path) -> dict:
    """Read stats.json of a pipeline output folder."""
    path = Path(out_dir) / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no statistics (has `qwen25 data run` finished in {out_dir}?)")
    return json.loads(path.read_text())
