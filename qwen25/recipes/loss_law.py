"""The report's data story in miniature: not every token counts equally.

Corpora of controlled quality are built from what the recipe's data pipeline produced: its kept documents (clean,
each with the quality classifier's score q) mixed with low-quality documents of the kind the corpus plants (spam,
scored by the same classifier), at several token fractions. A grid of small models is trained on each at several
token budgets (`run_sweep` with a data axis, learning rates from the scaling fit), every run is scored on clean
held-out text, and the loss law is fitted twice: with D = tokens trained and with D_eff = q x tokens (loss_law.py).
If quality multiplies data, D_eff explains the held-out losses better than D.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..data.pack import is_packed, pack_documents
from ..data.quality import QualityClassifier
from ..data.steps import SafeJsonlReader
from ..tokenizer import Tokenizer
from ..train.loss_law import write_loss_law
from ..train.sweep import run_sweep
from ..utils import read_jsonl
from .synthetic import spam_text


def scored_documents(pipeline: Path) -> list[dict]:
    """{id, text, quality} of the documents the data pipeline kept (its last stage, the mixture)."""

    stage = sorted(p for p in (pipeline / "stages").iterdir() if p.is_dir())[-1]
    return [{"id": d.id, "text": d.text, "quality": float(d.metadata["quality_score"])}
            for d in SafeJsonlReader(str(stage), glob_pattern="*.jsonl.gz")()]


def build_quality_corpora(pipeline: Path, tokenizer: Path, heldout: Path, out: Path, fractions: list[float],
                          tokens: int, seq_len: int, seed: int) -> tuple[list[dict], Path]:
    """One token-shard folder per low-quality fraction f: `tokens` tokens, a share f of spam documents and the rest
    the pipeline's kept documents, each corpus's mean quality (token-weighted classifier score) in its index meta;
    and the clean held-out documents as evaluation shards. Returns ([{name, path, quality}], held-out shards)."""

    tok = Tokenizer.from_dir(tokenizer)
    clf = QualityClassifier.load(next((pipeline / "quality").glob("*/classifier.npz")))
    rng = random.Random(seed)
    clean = scored_documents(pipeline)
    rng.shuffle(clean)
    clean_ids = tok.encode_batch([d["text"] for d in clean], allowed_special="none")
    spam_docs = [spam_text(rng) for _ in range(max(1, int(max(fractions) * tokens) // 200 + 1))]
    spam_ids = tok.encode_batch(spam_docs, allowed_special="none")
    spam_q = clf.score(spam_docs)

    def take(ids, qualities, budget):
        picked, n = [], 0
        for i, q in zip(ids, qualities):
            if n >= budget:
                break
            picked.append((i[:budget - n], q))
            n += len(picked[-1][0]) + 1
        if n < budget:
            raise ValueError(f"the quality corpora need {budget:,} tokens of a kind, only {n:,} are there")
        return picked

    corpora = []
    for f in fractions:
        name = f"spam{round(100 * f):02d}"
        docs = take(clean_ids, [d["quality"] for d in clean], round((1 - f) * tokens)) if f < 1 else []
        docs += take(spam_ids, spam_q, round(f * tokens)) if f > 0 else []
        quality = sum(q * (len(i) + 1) for i, q in docs) / sum(len(i) + 1 for i, _ in docs)
        path = out / name
        if not is_packed(path):
            pack_documents([i for i, _ in docs], [f"{name}/{k}" for k in range(len(docs))], path, seq_len,
                           tok.endoftext_id, tok.endoftext_id, len(tok), "best_fit",
                           meta={"seq_len": seq_len, "quality": quality, "spam_fraction": f})
        corpora.append({"name": name, "path": str(path), "quality": quality})
    held = out / "heldout"
    if not is_packed(held):
        texts = [d["text"] for d in read_jsonl(heldout)]
        ids = tok.encode_batch(texts, allowed_special="none")
        pack_documents(ids, [f"heldout/{k}" for k in range(len(ids))], held, seq_len, tok.endoftext_id,
                       tok.endoftext_id, len(tok), "concat", meta={"seq_len": seq_len})
    return corpora, held


def run_loss_law(cfg: dict, model_dir: Path, pipeline: Path, tokenizer: Path, heldout: Path, fit: Path,
                 out: Path, law: dict | None = None) -> dict:
    """The quality sweep and both loss-law fits (a recipe stage): metrics, loss_law.json and loss_law.png. `law`
    (models, tokens, fractions, batch_size) defaults to the recipe's cfg["loss_law"]."""

    law = law or cfg["loss_law"]
    corpora, held = build_quality_corpora(pipeline, tokenizer, heldout, out / "corpora", law["fractions"],
                                          max(law["tokens"]), cfg["phase1_len"], cfg["seed"])
    run_sweep({"out_dir": str(out), "eval_data": str(held),
               "base": {"model": str(model_dir), "seq_len": cfg["phase1_len"], "dtype": "fp32", "warmup": 5,
                        "save_every": 10_000, "seed": cfg["seed"], "tensorboard": False, "peak_flops": 1e11,
                        "lr": "auto", "scaling_fit": str(fit)},
               "grid": {"models": [dict(m, name=f"m{i}") for i, m in enumerate(law["models"])],
                        "tokens": law["tokens"], "lr": ["auto"], "batch_size": [law["batch_size"]],
                        "data": corpora}}, progress=True)
    result = write_loss_law(out)
    metrics = {"corpus_quality_" + c["name"]: c["quality"] for c in corpora}
    for key in ("D", "D_eff"):
        for err in ("rmse", "loo_rmse", "extrapolation_rmse"):
            if err in result[key]:
                metrics[f"law_{key}_{err}"] = result[key][err]
    return {"metrics": metrics, "outputs": {"law": out / "loss_law.json", "plot": out / "loss_law.png"},
            "notes": [json.dumps({k: round(v, 4) for k, v in result[key].items() if isinstance(v, float)})
                      for key in ("D", "D_eff")]}
