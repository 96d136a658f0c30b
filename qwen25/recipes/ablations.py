"""`qwen25 recipe tiny --ablations`: each pre- and post-training claim of the report, rerun with one thing removed,
over seeds.

| claim | with | without | metric |
|---|---|---|---|
| quality filtering and dedup help | the pipeline as is | no quality filter, no MinHash dedup | held-out bits per byte |
| the domain mixture helps the domains it up-samples | mixture | no mixture | held-out bits per byte per domain |
| ABF (RoPE base 10K -> 1M) lets the long phase read far | base 1M in phase 2 | base 10K in phase 2 | passkey at 4x |
| DCA extends retrieval past the trained length | DCA | plain RoPE, YaRN | passkey at 8x and 16x, keys at every depth |
| `lr: auto` from the scaling fit is near the best rate | the fit's rate | 3x higher, 3x lower | phase 1's final loss |
| SFT teaches the tasks; rejection-sampled SFT adds to it | SFT; rs_sft | pre-trained; SFT | arithmetic, tool calls |
| online merging removes DPO's alignment tax | OnDARE | plain AdamW | arithmetic, held-out text |
| GRPO raises accuracy, high-variance queries first | GRPO by variance | uniform order; no GRPO | arithmetic |
| the reward model ranks pairs it never saw | the reward model | chance | held-out pair accuracy |

Every pre-training arm trains with seeds 0..S-1 (model init and data order); the post-training chain starts
from the recipe's pre-trained model with seeds 0..S-1 (data order, sampling, reward-model head); the data variants keep phase 1's token budget
(same steps and rows), so only what the documents are changes. Seed 0's "with" arms are the main recipe run's
own checkpoints. The run lives in OUT/ablations/ (resumable stage by stage, like the recipe) and writes
OUT/ablations.md: per cell the mean, the standard deviation and every seed's value, and per claim whether the
difference is shown: every seed of the claimed-better arm beats every seed of the other (with 3 seeds a chance
ordering does that one time in 20).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..evals.harness import ModelLM, run_task
from ..model import load_model
from ..tasks.task import make_task
from ..tokenizer import Tokenizer
from ..train.sweep import final_loss
from ..utils import read_jsonl
from .evaluate import evaluate_stage, passkey_scores
from .loss_law import run_loss_law
from .runner import RecipeRun
from .tiny import (
    _with_tokenizer,
    held_out_sets,
    passkey_variants,
    phase1_lr,
    post_training,
    pretraining_phases,
    recipe_config,
    run_data_pipeline,
    run_dpo,
    run_grpo,
    run_recipe,
    train_phases,
    write_model_dir,
)

FAR_DEPTHS = (0.0, 0.25, 0.5, 0.75)  # at 8x and 16x these keys sit far outside DCA's local window
_LAW_MODELS = [dict(hidden_size=32, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1),
               dict(hidden_size=64, intermediate_size=192)]
# The ablations' own settings (kept apart from the recipe's config: changing them never invalidates a finished
# recipe run): 8x and 16x with 4 keys per depth (20 prompts per cell), and the loss law on budgets 3x the demo's.
SETTINGS = {
    "full": dict(long_multiples=[8, 16], long_trials=4,
                 loss_law=dict(models=_LAW_MODELS, tokens=[150_000, 300_000, 600_000],
                               fractions=[0.0, 0.25, 0.5, 0.75], batch_size=8)),
    "fast": dict(long_multiples=[8], long_trials=1,
                 loss_law=dict(models=_LAW_MODELS, tokens=[2_048, 4_096, 8_192], fractions=[0.0, 0.5], batch_size=4)),
}


def heldout_by_domain(model_dir: Path, heldout: list[dict], docs: list[dict], min_docs: int = 3) -> dict:
    """Held-out bits per byte of a checkpoint on the recipe's held-out set (as its evaluations report it), and on
    the held-out documents of each mixture domain with min_docs or more."""

    lm = ModelLM(load_model(model_dir, dtype="fp32"), Tokenizer.from_dir(model_dir), batch_size=16)

    def bpb(group):
        task = make_task({"name": "heldout", "kind": "perplexity"}, examples=[{"text": d["text"]} for d in group])
        return run_task(task, lm, progress=False).metrics["bits_per_byte"]

    out = {"heldout_bits_per_byte": bpb(heldout)}
    for domain in sorted({d["domain"] for d in docs}):
        group = [d for d in docs if d["domain"] == domain]
        if len(group) >= min_docs:
            out[f"heldout_bpb_{domain}"] = bpb(group)
    return out


def passkey_grid(model_dir: Path, cfg: dict, multiples: list[int], variants: dict, out: Path,
                 trials: int | None = None) -> dict:
    """Passkey accuracy per multiple and variant (recipes/evaluate.py), and over the far depths only."""

    metrics = passkey_scores(load_model(model_dir, dtype="fp32"), Tokenizer.from_dir(model_dir), cfg["phase1_len"],
                             multiples, variants, out, trials or cfg["passkey"]["trials"])
    for name in variants:
        rows = read_jsonl(out / f"passkey_{name}.jsonl")
        for m in multiples:
            n = cfg["phase1_len"] * m
            far = [r["correct"] for r in rows if r["length"] <= n and r["length"] > n // 2 and r["depth"] in FAR_DEPTHS]
            metrics[f"passkey_{m}x_{name}_far"] = sum(far) / max(1, len(far))
    return metrics


def final_train_loss(run_dir: Path) -> float:
    """Mean training loss over the last fifth of a run's steps (the scaling sweep's score)."""

    return final_loss(run_dir)


def run_ablations(out: str | Path, fast: bool = False, moe: bool = False, seeds: int = 3,
                  sets: dict | None = None, parts: tuple[str, ...] = ("post", "pretrain")) -> Path:
    """The recipe (resumed or run first), then every ablation arm of `parts` (post-training first: it is the
    shorter) for `seeds` seeds; returns OUT/ablations.md."""

    out = Path(out)
    run_recipe(out, fast=fast, moe=moe, sets=sets)
    cfg = recipe_config(fast, moe, sets)
    main = RecipeRun(out, cfg, log=lambda *_: None)
    corpus, tok = out / "stages" / "corpus", out / "stages" / "tokenizer"
    data = {k: Path(v) for k, v in main.record("data").outputs.items()}
    pre = main.record("pretrain")
    fit = Path(main.record("scaling").outputs["fit"])
    model_dir = write_model_dir(cfg, tok, out / "model")
    lr = phase1_lr(cfg, model_dir, data, fit)
    settings = SETTINGS["fast" if fast else "full"]
    abl = RecipeRun(out / "ablations", {"recipe": cfg, "seeds": seeds, "settings": settings})
    if "post" in parts:
        run_post_ablations(out, cfg, abl, seeds)
    if "pretrain" not in parts:
        return write_ablations_report(out, fast, moe, seeds, sets, parts)
    heldout, domains = read_jsonl(corpus / "heldout.jsonl"), read_jsonl(corpus / "heldout_domains.jsonl")
    variants = passkey_variants(cfg)
    data_variants = {"no_quality_dedup": ("quality", "minhash"), "no_mixture": ("mixture",)}
    shards = {"base": data}
    for name, skip in data_variants.items():
        rec = abl.stage(f"data_{name}", lambda d, skip=skip: run_data_pipeline(cfg, corpus, tok, d, skip, True))
        shards[name] = {k: Path(v) for k, v in rec.outputs.items()}
    phase1 = {"base": ("base", 1.0), "no_quality_dedup": ("no_quality_dedup", 1.0),
              "no_mixture": ("no_mixture", 1.0), "lr_x3": ("base", 3.0), "lr_div3": ("base", 1 / 3)}
    assert tuple(phase1) == PHASE1_ARMS
    # Every seed's base phase 1 and phase-2 arms first (the retrieval claims take the longest to tell apart), then
    # the other phase-1 arms: a run stopped early has whole claims, not a bit of each (stage names are the same).
    base_finals = {}

    def phase1_arm(seed: int, arm: str) -> Path:
        data_name, lr_scale = phase1[arm]
        if seed == cfg["seed"] and arm == "base":  # the main run is this seed's "with" arm
            final = Path(pre.outputs["phase1"])
        else:
            stage = f"s{seed}_phase1_{arm}"
            phases = pretraining_phases(cfg, shards[data_name], lr * lr_scale, names=("phase1",))
            abl.stage(stage, lambda d: train_phases(cfg, model_dir, phases, d, seed, progress=False) or {})
            final = _with_tokenizer(out / "ablations" / "stages" / stage / "phase1" / "final", tok)
        abl.stage(f"s{seed}_eval_phase1_{arm}", lambda d: {"metrics": {
            **heldout_by_domain(final, heldout, domains), "final_train_loss": final_train_loss(final.parent)}})
        return final

    for seed in range(seeds):
        base_finals[seed] = phase1_arm(seed, "base")
        for arm, abf in (("abf", True), ("no_abf", False)):
            if seed == cfg["seed"] and abf:
                final = Path(pre.outputs["final"])
            else:
                stage = f"s{seed}_phase2_{arm}"
                phases = pretraining_phases(cfg, data, lr, abf=abf, names=("phase2a", "phase2"))
                abl.stage(stage, lambda d, phases=phases: train_phases(cfg, model_dir, phases, d, seed,
                                                                        init=base_finals[seed], progress=False) or {})
                final = _with_tokenizer(out / "ablations" / "stages" / stage / phases[-1]["name"] / "final", tok)
            multiples = cfg["passkey"]["multiples"][:2]
            grid = variants if abf else {"rope": None}
            abl.stage(f"s{seed}_eval_phase2_{arm}", lambda d, m=final, g=grid, abf=abf: {"metrics": {
                **passkey_grid(m, cfg, multiples, {"rope": None}, d),
                **(passkey_grid(m, cfg, settings["long_multiples"], g, d / "long",
                                settings["long_trials"]) if abf else {})}})
    for seed in range(seeds):
        for arm in phase1:
            if arm != "base":
                phase1_arm(seed, arm)
    # the loss law on a larger grid than the demo's (more tokens per run, three model sizes)

    abl.stage("loss_law", lambda d: run_loss_law(cfg, model_dir, Path(main.record("data").outputs["stats"]).parent,
                                                  tok, corpus / "heldout.jsonl", fit, d, settings["loss_law"]))
    return write_ablations_report(out, fast, moe, seeds, sets)


PHASE1_ARMS = ("base", "no_quality_dedup", "no_mixture", "lr_x3", "lr_div3")
PHASE2_ARMS = ("abf", "no_abf")
POST_ARMS = ("pretrained", "sft", "rs_sft", "dpo_merge", "dpo_plain", "grpo_priority", "grpo_uniform", "rm")


def run_post_ablations(out: Path, cfg: dict, abl: RecipeRun, seeds: int) -> None:
    """The post-training chain once per seed (the recipe's own stages for its seed), plus the arms without the
    report's choices: DPO with plain AdamW instead of online merging, GRPO with queries in uniform order instead
    of by reward variance. Every arm's model gets the recipe's chat evaluation (s{seed}_eval_post_{arm})."""
    main = RecipeRun(out, cfg, log=lambda *_: None)
    corpus, tok = out / "stages" / "corpus", out / "stages" / "tokenizer"
    pretrained = Path(main.record("pretrain").outputs["final"])
    held = held_out_sets(corpus)
    for seed in range(seeds):
        c = dict(cfg, seed=seed)
        reuse = seed == cfg["seed"]

        def stage(name, fn, seed=seed, reuse=reuse):  # the recipe's own stage for its seed, else this seed's
            return main.record(name) if reuse and main.done(name) else abl.stage(f"s{seed}_{name}", fn)

        post = post_training(c, stage, lambda *_: None, pretrained, corpus, tok)
        final = {name: Path(post[name].outputs["final"]) for name in ("sft", "rs_sft", "dpo", "grpo")}
        pairs = Path(post["rejection"].outputs["pairs"])
        plain = abl.stage(f"s{seed}_dpo_plain", lambda d: run_dpo(c, final["rs_sft"], pretrained, pairs, d, merge=False))
        uniform = abl.stage(f"s{seed}_grpo_uniform", lambda d: run_grpo(
            dict(c, grpo=dict(c["grpo"], prioritise=False)), final["dpo"], corpus, d, post["rm"].outputs.get("final")))
        models = {"pretrained": pretrained, "sft": final["sft"], "rs_sft": final["rs_sft"], "dpo_merge": final["dpo"],
                  "dpo_plain": Path(plain.outputs["final"]), "grpo_priority": final["grpo"],
                  "grpo_uniform": Path(uniform.outputs["final"])}
        for arm, model in models.items():
            abl.stage(f"s{seed}_eval_post_{arm}", lambda d, m=model: {"metrics": evaluate_stage(m, held, d)})
        rm = post["rm"].metrics
        abl.stage(f"s{seed}_eval_post_rm", lambda d: {"metrics": {
            **{k: rm[k] for k in ("rm_heldout_acc", "rm_step_acc") if k in rm}, "chance": 0.5}})


def collect_results(abl_dir: Path, seeds: int) -> tuple[dict[str, dict[str, list[float]]], int]:
    """{arm: {metric: [value per finished seed]}} from the finished evaluation stages, and how many of the
    seeds x arms evaluations have finished."""
    results: dict[str, dict[str, list[float]]] = {}
    finished = 0
    for seed in range(seeds):
        for kind, arms in (("phase1", PHASE1_ARMS), ("phase2", PHASE2_ARMS), ("post", POST_ARMS)):
            for arm in arms:
                marker = abl_dir / "stages" / f"s{seed}_eval_{kind}_{arm}" / "done.json"
                if not marker.is_file():
                    continue
                finished += 1
                for key, value in json.loads(marker.read_text())["metrics"].items():
                    results.setdefault(arm, {}).setdefault(key, []).append(value)
    return results, finished


def write_ablations_report(out: str | Path, fast: bool = False, moe: bool = False, seeds: int = 3,
                           sets: dict | None = None, parts: tuple[str, ...] = ("post", "pretrain")) -> Path:
    """OUT/ablations.md and OUT/ablations/results.json from every finished stage under OUT/ablations/: at the end
    of `--ablations`, or of a run still in progress (`--ablations-report`; the file then says it is partial)."""

    out = Path(out)
    cfg, settings = recipe_config(fast, moe, sets), SETTINGS["fast" if fast else "full"]
    abl_dir = out / "ablations"
    if not (abl_dir / "recipe.json").is_file():
        raise FileNotFoundError(f"{abl_dir}: no ablation run here; start one with --ablations")
    results, finished = collect_results(abl_dir, seeds)
    law_marker = abl_dir / "stages" / "loss_law" / "done.json"
    law = json.loads(law_marker.read_text())["metrics"] if law_marker.is_file() else None
    seconds = sum(json.loads(p.read_text()).get("seconds", 0) for p in (abl_dir / "stages").glob("*/done.json"))
    total = seeds * (len(PHASE1_ARMS) + len(PHASE2_ARMS) + len(POST_ARMS))
    summary = summarize(results, cfg, settings)
    (abl_dir / "results.json").write_text(json.dumps({"results": results, "summary": summary, "loss_law": law,
                                                      "finished": finished, "of": total, "seconds": seconds},
                                                     indent=1))
    changes = "".join(f" --set {k}={json.dumps(v)}" for k, v in (sets or {}).items())
    part = f" {parts[0]}" if len(parts) == 1 else ""
    command = f"qwen25 recipe tiny --ablations{part} --seeds {seeds}{' --fast' * fast}{' --moe' * moe}{changes} --out {out}"
    text = ablations_markdown(summary, results, command, seeds, law)
    progress = (f"**Partial**: {finished} of {total} arm x seed evaluations have finished"
                f"{'' if law else ', the larger loss law not yet'}; rerun the command to go on.\n\n"
                if finished < total or law is None else "")
    head, _, rest = text.partition("\n\n")
    path = out / "ablations.md"
    path.write_text(f"{head}\n\n{progress}Time in the ablation stages so far: {seconds / 60:.0f} min.\n\n{rest}")
    return path


def claims(cfg: dict, settings: dict) -> list[dict]:
    """The claims the ablation table tests: (arm, metric) with and without, and which way is better."""
    long = settings["long_multiples"]
    out = [
        {"claim": "quality filter + dedup", "metric": "heldout_bits_per_byte", "with": "base", "without": "no_quality_dedup",
         "better": "lower"},
        {"claim": "`lr: auto` vs 3x higher", "metric": "final_train_loss", "with": "base", "without": "lr_x3", "better": "lower"},
        {"claim": "`lr: auto` vs 3x lower", "metric": "final_train_loss", "with": "base", "without": "lr_div3", "better": "lower"},
        {"claim": "ABF in phase 2", "metric": f"passkey_{cfg['passkey']['multiples'][1]}x_rope", "with": "abf",
         "without": "no_abf", "better": "higher"},
    ]
    for domain in ("technology", "code", "general"):
        out.insert(1, {"claim": f"domain mixture ({domain})", "metric": f"heldout_bpb_{domain}", "with": "base",
                       "without": "no_mixture", "better": "lower"})
    post = [("SFT vs the pre-trained model", "arith_acc", "sft", "pretrained"),
            ("SFT: tool calls exactly right", "tool_call_correct", "sft", "pretrained"),
            ("rejection-sampled SFT vs plain SFT", "arith_acc", "rs_sft", "sft"),
            ("DPO + online merging vs plain DPO", "arith_acc", "dpo_merge", "dpo_plain"),
            ("DPO + online merging vs plain DPO: held-out text (tax)", "heldout_bits_per_byte", "dpo_merge",
             "dpo_plain"),
            ("DPO + online merging vs no DPO", "arith_acc", "dpo_merge", "rs_sft"),
            ("GRPO, high-variance queries first, vs uniform order", "arith_acc", "grpo_priority", "grpo_uniform"),
            ("GRPO vs no GRPO", "arith_acc", "grpo_priority", "dpo_merge")]
    for claim, metric, with_arm, without in post:
        out.append({"claim": claim, "metric": metric, "with": with_arm, "without": without,
                    "better": "lower" if "bits" in metric else "higher"})
    for metric in ("rm_heldout_acc", "rm_step_acc"):
        out.append({"claim": f"reward model vs chance ({metric})", "metric": (metric, "chance"), "with": "rm",
                    "without": "rm", "better": "higher"})
    for m in long:
        for other in ("rope", "yarn"):
            out.append({"claim": f"DCA vs {other} at {m}x, far keys", "metric": (f"passkey_{m}x_dca_far", f"passkey_{m}x_{other}_far"),
                        "with": "abf", "without": "abf", "better": "higher"})
    return out


def summarize(results: dict, cfg: dict, settings: dict) -> list[dict]:
    """One row per claim: each arm's values, mean and sd, the difference and whether the seeds show it."""
    rows = []
    for c in claims(cfg, settings):
        key_with, key_without = c["metric"] if isinstance(c["metric"], tuple) else (c["metric"], c["metric"])
        a = results.get(c["with"], {}).get(key_with, [])
        b = results.get(c["without"], {}).get(key_without, [])
        if not a or not b:
            continue
        sign = -1 if c["better"] == "lower" else 1
        shown = len(a) >= 2 and len(b) >= 2 and min(sign * x for x in a) > max(sign * y for y in b)
        rows.append({**c, "metric": key_with if key_with == key_without else f"{key_with} vs {key_without}",
                     "with_values": a, "without_values": b, "with_mean": statistics.fmean(a),
                     "without_mean": statistics.fmean(b), "with_sd": statistics.pstdev(a) if len(a) > 1 else 0.0,
                     "without_sd": statistics.pstdev(b) if len(b) > 1 else 0.0,
                     "difference": statistics.fmean(a) - statistics.fmean(b), "shown": shown})
    return rows


def _cell(values: list[float], mean: float, sd: float) -> str:
    return f"{mean:.3f} ± {sd:.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def _shown(row: dict) -> str:
    if min(len(row["with_values"]), len(row["without_values"])) < 2:
        return "n/a (1 seed)"
    return "**yes**" if row["shown"] else "no"


def ablations_markdown(summary: list[dict], results: dict, command: str, seeds: int, law: dict | None = None) -> str:
    """ablations.md: the claims table, the loss law on the larger grid, and every arm's metrics."""
    lines = ["# Ablations of the recipe's pre- and post-training claims", "",
             f"Command: `{command}`; {seeds} seeds per arm (model init and data order). A cell is mean ± standard "
             "deviation (every seed's value). **Shown** means every seed of the claimed-better arm beats every seed "
             "of the other; otherwise the difference is within the seed spread and the claim is not shown here.", "",
             "| claim | metric | with | without | difference | shown |", "|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['claim']} | {r['metric']} | {_cell(r['with_values'], r['with_mean'], r['with_sd'])} | "
                     f"{_cell(r['without_values'], r['without_mean'], r['without_sd'])} | {r['difference']:+.3f} | "
                     f"{_shown(r)} |")
    if law:
        lines += ["", "## The loss law on a larger grid", "",
                  "Held-out loss of every run of the quality sweep (`ablations/stages/loss_law/`, plot `loss_law.png`) "
                  "fitted with D = tokens trained and with D_eff = quality x tokens (nats):", "",
                  "| fit | rmse | leave-one-out rmse | largest budget predicted from the smaller |", "|---|---|---|---|"]
        for key in ("D", "D_eff"):
            lines.append(f"| L(N, {key}) | {law.get(f'law_{key}_rmse', float('nan')):.4f} | "
                         f"{law.get(f'law_{key}_loo_rmse', float('nan')):.4f} | "
                         f"{law.get(f'law_{key}_extrapolation_rmse', float('nan')):.4f} |")
    lines += ["", "## Every arm's metrics (mean over seeds)", "", "| arm | metric | mean | values |", "|---|---|---|---|"]
    for arm, metrics in results.items():
        for key, values in metrics.items():
            lines.append(f"| {arm} | {key} | {statistics.fmean(values):.4f} | {', '.join(f'{v:.4f}' for v in values)} |")
    return "\n".join(lines) + "\n"
