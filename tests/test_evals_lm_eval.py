"""lm-evaluation-harness runs three small local tasks (multiple choice, rolling log-likelihood, generate_until)
end to end through our adapter; its numbers equal our harness's on the same data and model."""

from __future__ import annotations

import json
import random

import pytest

from qwen25.evals.harness import ModelLM, run_task
from qwen25.tasks.task import make_task
from qwen25.model import load_model
from tests.test_evals_harness import ByteTokenizer, _words

lm_eval = pytest.importorskip("lm_eval", reason="pip install lm-eval (test extra)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.conftest import random_hf_model

    root = tmp_path_factory.mktemp("lmeval")
    random_hf_model(seed=5, max_position_embeddings=256).save_pretrained(root / "model")
    lm = ModelLM(load_model(root / "model", dtype="fp32"), ByteTokenizer(), batch_size=4, eos_token_ids=[256])
    rng = random.Random(0)
    mc = [{"question": _words(rng, 3), "choices": [_words(rng, 1), _words(rng, 1)], "answer": rng.randrange(2)}
          for _ in range(6)]
    ppl = [{"text": _words(rng, rng.randint(5, 20))} for _ in range(4)]
    gen = [{"question": _words(rng, 3), "answer": "x"} for _ in range(3)]
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = lambda name: f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / name}.jsonl\n" \
                        "test_split: test\n"  # noqa: E731
    (root / "tasks").mkdir()
    (root / "tasks" / "q25_mc.yaml").write_text(
        "task: q25_mc\n" + data("mc") + "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nAnswer:\"\n"
        "doc_to_choice: [\"A\", \"B\"]\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    (root / "tasks" / "q25_ppl.yaml").write_text(
        "task: q25_ppl\n" + data("ppl") + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: bits_per_byte\n")
    (root / "tasks" / "q25_gen.yaml").write_text(
        "task: q25_gen\n" + data("gen") + "output_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"e\"]\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return root, lm, mc, ppl, gen


def test_lm_eval_runs_local_tasks_through_the_adapter(setup, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from qwen25.evals.lm_eval_adapter import make_lm_eval_model

    root, lm, mc, ppl, gen = setup
    adapter = make_lm_eval_model(lm)
    manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)  # skip indexing 1000s of tasks
    out = simple_evaluate(model=adapter, tasks=["q25_mc", "q25_ppl", "q25_gen"], task_manager=manager,
                          bootstrap_iters=0, log_samples=True)
    results = out["results"]

    ours_mc = run_task(make_task({"name": "mc", "kind": "multiple_choice"}, mc), lm, progress=False)
    assert results["q25_mc"]["acc,none"] == pytest.approx(ours_mc.metrics["acc"])
    logged = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in out["samples"]["q25_mc"]}
    for i, rec in enumerate(ours_mc.records):  # every per-choice log-likelihood, not just the accuracy
        assert logged[i] == pytest.approx(rec["logprobs"], abs=1e-4)

    ours_ppl = run_task(make_task({"name": "ppl", "kind": "perplexity"}, ppl), lm, progress=False)
    assert results["q25_ppl"]["bits_per_byte,none"] == pytest.approx(ours_ppl.metrics["bits_per_byte"], rel=1e-5)

    texts = {s["doc_id"]: s["resps"][0][0] for s in out["samples"]["q25_gen"]}
    for i, row in enumerate(gen):
        expected = lm.generate_ids([lm.encode(row["question"])], ["e"], 6)[0]
        assert texts[i] == expected


def test_adapter_cli_arguments():
    from qwen25.evals.lm_eval_adapter import main

    with pytest.raises(SystemExit):
        main(["--help"])


def test_adapter_equals_lm_eval_hf_backend(tmp_path, monkeypatch):
    """Our adapter and lm-eval's own `hf` backend on one checkpoint: the same per-choice log-likelihoods and the
    same perplexity, with texts longer than max_length (rolling windows) and the first token conditioned on the
    same prefix token (the tokenizer's eos: Qwen has no bos)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from serve_fixtures import write_tiny_chat_checkpoint

    from qwen25.evals.lm_eval_adapter import make_lm_eval_model
    from qwen25.tokenizer import Tokenizer

    model_dir = write_tiny_chat_checkpoint(tmp_path / "model", vocab_size=622)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_end|>"}))  # instruct's
    texts = ["The weather in Paris is fine today, and tomorrow it will rain again over the hills.",
             "Hello world, what is 2+2? " * 4]
    (tmp_path / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"q": q, "answer": 0}) + "\n" for q in ("Hi", "Is it")))
    data = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / name}.jsonl\n"  # noqa: E731
                         "test_split: test\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "h_ppl.yaml").write_text(
        "task: h_ppl\n" + data("ppl") + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n")
    (tmp_path / "tasks" / "h_mc.yaml").write_text(
        "task: h_mc\n" + data("mc") + "output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\n"
        "doc_to_choice: [\" yes\", \" no\"]\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    hf = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32,device=cpu,max_length=16",
                         tasks=["h_ppl", "h_mc"], task_manager=manager, log_samples=True, batch_size=1)
    lm = ModelLM(load_model(model_dir, dtype="fp32"), Tokenizer.from_dir(model_dir), batch_size=2, max_length=16)
    assert len(lm.encode(texts[0])) > 16  # several windows
    ours = simple_evaluate(model=make_lm_eval_model(lm), tasks=["h_ppl", "h_mc"], task_manager=manager,
                           log_samples=True)
    for task in ("h_ppl", "h_mc"):
        theirs = {s["doc_id"]: s["resps"] for s in hf["samples"][task]}
        for sample in ours["samples"][task]:
            for a, b in zip(sample["resps"], theirs[sample["doc_id"]]):
                assert (a[0][0] if task == "h_mc" else a[0]) == pytest.approx(
                    b[0][0] if task == "h_mc" else b[0], abs=1e-4)
    assert ours["results"]["h_ppl"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["h_ppl"]["word_perplexity,none"], rel=1e-5)
