import json

import pytest

from qwen25.recipes.corpus import docstrings, stdlib_documents, stdlib_files
from qwen25.recipes.runner import RecipeError, RecipeRun, metrics_table
from qwen25.recipes.synthetic import (
    arithmetic_problems, passkey_documents, problem_document, tool_conversations,
)
from qwen25.tokenizer.tool_calls import parse_tool_calls
from qwen25.verifiers.math import extract_answer


def test_arithmetic_problems_are_correct_distinct_and_held_out():
    test = arithmetic_problems(50, seed=1)
    train = arithmetic_problems(200, seed=2, exclude={p["question"] for p in test})
    assert not {p["question"] for p in test} & {p["question"] for p in train}
    assert len({p["question"] for p in train}) == 200
    for p in train + test:
        a, op, b = p["solution"].split(" = ")[0].split()
        assert eval(f"{a} {op} {b}") == int(p["answer"]) >= 0  # noqa: S307 (our own digits)
        assert extract_answer(p["solution"]) == p["answer"]
        assert p["question"] in problem_document(p)
    assert arithmetic_problems(20, seed=3) == arithmetic_problems(20, seed=3)


def test_tool_conversations_render_and_parse_back():
    from qwen25.tokenizer.chat import render_chat

    for conv in tool_conversations(20, seed=0):
        text = render_chat(conv["messages"], tools=conv["tools"])
        call_turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
        parsed = parse_tool_calls(call_turn)
        assert [(c.name, c.arguments) for c in parsed.tool_calls] == [(conv["call"]["name"], conv["call"]["arguments"])]


def test_passkey_documents_end_with_their_key():
    for doc in passkey_documents(10, seed=0, max_fillers=5):
        key = doc.rsplit(" ", 1)[1].rstrip(".")
        assert f"The pass key is {key}." in doc


def test_spread_passkey_documents_cover_every_length_log_uniformly():
    """Phase 2's passkey documents: lengths from ~80 tokens to the phase-2 context, as many in each factor of 2."""
    import math

    from qwen25.recipes.tiny import passkey_fillers, spread_passkey_documents

    docs = spread_passkey_documents(2000, seed=0, max_len=1024)
    assert spread_passkey_documents(5, seed=1, max_len=1024) == spread_passkey_documents(5, seed=1, max_len=1024)
    fillers = [doc.count("The grass is green.") for doc in docs]  # the passkey text's filler sentence
    assert min(fillers) == 1 and max(fillers) <= passkey_fillers(1024)
    # log-uniform over 80..1,024 tokens: about log(2)/log(12.8) = 27% of the documents in each factor of 2 above
    # 128 tokens (lengths are ~80 + 24 per filler, so bins are counted in fillers)
    lengths = [80 + 24 * f for f in fillers]
    for low in (128, 256, 512):
        share = sum(low <= n < 2 * low for n in lengths) / len(docs)
        assert abs(share - math.log(2) / math.log(1024 / 80)) < 0.06, (low, share)


def test_stdlib_corpus_has_code_and_docs():
    assert len(stdlib_files()) > 100
    rows = list(stdlib_documents(max_bytes=300_000))
    sources = {r["metadata"]["source"] for r in rows}
    assert sources == {"stdlib-code", "stdlib-docs"}
    assert 300_000 <= sum(len(r["text"].encode()) for r in rows) < 300_000 + max(len(r["text"].encode()) for r in rows)
    assert docstrings('"""M."""\nclass A:\n    """A doc."""\n    def f(self):\n        """F doc."""\n') == [
        ("", "M."), ("A", "A doc."), ("A.f", "F doc.")]


def test_recipe_run_skips_finished_stages_and_refuses_another_config(tmp_path):
    calls = []

    def stage(d):
        calls.append(d.name)
        (d / "out.txt").write_text("x")
        return {"metrics": {"loss": 1.5}, "outputs": {"file": d / "out.txt"}}

    run = RecipeRun(tmp_path, {"seed": 0}, log=lambda *_: None)
    run.stage("a", stage)
    with pytest.raises(RecipeError, match="stage 'b' failed: ValueError: boom"):
        run.stage("b", lambda d: (_ for _ in ()).throw(ValueError("boom")))
    again = RecipeRun(tmp_path, {"seed": 0}, log=lambda *_: None)
    record = again.stage("a", stage)
    assert calls == ["a"] and record.metrics == {"loss": 1.5}
    assert not again.done("b")
    assert "| loss | 1.5 |" in metrics_table([record])
    with pytest.raises(RecipeError, match="another config"):
        RecipeRun(tmp_path, {"seed": 1})
    assert json.loads((tmp_path / "recipe.json").read_text()) == {"seed": 0}


def test_summary_cites_every_claim_of_an_arm_that_has_several():
    """DPO with merging is the "with" arm of two claims (vs plain DPO, vs no DPO): the report card cites both."""
    from qwen25.recipes.report import summary_rows

    def claim(without, with_mean, without_mean, shown):
        return {"with": "dpo_merge", "without": without, "metric": "arith_acc", "with_values": [with_mean] * 3,
                "with_mean": with_mean, "with_sd": 0.0, "without_mean": without_mean, "without_sd": 0.0,
                "shown": shown}

    rows = summary_rows({}, {"summary": [claim("dpo_plain", 0.83, 0.53, True), claim("rs_sft", 0.83, 0.80, False)]},
                        [1, 4, 16])
    dpo = next(r for r in rows if r.startswith("| DPO"))
    assert "before DPO: 0.800 ± 0.000 vs 0.830 ± 0.000 over 3 seeds (not shown)" in dpo
    assert "plain DPO: 0.530 ± 0.000 vs 0.830 ± 0.000 over 3 seeds (shown)" in dpo
