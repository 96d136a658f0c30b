"""`qwen25 recipe tiny --fast` end to end: the report's structure, and each stage doing what it should."""

import gzip
import json
import math
from pathlib import Path

import pytest

from qwen25.recipes.tiny import recipe_config, run_recipe
from qwen25.utils import read_jsonl


def _dropped(run: Path, step: str) -> list[str]:
    folder = next((run / "stages/data/pipeline/dropped").glob(f"*_{step}"))
    return [json.loads(line)["id"] for f in folder.glob("*.jsonl.gz") for line in gzip.open(f, "rt")]


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("recipe") / "run"
    report = run_recipe(run, fast=True)
    return run, report


def _metrics(run: Path, stage: str) -> dict:
    return json.loads((run / "stages" / stage / "done.json").read_text())["metrics"]


def test_report_has_every_section_and_plot(fast_run):
    run, report = fast_run
    text = report.read_text()
    for heading in ("## Evaluation after each stage", "## Stage metrics", "## Curves", "## Plots", "## Time per stage"):
        assert heading in text
    for stage in ("eval_phase1", "eval_phase2a", "eval_pretrain", "eval_sft", "eval_dpo", "eval_grpo"):
        assert stage in text.split("## Stage metrics")[0]
    for png in ("curves.png", "stages/data/pipeline/stats.png", "stages/scaling/fit.png",
                "stages/eval_pretrain/passkey_dca.png"):
        assert (run / png).stat().st_size > 1000, png
        assert png in text
    assert "| total |" in text
    assert "Model: dense" in text
    # the report card: a smoke-run warning on --fast, the summary, MFU and the machine, three samples
    assert "A smoke run (`--fast`)" in text.split("## Summary")[0] and "Pre-training loss still falls" in text
    summary = text.split("## Summary")[1].split("## ")[0]
    for row in ("| data |", "| loss law |", "| pre-training phase 1 |", "| pre-training (ABF) |", "| long context |",
                "| SFT |", "| reward model |", "| DPO (online merging) |", "| GRPO |", "| serve |"):
        assert row in summary, row
    assert "median MFU" in text and "Machine:" in text
    assert text.count("```") == 6 and "## Samples after pre-training" in text
    assert "stages/loss_law/loss_law.png" in text
    # every passkey prompt's result is kept beside the heat map, and the metric is their accuracy
    rows = read_jsonl(run / "stages/eval_pretrain/passkey_dca.jsonl")
    base = min(r["length"] for r in rows)
    at_1x = [r["correct"] for r in rows if r["length"] == base]
    assert {"length", "depth", "passkey", "output", "correct"} <= set(rows[0])
    assert _metrics(run, "eval_pretrain")["passkey_1x_dca"] == sum(at_1x) / len(at_1x)


def test_moe_variant_runs_every_stage(tmp_path):
    """`--moe --fast`: the same stages on routed + shared experts; pre-training learns, the final model serves."""
    report = run_recipe(tmp_path / "moe", fast=True, moe=True)
    assert "Model: MoE (8 routed experts" in report.read_text()
    cfg = json.loads((tmp_path / "moe/stages/grpo/final/config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["num_experts"] == 8
    pre = _metrics(tmp_path / "moe", "pretrain")
    assert pre["phase1_loss_last"] < pre["phase1_loss_first"]
    assert _metrics(tmp_path / "moe", "serve")["serve_ok"] == 1


def test_data_stages_remove_what_was_planted(fast_run):
    run, _ = fast_run
    cfg = recipe_config(fast=True)
    assert sorted(_dropped(run, "quality")) == sorted(f"spam/{i}" for i in range(cfg["spam_docs"]))
    assert len(_dropped(run, "minhash")) >= cfg["duplicates"]
    leaks = [i for i in _dropped(run, "decontaminate") if i.startswith("leak/")]
    assert sorted(leaks) == sorted(f"leak/{i}" for i in range(cfg["leaks"]))
    assert _metrics(run, "data")["tokens_phase2"] > _metrics(run, "data")["tokens_phase1"]
    # phase 2a's set: passkey documents trained on their answers only (prompts masked out), plus replay
    from qwen25.data.shards import TokenShards

    retrieval = TokenShards(run / "stages/data/shards_retrieval")
    masks = retrieval.loss_masks(range(len(retrieval)))
    assert retrieval.has_loss_mask and 0 < int(masks.sum()) < retrieval.num_tokens


def test_each_training_stage_moves_its_metric(fast_run):
    run, _ = fast_run
    tok = _metrics(run, "tokenizer")
    chance_bpb = math.log2(tok["vocab"]) / tok["bytes_per_token"]  # a uniform guess over the vocabulary
    assert _metrics(run, "eval_phase1")["heldout_bits_per_byte"] < chance_bpb
    pre = _metrics(run, "pretrain")
    assert pre["phase1_loss_last"] < pre["phase1_loss_first"]
    assert 0 < pre["lr_from_fit"] < 1
    sft = _metrics(run, "sft")
    assert sft["sft_loss_last"] < sft["sft_loss_first"]
    rs = _metrics(run, "rejection")
    assert rs["dpo_pairs"] + rs["reference_pairs"] > 0
    rm = _metrics(run, "rm")
    assert rm["rm_loss_last"] < rm["rm_loss_first"]
    assert rm["rm_train_pairs"] >= recipe_config(fast=True)["rm"]["synthetic"] and 0 <= rm["rm_step_acc"] <= 1
    assert _metrics(run, "dpo")["dpo_margins_last"] > 0
    grpo = _metrics(run, "grpo")
    # the reward model's score (beside the math check) spreads the rewards of a group: there is a learning signal
    assert 0 <= grpo["grpo_frac_zero_std"] < 1 and "grpo_reward_second_half" in grpo
    assert _metrics(run, "serve")["serve_ok"] == 1
    cfg = json.loads((run / "stages/pretrain/phase2/final/config.json").read_text())
    assert cfg["rope_theta"] == 1_000_000 and cfg["max_position_embeddings"] >= recipe_config(fast=True)["phase2_len"]
    cfg2a = json.loads((run / "stages/pretrain/phase2a/final/config.json").read_text())
    assert cfg2a["rope_theta"] == 1_000_000 and cfg2a["max_position_embeddings"] >= recipe_config(fast=True)["phase1_len"]


def test_rerun_skips_every_finished_stage(fast_run):
    run, report = fast_run
    before = report.read_text()
    log = []
    import qwen25.recipes.runner as runner

    original = runner.RecipeRun.__init__

    def quiet(self, *a, **k):
        original(self, *a, **{**k, "log": log.append})

    runner.RecipeRun.__init__ = quiet
    try:
        again = run_recipe(run, fast=True)
    finally:
        runner.RecipeRun.__init__ = original
    assert log and all("skipped" in line for line in log)
    assert again.read_text().split("## Time per stage")[0] == before.split("## Time per stage")[0]


def test_passkey_prompts_leave_room_for_the_answer(fast_run):
    """At k x the phase-1 context, prompt + the longest answer fit in k x context (the answer's positions trained)."""
    from qwen25.tasks.passkey import FILLER, MAX_PASSKEY, passkey_sample
    from qwen25.recipes.evaluate import ANSWER_ROOM
    from qwen25.tokenizer import Tokenizer

    run, _ = fast_run
    tok = Tokenizer.from_dir(run / "stages/tokenizer")
    longest_answer = max(len(tok.encode(f" {key}.")) for key in (1, 10_000, 49_999, MAX_PASSKEY))
    assert longest_answer <= ANSWER_ROOM
    per_filler = len(tok.encode(" " + FILLER))
    cfg = recipe_config(fast=True)
    for k in cfg["passkey"]["multiples"]:
        for depth in (0.0, 0.5, 1.0):
            prompt = passkey_sample(tok, k * cfg["phase1_len"] - ANSWER_ROOM, depth, MAX_PASSKEY).ids
            assert k * cfg["phase1_len"] - ANSWER_ROOM - per_filler < len(prompt)  # filled to within one filler
            assert len(prompt) + longest_answer <= k * cfg["phase1_len"]


def test_loss_law_stage_fits_both_laws(fast_run):
    """The recipe's quality sweep: corpora with more spam have a lower recorded quality, every run has a held-out
    loss, and both fits (D and D_eff) come with their held-out errors."""
    run, _ = fast_run
    law = json.loads((run / "stages/loss_law/loss_law.json").read_text())
    cfg = recipe_config(fast=True)["loss_law"]
    assert len(law["points"]) == len(cfg["models"]) * len(cfg["tokens"]) * len(cfg["fractions"])
    quality = {p["name"].rsplit("_", 1)[1]: p["quality"] for p in law["points"]}
    assert quality["spam00"] > quality["spam50"] > 0
    metrics = _metrics(run, "loss_law")
    for key in ("law_D_loo_rmse", "law_D_eff_loo_rmse"):
        assert math.isfinite(metrics[key])


def test_ablations_run_every_arm_and_write_the_table(fast_run):
    """`--ablations` at the fast size with 2 seeds: every arm trains per seed, seed 0 reuses the recipe's own
    checkpoints, ablations.md holds the claims table, a rerun redoes nothing and the report cites the seeds."""
    from qwen25.recipes.ablations import run_ablations

    run, _ = fast_run
    path = run_ablations(run, fast=True, seeds=2)
    results = json.loads((run / "ablations/results.json").read_text())["results"]
    assert set(results) == {"base", "no_quality_dedup", "no_mixture", "lr_x3", "lr_div3", "abf", "no_abf",
                            "pretrained", "sft", "rs_sft", "dpo_merge", "dpo_plain", "grpo_priority", "grpo_uniform",
                            "rm"}
    # every arm has a value per seed; the reward model's held-out accuracy only where that seed's rejection sampling
    # left sampled pairs to hold out (the fast models rarely solve a problem)
    held = [json.loads(p.read_text())["metrics"]["rm_heldout_pairs"]
            for p in (run / "stages/rm/done.json", run / "ablations/stages/s1_rm/done.json")]
    counts = {(a, k): len(v) for a, arm in results.items() for k, v in arm.items()}
    assert counts == {key: sum(n > 0 for n in held) if key == ("rm", "rm_heldout_acc") else 2 for key in counts}
    # post-training: seed 0 is the recipe's own chain, seed 1 a chain of its own from the same pre-trained model
    assert results["sft"]["arith_acc"][0] == _metrics(run, "eval_sft")["arith_acc"]
    assert results["rm"]["rm_step_acc"][0] == _metrics(run, "rm")["rm_step_acc"]
    assert (run / "ablations/stages/s1_sft/final").is_dir() and not (run / "ablations/stages/s0_sft").exists()
    plain = json.loads((run / "ablations/stages/s0_dpo_plain/stage_config.json").read_text())
    uniform = json.loads((run / "ablations/stages/s1_grpo_uniform/stage_config.json").read_text())
    assert plain["merge"] == "none" and uniform["prioritise"] is False
    assert results["base"]["heldout_bits_per_byte"][0] == pytest.approx(
        _metrics(run, "eval_phase1")["heldout_bits_per_byte"])  # seed 0 is the recipe's phase 1
    assert results["base"]["heldout_bits_per_byte"][1] != results["base"]["heldout_bits_per_byte"][0]
    # without the quality filter the spam stays in phase 1's data
    no_filter = json.loads((run / "ablations/stages/data_no_quality_dedup/done.json").read_text())["metrics"]
    assert no_filter["tokens_phase1"] > _metrics(run, "data")["tokens_phase1"]
    cfg = json.loads((run / "ablations/stages/s1_phase2_no_abf/phase2/final/config.json").read_text())
    assert cfg["rope_theta"] == 10_000
    text = path.read_text()
    for claim in ("quality filter + dedup", "ABF in phase 2", "`lr: auto` vs 3x higher", "DCA vs rope at 8x",
                  "## The loss law on a larger grid", "DPO + online merging vs plain DPO", "GRPO, high-variance",
                  "reward model vs chance"):
        assert claim in text, claim
    assert "Partial" not in text
    # a run still in progress: --ablations-report writes what has finished, and says so
    from qwen25.recipes.ablations import write_ablations_report

    marker = run / "ablations/stages/s1_eval_phase2_no_abf/done.json"
    marker.rename(marker.with_suffix(".hidden"))
    partial = write_ablations_report(run, fast=True, seeds=2).read_text()
    marker.with_suffix(".hidden").rename(marker)
    assert "**Partial**: 29 of 30 arm x seed evaluations" in partial
    assert "| ABF in phase 2 |" in partial and "n/a (1 seed)" in partial.split("| ABF in phase 2 |")[1].split("\n")[0]
    stamp = (run / "ablations/stages/s1_phase1_base/done.json").stat().st_mtime
    run_ablations(run, fast=True, seeds=2)
    assert (run / "ablations/stages/s1_phase1_base/done.json").stat().st_mtime == stamp
    report = run_recipe(run, fast=True).read_text()
    assert "over 2 seeds" in report.split("## Summary")[1].split("## ")[0]


def test_rejection_sampled_answers_reach_the_second_sft_round(fast_run, tmp_path):
    """rs_sft trains on rejection's verified answers (sft.jsonl): every row is an example, and the weights move.
    (The --fast SFT model rarely solves a question, so the file is written here as rejection writes it.)"""
    from safetensors.torch import load_file

    from qwen25.recipes.synthetic import problem_messages
    from qwen25.recipes.tiny import run_rs_sft
    from qwen25.utils import write_jsonl

    run, _ = fast_run
    assert (run / "stages/rejection/sft.jsonl").is_file() and (run / "stages/rejection/rewards.jsonl").is_file()
    sft = run / "stages/sft/final"
    queries = read_jsonl(run / "stages/corpus/arith_rl.jsonl")[:12]
    rows = [{"messages": problem_messages(p), "reward": 1.0} for p in queries]
    write_jsonl(tmp_path / "sft.jsonl", rows)
    (tmp_path / "out").mkdir()
    cfg = recipe_config(fast=True)
    cfg["rs_sft"]["seq_len"] = 128  # one example per packed row: 3 steps of 4 rows, past warmup's lr 0 at step 1
    result = run_rs_sft(cfg, sft, tmp_path / "sft.jsonl", tmp_path / "out")
    assert result["metrics"]["rs_sft_examples"] == 12
    before, after = load_file(sft / "model.safetensors"), load_file(tmp_path / "out/final/model.safetensors")
    assert any(not (before[k] == after[k]).all() for k in before)
