"""Our pipeline steps one by one: quality classifier and rater, domains, mixture, MinHash dedup, readers."""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from datatrove.data import Document

from qwen25.data.domains import classify_format, classify_topic, domain_of
from qwen25.data.mixture import BINS, hash01, merge_histograms, mixture_copies, plan_mixture
from qwen25.data.pipeline import DataPipeline, quiet_datatrove_logs
from qwen25.data.quality import (LMRater, QualityClassifier, bce_gradient, hashed_features, parse_ratings,
                                 rating_target)

GOOD = ("the theorem states that every continuous function on a closed interval attains a maximum . "
        "we prove it by compactness , then apply it to the energy of a particle . students should check "
        "the proof carefully and compare the method with the lecture notes on analysis and physics .").split()
BAD = ("buy now !!! cheap cheap deal click here click here free free free shipping best price order today "
       "limited offer $$$ subscribe follow like share omg lol viral").split()
COMMON = "the a of and to is in it".split()


def planted_docs(seed: int, n: int):
    """Documents drawn from a good or a bad vocabulary (plus common words), with their true labels."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        good = i % 2 == 0
        vocab = (GOOD if good else BAD) + COMMON
        texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randrange(20, 120))))
        labels.append(1.0 if good else 0.0)
    return texts, labels


def auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y > 0.5]
    neg = [s for s, y in zip(scores, labels) if y <= 0.5]
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def test_quality_classifier_separates_planted_docs(tmp_path):
    texts, labels = planted_docs(0, 200)
    # ratings as an LM would give them: 4-5 for good documents, 0-1 for bad ones, on every dimension
    rng = random.Random(1)
    targets = [rating_target({d: rng.choice([4, 5] if y else [0, 1]) for d in "abcd"}) for y in labels]
    clf = QualityClassifier().fit(texts, targets)
    held_out, truth = planted_docs(99, 100)
    scores = clf.score(held_out)
    assert auc(scores, truth) > 0.99
    assert np.mean((scores > 0.5) == (np.array(truth) > 0.5)) > 0.95
    again = QualityClassifier.load(clf.save(tmp_path / "clf.npz"))
    assert np.array_equal(again.score(held_out), scores)


def test_bce_gradient_equals_autograd():
    rng = np.random.default_rng(0)
    texts, _ = planted_docs(2, 6)
    dim = 64
    feats = [hashed_features(t, dim) for t in texts]
    w, b, y = rng.normal(size=dim), 0.3, rng.uniform(size=len(texts))
    touched, grad, gb = bce_gradient(w, b, feats, y, l2=0.01)
    x = torch.zeros(len(texts), dim, dtype=torch.float64)
    for row, (idx, val) in enumerate(feats):
        x[row].index_put_((torch.from_numpy(idx),), torch.from_numpy(val).double(), accumulate=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(dim, dtype=torch.float64)
    mask[torch.from_numpy(touched)] = 1.0
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ wt + bt, torch.from_numpy(y))
    (loss + 0.005 * (mask * wt.square()).sum()).backward()
    assert np.allclose(grad, wt.grad.numpy()[touched]) and np.allclose(gb, bt.grad.item())
    untouched = np.setdiff1d(np.arange(dim), touched)
    assert np.allclose(wt.grad.numpy()[untouched], 0)


def test_hashed_features_are_stable_and_normalised():
    idx, val = hashed_features("Hello world, hello!")
    assert abs(float(np.linalg.norm(val)) - 1.0) < 1e-6
    assert np.array_equal(idx, hashed_features("hello WORLD, hello!")[0])  # lower-cased, process-independent


def test_parse_ratings():
    answer = "educational_value: 4\ncoherence: 3\nwriting_quality = 5\nInformativeness: 2"
    assert parse_ratings(answer) == {"educational_value": 4, "coherence": 3, "writing_quality": 5,
                                     "informativeness": 2}
    assert parse_ratings("educational_value: 4") is None  # missing dimensions
    assert parse_ratings(answer.replace("5", "9")) is None  # out of range


def test_lm_rater_prompts_generates_and_parses(tmp_path, monkeypatch):
    """A real tiny qwen25 checkpoint and tokenizer; decoding is replaced by a canned answer to check the parse."""
    from test_data_pipeline import small_tokenizer

    from qwen25 import generation
    from qwen25.config import ModelConfig
    from qwen25.model import CausalLM, save_model
    from qwen25.tokenizer import Tokenizer

    tok_dir = small_tokenizer(tmp_path / "tok")
    tok = Tokenizer.from_dir(tok_dir)
    model = CausalLM(ModelConfig.from_preset("tiny", vocab_size=len(tok)))
    model.init_weights(seed=0)
    save_model(model, tmp_path / "model")
    rater = LMRater(tmp_path / "model", tok_dir, max_new_tokens=4, batch_size=2)
    assert rater(["a short document", "another one", "a third"]) == [None, None, None]  # random weights: no parse
    # a control-token string inside a document stays plain text: no extra control token in the prompt
    assert rater.prompt_ids("<|im_start|>").count(tok.im_start_id) == rater.prompt_ids("x").count(tok.im_start_id)
    canned = "educational_value: 5\ncoherence: 4\nwriting_quality: 4\ninformativeness: 3"
    seen = []

    def fake_generate(model, prompts, params, vocab_limit=None):
        seen.extend(prompts)
        return [tok.encode(canned) + [tok.im_end_id] for _ in prompts]
    monkeypatch.setattr(generation, "generate", fake_generate)
    assert rater(["doc one"]) == [{"educational_value": 5, "coherence": 4, "writing_quality": 4,
                                   "informativeness": 3}]
    assert "doc one" in tok.decode(seen[0]) and "Rate the document" in tok.decode(seen[0])


def test_domains():
    assert classify_topic("Buy now: free shipping, best price, discount on every order in our store.") == "ecommerce"
    assert classify_topic("The experiment measured the energy of each particle; the theory held.") == "science"
    assert classify_topic("Just some words without a theme.") == "general"
    code = "import os\n\ndef f(x):\n    return x + 1\n\nclass A:\n    pass\n"
    assert classify_format(code) == "code" and domain_of("technology", "code") == "code"
    assert classify_format("$x^2 + 1 = 5$\nso $x = 2$\nand 3 + 4 = 7") == "math"
    assert classify_format("- one thing\n- another\n- a third") == "list"
    assert classify_format("A plain sentence. Another sentence follows here.") == "prose"


def write_domain_corpus(folder: Path, seed: int = 0, files: int = 8) -> list[dict]:
    """Documents of four domains in skewed proportions and random sizes, spread over several jsonl files."""
    rng = random.Random(seed)
    docs = []
    for i in range(1200):
        domain = rng.choices(["ecommerce", "science", "code", "general"], weights=[6, 1, 2, 3])[0]
        docs.append({"id": f"d{i}", "text": "x" * rng.randrange(50, 400), "metadata": {"domain": domain}})
    folder.mkdir(parents=True)
    for f in range(files):
        with open(folder / f"{f}.jsonl", "w") as out:
            out.writelines(json.dumps(d) + "\n" for d in docs[f::files])
    return docs


def _run_mixture(tmp: Path, corpus: Path, tasks: int, weights: dict, workers: int = 1) -> tuple[list[str], dict]:
    config = {"output": str(tmp / f"out-{tasks}"), "input": {"kind": "jsonl", "path": str(corpus)},
              "executor": {"kind": "local", "tasks": tasks, "workers": workers},
              "steps": [{"mixture": {"weights": weights, "unit": "chars"}}]}
    report = DataPipeline(config).run()
    ids = []
    for path in sorted((tmp / f"out-{tasks}" / "stages" / "00_mixture").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            ids += [json.loads(line)["id"] for line in f]
    return sorted(ids), report


def test_mixture_hits_targets_and_ignores_worker_count(tmp_path):
    quiet_datatrove_logs()
    docs = write_domain_corpus(tmp_path / "corpus")
    weights = {"science": 0.3, "code": 0.3, "ecommerce": 0.1, "general": 0.3}  # science up-sampled ~3x
    # 4 tasks run by 2 worker processes at once: the executor's real multiprocessing path
    runs = {tasks: _run_mixture(tmp_path, tmp_path / "corpus", tasks, weights, workers=min(tasks, 2))
            for tasks in (1, 2, 4)}
    assert runs[1][0] == runs[2][0] == runs[4][0]  # the same documents and copies for 1, 2 and 4 tasks
    table = runs[1][1]["mixture"]["domains"]
    biggest = max(len(d["text"]) for d in docs) / sum(len(d["text"]) for d in docs)
    for domain, row in table.items():
        # stated tolerance: one document's share of the total (hash-bin granularity)
        assert abs(row["weight_out"] - weights[domain]) <= biggest, (domain, row)
    assert table["science"]["rate"] > 2 and table["ecommerce"]["rate"] < 0.3
    assert any("#r" in i for i in runs[1][0])


def test_mixture_plan_edges():
    rng = np.random.default_rng(0)
    hists = {"a": np.bincount(rng.integers(0, BINS, 500), minlength=BINS) * 10, "b": np.zeros(BINS, np.int64)}
    hists["b"][:10] = 7
    plan = plan_mixture(hists, {"a": 1.0}, max_repeat=2)
    assert plan["a"]["rate"] == pytest.approx(1.0) and plan["b"]["rate"] == 0.0
    assert mixture_copies("anything", "b", plan) == 0 and mixture_copies("x", "a", plan) == 1
    capped = plan_mixture(hists, {"a": 0.5, "b": 0.5}, max_repeat=3)
    assert capped["b"]["capped"] and capped["b"]["rate"] == 3
    with pytest.raises(ValueError, match="no documents: \\['c'\\]"):
        plan_mixture(hists, {"c": 1.0})
    assert 0 <= hash01("x") < 1 and hash01("x") == hash01("x") != hash01("x", seed=1)
    by_factor = plan_mixture(hists, {}, factors={"a": 0.25, "b": 2.5, "absent": 9.0})
    assert by_factor["a"]["rate"] == 0.25 and by_factor["b"]["copies"] == 2 and "absent" not in by_factor
    realised = sum(mixture_copies(f"d{i}", "a", by_factor) for i in range(4000)) / 4000
    assert abs(realised - 0.25) < 0.03  # ids hash uniformly: the cutoff keeps about a quarter
    with pytest.raises(ValueError, match="weights and/or factors"):
        plan_mixture(hists, {})


def test_merge_histograms_sums_tasks(tmp_path):
    (tmp_path / "00000.json").write_text(json.dumps({"a": {"3": 5}}))
    (tmp_path / "00001.json").write_text(json.dumps({"a": {"3": 2, "7": 1}, "b": {"0": 4}}))
    merged = merge_histograms(tmp_path)
    assert merged["a"][3] == 7 and merged["a"][7] == 1 and merged["b"].sum() == 4


def test_minhash_removes_planted_near_duplicates(tmp_path):
    quiet_datatrove_logs()
    rng = random.Random(0)
    # letters only: MinHash's text normalisation drops digits
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(3, 9))) for _ in range(5000)]
    originals = [[rng.choice(words) for _ in range(200)] for _ in range(40)]
    docs = [{"id": f"orig-{i}", "text": " ".join(t)} for i, t in enumerate(originals)]
    for i in range(0, 40, 4):  # near-duplicates: 3 of 200 words changed
        t = list(originals[i])
        for j in rng.sample(range(200), 3):
            t[j] = rng.choice(words)
        docs.append({"id": f"near-{i}", "text": " ".join(t)})
    (tmp_path / "corpus").mkdir()
    with open(tmp_path / "corpus" / "docs.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    config = {"output": str(tmp_path / "out"), "input": {"kind": "jsonl", "path": str(tmp_path / "corpus")},
              "steps": [{"minhash": {"num_buckets": 8, "hashes_per_bucket": 5}}]}
    report = DataPipeline(config).run()
    with gzip.open(next((tmp_path / "out" / "stages" / "00_minhash").glob("*.jsonl.gz")), "rt") as f:
        kept = {json.loads(line)["id"] for line in f}
    for i in range(40):
        # every distinct document survives; of each planted pair exactly one does
        assert (f"orig-{i}" in kept) + (f"near-{i}" in kept) == 1 if i % 4 == 0 else f"orig-{i}" in kept
    assert report["stages"][0]["docs_out"] == 40


def test_text_reader_skips_corrupt_files(tmp_path):
    from qwen25.data.steps import TextFolderReader

    (tmp_path / "a.py").write_text("print('a')\n")
    (tmp_path / "b.py").write_bytes(b"\xff\xfe broken")
    reader = TextFolderReader(str(tmp_path), glob_pattern="*.py")
    docs = list(reader())
    assert [d.id for d in docs] == ["a.py"] and reader.stats["corrupt_files"].total == 1


def test_counter_is_exact_for_duplicated_ids():
    # copies made by the mixture carry distinct ids, so downstream hashing (shuffle, dedup) sees them apart
    plan = {"a": {"copies": 3, "cutoff": 0.0}}
    ids = [f"doc{i}" for i in range(10)]
    assert Counter(mixture_copies(i, "a", plan) for i in ids) == Counter({3: 10})


def test_jsonl_reader_survives_a_truncated_gzip(tmp_path):
    from qwen25.data.steps import make_reader

    lines = "".join(json.dumps({"id": f"d{i}", "text": "word " * 50}) + "\n" for i in range(200))
    blob = gzip.compress(lines.encode())
    (tmp_path / "bad.jsonl.gz").write_bytes(blob[: len(blob) // 2])  # cut in the middle
    (tmp_path / "good.jsonl").write_text(lines[:500].rsplit("\n", 1)[0] + "\n{broken\n")
    reader = make_reader({"kind": "jsonl", "path": str(tmp_path)})
    ids = [d.id for d in reader()]
    assert "d0" in ids and len(ids) < 400  # what could be read was read, nothing raised
    assert reader.stats["corrupt_files"].total == 1


TOPIC_WORDS = {
    "science": "experiment energy particle molecule theory observation cell species protein gene".split(),
    "ecommerce": "price shipping cart discount order checkout coupon delivery deal store".split(),
    "entertainment": "movie album concert episode actor trailer fans season song celebrity".split(),
}


def topic_docs(seed: int, n: int):
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = list(TOPIC_WORDS)[i % 3]
        words = [rng.choice(TOPIC_WORDS[label] if rng.random() < 0.3 else COMMON + GOOD) for _ in range(60)]
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def test_topic_classifier_learns_planted_topics(tmp_path):
    from qwen25.data.domains import DomainTagger, TopicClassifier
    from datatrove.data import Document

    texts, labels = topic_docs(0, 150)
    clf = TopicClassifier(list(TOPIC_WORDS)).fit(texts, labels)
    held, truth = topic_docs(7, 90)
    assert np.mean(np.array(clf.predict(held)) == np.array(truth)) > 0.95
    path = clf.save(tmp_path / "topics.npz")
    docs = list(DomainTagger(classifier=path).run(iter(Document(text=t, id=str(i)) for i, t in enumerate(held))))
    assert [d.metadata["topic"] for d in docs] == clf.predict(held)
    with pytest.raises(ValueError, match="unknown labels \\['sports'\\]"):
        TopicClassifier(["science"]).fit(["a"], ["sports"])


def test_softmax_gradient_equals_autograd():
    from qwen25.data.domains import softmax_gradient

    rng = np.random.default_rng(0)
    texts, _ = planted_docs(3, 5)
    dim, k = 64, 3
    feats = [hashed_features(t, dim) for t in texts]
    w, b, y = rng.normal(size=(dim, k)), rng.normal(size=k), rng.integers(0, k, len(texts))
    rows, grad, gb = softmax_gradient(w, b, feats, y)
    x = torch.zeros(len(texts), dim, dtype=torch.float64)
    for row, (idx, val) in enumerate(feats):
        x[row].index_put_((torch.from_numpy(idx),), torch.from_numpy(val).double(), accumulate=True)
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    torch.nn.functional.cross_entropy(x @ wt + bt, torch.from_numpy(y)).backward()
    assert np.allclose(grad, wt.grad.numpy()[rows]) and np.allclose(gb, bt.grad.numpy())
    assert np.allclose(np.delete(wt.grad.numpy(), rows, axis=0), 0)


def test_downsampled_domain_is_spread_over_the_packing_order():
    # the keep decision and the packing order must be independent draws, or a down-sampled domain's
    # surviving documents (all with a low mixture hash) would be packed first
    plan = {"a": {"copies": 0, "cutoff": 0.3}, "b": {"copies": 1, "cutoff": 0.0}}
    kept = [(f"d{i}", "ab"[i % 2]) for i in range(4000) if mixture_copies(f"d{i}", "ab"[i % 2], plan)]
    order = sorted(kept, key=lambda d: hash01(d[0], 0, "shuffle"))
    positions = [k / len(order) for k, (_, domain) in enumerate(order) if domain == "a"]
    assert 500 < len(positions) < 700 and abs(np.mean(positions) - 0.5) < 0.05


def test_datatrove_heuristic_filters_run_offline():
    from datatrove.data import Document

    from qwen25.data.steps import make_filters

    filters = dict(zip(["gopher_quality", "gopher_repetition", "c4", "fineweb"],
                       make_filters({"gopher_quality": {}, "gopher_repetition": {}, "c4": {}, "fineweb": {}},
                                    lambda name: None)))
    rng = random.Random(0)
    subjects = ["The committee", "Our library", "The new museum", "A local school", "The city council"]
    verbs = ["opened a reading room", "hired two teachers", "published a report", "planned a garden"]
    prose = "\n".join(f"{rng.choice(subjects)} {rng.choice(verbs)} on day {i} of the month, and the members "
                      f"agreed that it was {rng.choice(['useful', 'late', 'welcome', 'costly'])}." for i in range(30))
    repeated = "\n".join(["Click here to buy the best deal today."] * 30)
    assert filters["gopher_quality"].filter(Document(text=prose, id="p")) is True
    assert filters["c4"].filter(Document(text=prose, id="p")) is True
    assert filters["fineweb"].filter(Document(text=prose, id="p")) is True
    assert filters["gopher_repetition"].filter(Document(text=repeated, id="r")) == (False, "dup_line_frac")
    with pytest.raises(ValueError, match="unknown filters \\['bloom'\\]"):
        make_filters({"bloom": {}}, lambda name: None)


def test_effective_tokens_equal_a_hand_computation():
    """D and D_eff = sum(q * n) per domain and in total, as the pipeline's stats report them."""
    from qwen25.data.stats import effective_tokens
    from qwen25.data.steps import EffectiveTokens

    docs = [Document(text="a", id="1", metadata={"token_count": 100, "quality_score": 0.9, "domain": "code"}),
            Document(text="b", id="2", metadata={"token_count": 50, "quality_score": 0.2, "domain": "code"}),
            Document(text="c", id="3", metadata={"token_count": 40, "quality_score": 0.5, "domain": "science"}),
            Document(text="d", id="4", metadata={"token_count": 10, "domain": "science"}),  # never scored
            Document(text="e", id="5", metadata={})]  # not counted: no token count
    step = EffectiveTokens()
    assert [d.id for d in step.run(iter(docs))] == ["1", "2", "3", "4", "5"]  # passes everything on
    table = effective_tokens({k: v["total"] for k, v in step.stats.to_dict()["stats"].items()})
    assert table["code"] == {"tokens": 150, "effective_tokens": pytest.approx(90 + 10), "quality": pytest.approx(100 / 150)}
    assert table["science"]["tokens"] == 50 and table["science"]["effective_tokens"] == pytest.approx(20)
    assert table["total"]["tokens"] == 200 and table["total"]["effective_tokens"] == pytest.approx(120)
    assert table["total"]["quality"] == pytest.approx(0.6) and table["total"]["unscored_tokens"] == 10
