"""The harness on a tiny random model: log-likelihoods, rolling log-likelihood (bits per byte) and greedy
generation equal direct computations with the transformers model holding the same weights; multiple-choice
accuracy equals an argmax computed by hand; generation tasks, pass@k, reports and the CLI end to end."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from qwen25.cli import main
from qwen25.evals.harness import ModelLM, run_task
from qwen25.evals.report import markdown_table, write_report
from qwen25.tasks.task import make_task
from qwen25.model import load_model


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, 256 = end of text: the simplest exact tokenizer. Ids above 256 (the random
    model may pick them) decode to nothing, so generation is not restricted to 257 ids."""

    endoftext_id = 256
    eos_id = 256

    def __len__(self) -> int:
        return 320

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, our ModelLM) with identical random weights, vocabulary 320."""
    from tests.conftest import random_hf_model

    hf = random_hf_model(seed=3, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    ours = load_model(path, dtype="fp32")
    return hf, ModelLM(ours, ByteTokenizer(), batch_size=3, eos_token_ids=[256])


def _direct_logprob(hf, ids: list[int], start: int) -> float:
    """sum_{t >= start} log p(ids[t] | ids[:t]) with the transformers model."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return float(sum(logits[t - 1, ids[t]] for t in range(start, len(ids))))


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 5))) for _ in range(n))


def test_loglikelihood_equals_direct_computation(models):
    hf, lm = models
    rng = random.Random(0)
    requests = [(_words(rng, rng.randint(1, 8)) + rng.choice(["", " "]), _words(rng, rng.randint(1, 3)))
                for _ in range(7)]
    got = lm.loglikelihood(requests)
    for (ctx, cont), (lp, greedy) in zip(requests, got):
        ctx_ids, cont_ids = lm.encode_pair(ctx, cont)
        assert ctx_ids + cont_ids == list((ctx + cont).encode())  # trailing context spaces move, bytes stay
        ids = ctx_ids + cont_ids
        assert lp == pytest.approx(_direct_logprob(hf, ids, len(ctx_ids)), abs=1e-3)
        with torch.no_grad():
            argmax = hf(torch.tensor([ids])).logits[0].argmax(-1)
        assert greedy == all(argmax[t - 1] == ids[t] for t in range(len(ctx_ids), len(ids)))


def test_loglikelihood_projects_only_the_continuation_positions(models):
    """The vocabulary projection runs on the positions that predict continuation tokens, not on every position
    of the padded batch (full-vocabulary fp32 log-probs of a whole batch would not fit in memory at Qwen's size)."""
    _, lm = models
    requests = [([5, 6, 7, 8, 9, 10, 11, 12], [13, 14]), ([20, 21], [22]), ([30] * 20, [31, 32, 33])]
    rows = []
    hook = lm.model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        lm.loglikelihood_tokens(requests)
    finally:
        hook.remove()
    assert rows == [2 + 1 + 3]


def test_rolling_loglikelihood_and_bits_per_byte(models):
    hf, lm = models
    text = _words(random.Random(1), 30)
    ids = lm.encode(text)
    full = _direct_logprob(hf, [256] + ids, 1)  # every token, the first conditioned on end-of-text
    assert lm.loglikelihood_rolling([text])[0] == pytest.approx(full, abs=1e-3)
    # Short windows: every token predicted exactly once, each with as much context as fits.
    short = ModelLM(lm.model, lm.tokenizer, max_length=16)
    windows = short.rolling_windows(ids)
    assert sum(len(c) for _, c in windows) == len(ids) and all(len(a) + len(b) <= 17 for a, b in windows)
    expected = sum(_direct_logprob(hf, a + b, len(a)) for a, b in windows)
    assert short.loglikelihood_rolling([text])[0] == pytest.approx(expected, abs=1e-3)
    task = make_task({"name": "ppl", "kind": "perplexity"}, [{"text": text}, {"text": "abc abc"}])
    result = run_task(task, lm, progress=False)
    nll = -(full + _direct_logprob(hf, [256] + lm.encode("abc abc"), 1))
    assert result.metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / (len(text) + 7), rel=1e-4)


def test_multiple_choice_accuracy_equals_direct_argmax(models):
    hf, lm = models
    rng = random.Random(2)
    rows = [{"question": _words(rng, 4), "choices": [_words(rng, 1) for _ in range(4)], "answer": rng.randrange(4),
             "subject": rng.choice(["x", "y"])} for _ in range(6)]
    for continuation, shots in (("letter", 1), ("text", 0)):
        task = make_task({"name": "mc", "kind": "multiple_choice", "continuation": continuation,
                          "few_shot": shots}, rows)
        result = run_task(task, lm, progress=False)
        correct = 0
        for ex, rec in zip(task.examples(), result.records):
            prompt = task.prompt(ex)
            scores = []
            for cont in task.continuations(ex):
                ctx_ids = list(prompt.encode())
                scores.append(_direct_logprob(hf, ctx_ids + list(cont.encode()), len(ctx_ids)))
            pred = max(range(4), key=scores.__getitem__)
            assert rec["pred"] == pred and rec["logprobs"] == pytest.approx(scores, abs=1e-3)
            correct += pred == task.gold(ex)
        assert result.metrics["acc"] == correct / len(rows)
        assert set(result.metrics["acc_by_subject"]) == {"x", "y"}


def test_greedy_generation_equals_transformers_and_stops(models):
    hf, lm = models
    prompts = ["abc de", "hello wor"]
    got = lm.generate_ids([lm.encode(p) for p in prompts], None, max_new_tokens=12)
    for p, text in zip(prompts, got):
        ids = torch.tensor([lm.encode(p)])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=256, pad_token_id=0)
        ref = ref[0, ids.shape[1]:].tolist()
        expected = lm.tokenizer.decode(ref[:ref.index(256)] if 256 in ref else ref)
        assert text == expected
    stop = got[0][3:5] if len(got[0]) >= 5 else None
    if stop and stop.strip():
        cut = lm.generate_until([("abc de", {"until": [stop], "max_gen_toks": 12})])[0]
        assert cut == got[0][:got[0].find(stop)]


class ScriptedLM(ModelLM):
    """A ModelLM whose generations are scripted: exercises the generate-then-check path exactly."""

    def __init__(self, answers):
        self.answers, self.tokenizer, self.name, self.batch_size = answers, ByteTokenizer(), "scripted", 4

    def prompt_ids(self, prompt):
        return [hash(str(prompt)) % 1000]

    def generate_ids(self, prompts, until=None, max_new_tokens=256, temperature=0.0, seed=None, progress=False):
        return [self.answers.pop(0) for _ in prompts]


def test_math_and_code_tasks_score_through_the_shared_check():
    math_task = make_task({"name": "m", "kind": "math"}, [{"question": "1/2?", "answer": "#### 0.5"},
                                                          {"question": "2+2?", "answer": "4"}])
    result = run_task(math_task, ScriptedLM([r"so \boxed{\frac{1}{2}}", "The answer is 5."]), progress=False)
    assert result.metrics["acc"] == 0.5 and [r["correct"] for r in result.records] == [[True], [False]]
    problem = {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
               "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    code_task = make_task({"name": "c", "kind": "code"}, [problem, {**problem, "task_id": "t/1"}])
    answers = ["    return a + b\n", "    return a - b\n", "    return b + a\n"] + ["    while True: pass\n"] * 3
    code_task.spec.timeout = 2
    result = run_task(code_task, ScriptedLM(answers), samples=3, progress=False)
    # Problem 0: 2 of 3 right; problem 1: 0 of 3. pass@1 = (2/3 + 0) / 2, pass@3 = (1 + 0) / 2.
    assert result.metrics["pass@1"] == pytest.approx(1 / 3) and "pass@3" not in result.metrics
    assert result.metrics["solved"] == 1
    assert code_task.reward(problem, "    return a + b\n") == 1.0 and code_task.reward(problem, "x") == 0.0


def test_preference_accuracy_and_reports(tmp_path):
    task = make_task({"name": "pref", "kind": "preference"},
                     [{"prompt": "q", "chosen": "good", "rejected": "bad"},
                      {"prompt": "q", "chosen": "great", "rejected": "meh"}])
    scores = {"good": 1.0, "bad": 0.0, "great": -1.0, "meh": 2.0}
    result = run_task(task, None, scorer=lambda ex: (scores[ex["chosen"]], scores[ex["rejected"]]), progress=False)
    assert result.metrics["acc"] == 0.5 and result.metrics["margin"] == pytest.approx(-1.0)
    paths = write_report([result], tmp_path / "report")
    assert json.loads(paths["json"].read_text())[0]["metrics"]["acc"] == 0.5
    assert "| pref | preference | - | acc | 0.5000 |" in paths["markdown"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "margin" in markdown_table([result])


def test_cli_runs_a_spec_file_end_to_end(tmp_path, capsys):
    from qwen25.tokenizer import train_tokenizer

    model_dir = tmp_path / "tiny"
    assert main(["init", "--preset", "tiny", "--out", str(model_dir)]) == 0
    rows = [{"q": f"What is {a} plus {b}?", "options": [str(a + b), str(a + b + 1)], "label": i % 2}
            for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (2, 2)])]
    train_tokenizer([r["q"] + " A. B. Answer:" for r in rows] * 10, vocab_size=300, out_dir=model_dir)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "sums", "kind": "multiple_choice", "data": "data.jsonl",
            "fields": {"question": "q", "choices": "options", "answer": "label"}}
    (tmp_path / "sums.json").write_text(json.dumps(spec))
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": rows[0]["q"]}) + "\n")
    (tmp_path / "ppl.json").write_text(json.dumps({"name": "ppl", "kind": "perplexity", "data": "text.jsonl"}))
    out = tmp_path / "out"
    both = f"{tmp_path / 'sums.json'},{tmp_path / 'ppl.json'}"
    assert main(["eval", both, "--model", str(model_dir), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| sums | multiple_choice |" in printed and "| ppl | perplexity |" in printed
    saved, ppl = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["examples"] == 4 and len(saved["records"]) == 4
    assert ppl["metrics"]["bits_per_byte"] > 0
    assert (out / "results.png").stat().st_size > 0 and (out / "results.md").is_file()


def test_reward_model_accuracy_equals_post_training_evaluation(tmp_path):
    """Preference accuracy through the harness (and the CLI) equals qwen25.post.reward's held-out evaluation."""
    from qwen25.config import ModelConfig
    from qwen25.model import CausalLM
    from qwen25.post.logprobs import encode_pair
    from qwen25.post.reward import RewardModel, evaluate_reward_model, save_reward_model

    torch.manual_seed(0)
    rm = RewardModel(CausalLM(ModelConfig.from_preset("tiny"))).eval()
    rng = random.Random(0)
    pairs = [{"prompt_ids": [rng.randrange(1, 500) for _ in range(4)],
              "chosen_ids": [rng.randrange(1, 500) for _ in range(rng.randint(1, 5))],
              "rejected_ids": [rng.randrange(1, 500) for _ in range(rng.randint(1, 5))]} for _ in range(12)]
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)  # spread the rewards so the accuracy is not trivially 0 or 1
    expected = evaluate_reward_model(rm, [encode_pair(p) for p in pairs])["accuracy"]
    from qwen25.evals.harness import reward_model_scorer

    task = make_task({"name": "rm", "kind": "preference"}, pairs)
    result = run_task(task, None, scorer=reward_model_scorer(rm), progress=False)
    assert result.metrics["acc"] == pytest.approx(expected) and 0 < expected < 1
    save_reward_model(rm, tmp_path / "rm")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "rm.json").write_text(json.dumps({"name": "rm-pairs", "kind": "preference", "data": "pairs.jsonl"}))
    assert main(["eval", str(tmp_path / "rm.json"), "--model", str(tmp_path / "rm"), "--quiet",
                 "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())[0]
    assert saved["metrics"]["acc"] == pytest.approx(expected)
