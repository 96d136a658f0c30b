"""Data pipeline throughput: documents/s per step of a full `DataPipeline` run on a generated corpus, and our LCS
decontamination vs datatrove's own 12-gram decontamination filter on the same documents (speed and what each
catches), in one run.

Corpus: pieces of the Python standard library's source; every fifth gets a HumanEval problem planted, in turn
verbatim, with 20% of its words replaced, or with its lines shuffled. Datatrove's index for its filter is
built with datatrove's own text normalisation, word tokenizer and hash (its indexer step needs `lighteval`).

    python benchmarks/data.py [--docs 300] [--tasks 1]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.decontam import load_tokenizer  # noqa: E402
from qwen25.data.decontam import humaneval_path  # noqa: E402
from qwen25.data.pipeline import DataPipeline, quiet_datatrove_logs  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
KINDS = ("verbatim", "edited", "shuffled")


def make_corpus(count: int, problems: list[dict], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    files = sorted(STDLIB.glob("*.py"))
    docs = []
    for i in range(count):
        text = rng.choice(files).read_text(encoding="utf-8")
        start = rng.randrange(max(1, len(text) - 1000))
        text = text[start:start + rng.randrange(500, 8000)]
        kind = "clean"
        if i % 5 == 0:
            p = rng.choice(problems)
            item = p["prompt"] + p["canonical_solution"]
            kind = KINDS[(i // 5) % 3]
            if kind == "edited":
                item = " ".join(w if rng.random() > 0.2 else "zz" + w[::-1] for w in item.split(" "))
            elif kind == "shuffled":
                lines = item.splitlines()
                rng.shuffle(lines)
                item = "\n".join(lines)
            at = rng.randrange(len(text) + 1)
            text = text[:at] + "\n" + item + "\n" + text[at:]
        docs.append({"id": f"doc-{i}", "text": text, "kind": kind})
    return docs


def datatrove_ngram_filter(problems: list[dict], folder: Path):
    """Datatrove's NGramsDecontFilter over an index of the problems' 12-grams (label = solution, query = prompt,
    overlap n-grams on, as its indexer computes them)."""
    import numpy as np
    from datatrove.pipeline.decont.n_grams import NGramsDecontConfig, NGramsDecontFilter
    from datatrove.utils.hashing import create_hash_func
    from datatrove.utils.text import ngrams, simplify_text
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    cfg = NGramsDecontConfig()
    tok, hash_func = load_word_tokenizer("en"), create_hash_func(cfg.hash_config)
    hashes = set()
    for p in problems:
        label = tok.word_tokenize(simplify_text(p["canonical_solution"], cfg.norm_config))
        query = tok.word_tokenize(simplify_text(p["prompt"], cfg.norm_config))
        grams = list(ngrams(label, cfg.n_grams))
        grams += [query[-cfg.n_grams + 1 + i:] + label[:i + 1] for i in range(cfg.n_grams - 1)
                  if len(query) >= cfg.n_grams - 1 - i and len(label) >= i + 1]
        hashes.update(hash_func(" ".join(g)) for g in grams)
    folder.mkdir(parents=True, exist_ok=True)
    np.array(sorted(hashes), dtype=cfg.hash_config.np_descr).tofile(folder / "humaneval.index.hashes")
    return NGramsDecontFilter(str(folder), cfg)


def run_filter(step, docs) -> tuple[float, dict]:
    from datatrove.data import Document

    inputs = [Document(text=d["text"], id=d["id"], metadata={"kind": d["kind"]}) for d in docs]
    start = time.perf_counter()
    kept = {doc.id for doc in step.run(iter(inputs))}
    seconds = time.perf_counter() - start
    caught = {k: sum(1 for d in docs if d["kind"] == k and d["id"] not in kept) for k in ("clean", *KINDS)}
    return seconds, caught


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--tasks", type=int, default=1)
    args = ap.parse_args()
    quiet_datatrove_logs()
    with gzip.open(humaneval_path(), "rt") as f:
        problems = [json.loads(line) for line in f]
    docs = make_corpus(args.docs, problems)
    counts = {k: sum(d["kind"] == k for d in docs) for k in ("clean", *KINDS)}
    tmp = Path(tempfile.mkdtemp())
    tok, vocab = load_tokenizer()
    tok.save(tmp / "tok")
    (tmp / "corpus").mkdir()
    with open(tmp / "corpus" / "docs.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)

    config = {"output": str(tmp / "out"), "tokenizer": str(tmp / "tok"),
              "input": {"kind": "jsonl", "path": str(tmp / "corpus")},
              "executor": {"kind": "local", "tasks": args.tasks},
              "steps": [{"filters": {"gopher_repetition": {}}}, {"minhash": {}}, {"domains": {}},
                        {"decontaminate": {"test_sets": [{"path": str(humaneval_path()),
                                                          "fields": ["prompt", "canonical_solution"]}]}},
                        {"mixture": {"weights": {"code": 0.8, "technology": 0.2}, "unit": "tokens",
                                     "unlisted_rate": 1.0}},
                        {"pack": {"seq_len": 2048, "method": "best_fit"}}]}
    start = time.perf_counter()
    report = DataPipeline(config).run()
    total = time.perf_counter() - start
    print(f"\ncorpus: {len(docs)} documents ({sum(len(d['text']) for d in docs) / 1e6:.1f} MB), planted {counts}; "
          f"tokenizer: {vocab}; tasks {args.tasks}")
    print(f"{'step':<20} {'docs in':>8} {'docs out':>8} {'seconds':>8} {'docs/s':>8}")
    for s in report["stages"]:
        print(f"{s['step']:<20} {s['docs_in']:>8} {s['docs_out']:>8} {s['seconds']:>8.2f} "
              f"{s['docs_in'] / max(s['seconds'], 1e-9):>8.1f}")
    print(f"whole pipeline: {total:.1f} s, {len(docs) / total:.1f} docs/s")

    from qwen25.data.steps import DecontaminationFilter

    ours = DecontaminationFilter(tmp / "tok", [{"path": str(humaneval_path()),
                                               "fields": ["prompt", "canonical_solution"]}])
    ours._load()  # index building is not timed for either
    theirs = datatrove_ngram_filter(problems, tmp / "dt-index")
    theirs.load_index_hashes()
    t_ours, c_ours = run_filter(ours, docs)
    t_theirs, c_theirs = run_filter(theirs, docs)
    print(f"\ndecontamination on the same {len(docs)} documents (planted: {counts})")
    print(f"qwen25 LCS rule       {t_ours:7.2f} s {len(docs) / t_ours:8.1f} docs/s  dropped {c_ours}")
    print(f"datatrove 12-grams    {t_theirs:7.2f} s {len(docs) / t_theirs:8.1f} docs/s  dropped {c_theirs}")
    print(f"speed ratio (datatrove / ours time): {t_theirs / t_ours:.2f}")
    print(json.dumps({"benchmark": "data", "docs": len(docs), "tasks": args.tasks,
                      "steps": {s["step"]: round(s["docs_in"] / max(s["seconds"], 1e-9), 1)
                                for s in report["stages"]},
                      "pipeline_docs_per_s": round(len(docs) / total, 1),
                      "decontam_ours_docs_per_s": round(len(docs) / t_ours, 1),
                      "decontam_datatrove_docs_per_s": round(len(docs) / t_theirs, 1),
                      "caught_ours": c_ours, "caught_datatrove": c_theirs}))


if __name__ == "__main__":
    main()
